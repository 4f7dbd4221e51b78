"""hff-export's command line: arguments in, export_model, the trade-off table out."""

from __future__ import annotations

import argparse
import logging
import sys

from contract.cli import DefaultsHelpFormatter, OneLineParser
from model.checkpoint import CheckpointError
from model.export import (
    DEFAULT_CONFIDENCE,
    DEFAULT_EPSILON,
    ExportError,
    ExportResult,
    export_model,
    export_to_repository,
)
from model.onnx_verify import DEFAULT_OPSET

PROG = "hff-export"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Export a checkpoint dir to a verified ONNX model dir.",
                      formatter_class=DefaultsHelpFormatter)
    p.add_argument("run_dir", help="checkpoint dir written by hff-train")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="model dir to write (an earlier one is replaced)")
    where.add_argument("--repository", help="model repository (Triton's layout, as hff-serve "
                       "--model-repository reads it): writes the next version, "
                       "REPOSITORY/NAME/<newest + 1>/; needs --name")
    p.add_argument("--name", default=None,
                   help="model name in the manifest (default: --out's name); with --repository "
                        "also the model's dir in it")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON,
                   help="accuracy an early exit may lose, as a fraction (0.005 = 0.5 points)")
    p.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                   help="one-sided confidence that each exit loses at most epsilon on unseen data "
                        "(sign test on the validation rows where the exit and the final block "
                        "disagree); 0 = trust the validation counts as they are")
    return p


def print_report(result: ExportResult) -> None:
    m = result.manifest
    ee = m.early_exit
    assert ee is not None  # the exporter always calibrates
    print(f"\n{m.name} {m.version}: {m.preset} on {m.dataset}, {m.num_blocks} blocks, "
          f"opset {m.opset}, parity max |diff| {result.parity_max_diff:.2g}")
    print("\nearly-exit trade-off on the validation split (one threshold for every block < L):")
    print(f"{'threshold':>10}  {'accuracy':>8}  {'mean blocks':>11}  {'compute':>7}")
    for t, s in result.trade_off:
        label = "never" if t is None else f"{t:g}"
        print(f"{label:>10}  {s.accuracy * 100:>7.2f}%  {s.mean_blocks:>11.2f}  "
              f"{s.compute_fraction * 100:>6.1f}%")
    ts = ", ".join("never" if t is None else f"{t:.4g}" for t in ee.thresholds)
    print(f"\ncalibrated (epsilon {ee.epsilon * 100:g} points at {ee.confidence * 100:g}% "
          f"confidence): thresholds [{ts}]")
    print(f"{'split':>6}  {'full acc':>8}  {'early-exit acc':>14}  {'compute':>7}")
    print(f"{'val':>6}  {ee.full_accuracy * 100:>7.2f}%  {ee.expected_accuracy * 100:>13.2f}%  "
          f"{ee.compute_fraction * 100:>6.1f}%")
    print(f"{'test':>6}  {result.test_full_accuracy * 100:>7.2f}%  {ee.test_accuracy * 100:>13.2f}%  "
          f"{ee.test_compute_fraction * 100:>6.1f}%")
    print("\noperating points (a server under load moves from 0 towards cheaper ones):")
    # the lower bound is what HFF_MIN_ACCURACY is checked against (app/controller.py)
    print(f"{'point':>5}  {'epsilon':>7}  {'val acc':>7}  {'lower bound':>11}  {'val compute':>11}  "
          f"{'test acc':>8}  {'test compute':>12}")
    for i, p in enumerate(ee.operating_points):
        bound = "" if p.accuracy_lower_bound is None else f"{p.accuracy_lower_bound * 100:.2f}%"
        print(f"{i:>5}  {p.epsilon * 100:>6.1f}%  {p.expected_accuracy * 100:>6.2f}%  {bound:>11}  "
              f"{p.compute_fraction * 100:>10.1f}%  {p.test_accuracy * 100:>7.2f}%  "
              f"{p.test_compute_fraction * 100:>11.1f}%")
    print(f"model dir: {result.model_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repository is not None and args.name is None:
        parser.error("--repository needs --name: the model's name in the repository")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = dict(opset=args.opset, epsilon=args.epsilon, confidence=args.confidence)
    try:
        if args.repository is not None:
            result = export_to_repository(args.run_dir, args.repository, args.name, **options)
        else:
            result = export_model(args.run_dir, args.out, name=args.name, **options)
    except (ExportError, CheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        target = args.out or args.repository
        print(f"{PROG}: error: cannot write {target}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no model dir was written", file=sys.stderr)
        return 130
    print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
