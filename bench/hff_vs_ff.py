"""Inference speed of HFF (one pass) against Forward-Forward (one pass per class), same backbone.

Both networks are built from the same block list (same widths, same norm layers); HFF adds its
prototype heads, FF embeds the label as a one-hot overlay on the first C input values (so its first
layer costs what HFF's does). FF scores the C label variants of a batch as one label-major (C * B)
stack of rows, no loop over images or labels; each side gets its fastest pass size on the machine
at hand:

1. Sweep: for sub-batches of b = 1, 2, 4, ... images, HFF's images/s through one pass of b images
   and FF's through one pass of its C * b rows (label embedding, blocks, goodness), alternating,
   median of --sweep-rounds; plus FF's minor page faults per row (fresh memory the kernel has to
   map: on glibc, tensors over 32 MiB are mmapped and unmapped on every call). The fastest size
   of each side is kept. Passes over --sweep-max-rows FF rows are left to the stacked row below.
2. Table: HFF in passes of its best size against FF in chunks of its best size (the headline),
   and against FF's single stacked (C * B)-row pass (labelled; it measures memory traffic, not
   the label passes). The timed call is the whole prediction: HFF's last-block argmax (every
   block's head computed, as served), FF's argmax of the summed goodness. The forms are timed in
   alternating rounds, median images/s over the rounds; the ratio's limit is C, the label passes
   FF needs at equal cost per row.

    python bench/hff_vs_ff.py                        # 10 classes 1x8x8 and 100 classes 3x32x32
    python bench/hff_vs_ff.py --classes 100 --batches 256 --threads 1
    python bench/hff_vs_ff.py --preset-100 cifar-cnn --device cuda --sweep-max-rows 100000
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.config import ModelConfig, preset_config  # noqa: E402
from model.factory import build_model  # noqa: E402

# A light cifar-shaped backbone, so 100 classes x batch 256 (25,600 images per FF pass) stays
# measurable on a small CPU; --preset-100 cifar-cnn takes the full VGG-style stack instead.
CIFAR_SMALL = {
    "blocks": [
        {"kind": "conv", "width": 16, "downsample": "maxpool"},
        {"kind": "conv", "width": 32, "downsample": "maxpool"},
        {"kind": "conv", "width": 64, "downsample": "maxpool"},
    ],
    "pool_grid": 2,
}
CASES = {10: ((1, 8, 8), "preset_10"), 100: ((3, 32, 32), "preset_100")}


def pair(classes: int, shape: tuple[int, int, int], preset: str | None) -> tuple[torch.nn.Module, ...]:
    """(HFF, FF) with the same blocks for `classes` classes and input `shape`."""
    data = {"input_shape": shape, "class_names": [f"c{i}" for i in range(classes)],
            "input_mean": [0.5] * shape[0], "input_std": [0.25] * shape[0]}
    if preset is None:
        hff_cfg = ModelConfig(name="cifar-small", **CIFAR_SMALL, **data)
    else:
        hff_cfg = preset_config(preset, **data)
    ff_cfg = hff_cfg.model_copy(update={"family": "ff"})
    ff_cfg = ModelConfig.model_validate({**ff_cfg.model_dump(), "ff": {"label_embedding": "overlay"}})
    return build_model(hff_cfg).eval(), build_model(ff_cfg).eval(), hff_cfg


def throughput(fn: Callable[[], torch.Tensor], images: int, min_time: float,
               sync: Callable[[], None]) -> tuple[float, float]:
    """(images/s, minor page faults per image) of `fn`, called until `min_time` s have passed."""
    calls, faults, t0 = 0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    while True:
        fn()
        sync()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            return calls * images / elapsed, faults / (calls * images)


def predictors(hff, ff, x: torch.Tensor, classes: int) -> tuple[Callable, Callable]:
    """HFF in passes of `b` images and FF in chunks of `classes * b` rows, as functions of b."""
    def run_hff(b: int) -> Callable[[], torch.Tensor]:
        return lambda: torch.cat([hff(part)[-1] for part in x.split(b)]).argmax(1)

    def run_ff(b: int) -> Callable[[], torch.Tensor]:
        return lambda: ff.predict(x, chunk=classes * b)
    return run_hff, run_ff


def sweep(hff, ff, x, classes, args, sync) -> tuple[int, int, list[str]]:
    """Images per pass for HFF and for FF (C rows each), fastest first; and the table's rows."""
    batch = x.shape[0]
    sizes = sorted({min(2**i, batch) for i in range(batch.bit_length() + 1)})
    sizes = [b for b in sizes if classes * b <= args.sweep_max_rows] or sizes[:1]
    hff_rates: dict[int, list[tuple[float, float]]] = {b: [] for b in sizes}
    ff_rates: dict[int, list[tuple[float, float]]] = {b: [] for b in sizes}
    for _ in range(args.sweep_rounds):
        for b in sizes:
            run_hff, run_ff = predictors(hff, ff, x[:b], classes)
            run_hff(b)(), run_ff(b)()  # warm-up: oneDNN / cuDNN choose kernels per shape
            hff_rates[b].append(throughput(run_hff(b), b, args.sweep_time, sync))
            ff_rates[b].append(throughput(run_ff(b), b, args.sweep_time, sync))

    def median(rates: dict[int, list[tuple[float, float]]], i: int) -> dict[int, float]:
        return {b: statistics.median(r[i] for r in v) for b, v in rates.items()}

    hff_med, ff_med = median(hff_rates, 0), median(ff_rates, 0)
    hff_faults, ff_faults = median(hff_rates, 1), median(ff_rates, 1)
    best_hff, best_ff = max(hff_med, key=hff_med.get), max(ff_med, key=ff_med.get)
    rows = [f"| {classes} | {batch} | {b} | {classes * b:,} | {hff_med[b]:,.0f}"
            f"{' (best)' if b == best_hff else ''} | {ff_med[b]:,.0f}"
            f"{' (best)' if b == best_ff else ''} | {hff_faults[b]:.1f} | {ff_faults[b] / classes:.1f} |"
            for b in sizes]
    return best_hff, best_ff, rows


def measure(hff, ff, x, classes, hff_b, ff_forms, args, sync) -> tuple[float, list[tuple]]:
    """Alternating rounds of HFF (passes of hff_b images) and each FF form (images per chunk):
    HFF's median images/s and, per FF form, (median images/s, page faults per row, round ratios)."""
    run_hff, run_ff = predictors(hff, ff, x, classes)
    fns = [run_hff(hff_b)] + [run_ff(b) for b in ff_forms]
    for fn in fns:
        fn()  # warm-up
    sync()
    rates: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(args.rounds):
        for fn, out in zip(fns, rates, strict=True):
            out.append(throughput(fn, x.shape[0], args.min_time, sync))
    hff_rounds = [r for r, _ in rates[0]]
    forms = [(statistics.median(r for r, _ in f), statistics.median(p for _, p in f) / classes,
              [h / r for h, (r, _) in zip(hff_rounds, f, strict=True)]) for f in rates[1:]]
    return statistics.median(hff_rounds), forms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100], choices=sorted(CASES))
    p.add_argument("--preset-10", default="digits-cnn", help="backbone for 10 classes, 1x8x8")
    p.add_argument("--preset-100", default=None,
                   help="backbone for 100 classes, 3x32x32 (default: a light 16-32-64 conv stack)")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per table cell")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed round (at least one call)")
    p.add_argument("--sweep-rounds", type=int, default=2, help="alternating rounds of the pass-size sweep")
    p.add_argument("--sweep-time", type=float, default=0.2, help="seconds per sweep timing")
    p.add_argument("--sweep-max-rows", type=int, default=8192,
                   help="largest FF pass in the sweep, in rows (C per image)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"machine: {platform.machine()} {platform.processor()}, {os.cpu_count()} cpus, load average "
          f"{os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"python {platform.python_version()}, torch {torch.__version__}; sweep: median of "
          f"{args.sweep_rounds} rounds of >= {args.sweep_time}s; table: {args.rounds} alternating "
          f"rounds of >= {args.min_time}s, median images/s")
    sweep_rows, table_rows = [], []
    with torch.inference_mode():
        for classes in args.classes:
            shape, preset_arg = CASES[classes]
            torch.manual_seed(0)
            hff, ff, cfg = pair(classes, shape, getattr(args, preset_arg))
            hff, ff = hff.to(device), ff.to(device)
            widths = "-".join(str(b.width) for b in cfg.blocks)
            for batch in args.batches:
                x = torch.rand(batch, *shape, device=device)
                hff_b, ff_b, rows = sweep(hff, ff, x, classes, args, sync)
                sweep_rows += rows
                forms = [ff_b] + ([batch] if ff_b != batch else [])  # + the stacked single pass
                h, results = measure(hff, ff, x, classes, hff_b, forms, args, sync)
                for b, (f, faults, ratios) in zip(forms, results, strict=True):
                    form = (f"chunks of {classes * b:,} rows" if b == ff_b else "")
                    if b == batch:
                        form += (" = " if form else "") + f"stacked: one {classes * batch:,}-row pass"
                    ratio = h / f
                    table_rows.append(
                        f"| {classes} | {'x'.join(map(str, shape))} | {cfg.name} ({widths}) | {batch} "
                        f"| {hff_b} | {h:,.0f} | {form} | {f:,.0f} | {faults:.1f} | **{ratio:.1f}x** "
                        f"| {classes} | {ratio / classes:.2f} | {min(ratios):.1f}-{max(ratios):.1f} |")
                print(f"# {classes} classes, batch {batch}: done", file=sys.stderr, flush=True)
    print("\nPass-size sweep (images/s if the whole batch ran in passes of that size; FF: C rows "
          "per image):\n")
    print("| classes | batch | images per pass | FF rows per pass | HFF img/s | FF img/s "
          "| HFF page faults / image | FF page faults / row |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(sweep_rows))
    print("\nHFF against FF, each in its fastest pass size from the sweep (and FF's stacked pass):\n")
    print("| classes | input | backbone | batch | HFF images per pass | HFF img/s | FF form | FF img/s "
          "| FF page faults / row | HFF / FF | limit (C) | ratio / limit | per-round ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
