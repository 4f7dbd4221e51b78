"""ONNX export: a checkpoint dir -> a verified model dir (model.onnx, stage_k.onnx, manifest.json).

The model dir contract is contract/model_dir.py. Everything is written into a temp dir beside the
target and renamed into place only after onnx.checker, the torch/onnxruntime parity checks and the
early-exit calibration have passed, so a failed export never leaves a model dir behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from contract.model_dir import (
    FORMAT_VERSION,
    FULL_GRAPH,
    GRAPH_INPUT,
    MANIFEST_FILE,
    PLOT_FILE,
    STAGE_OUTPUTS,
    EarlyExitSpec,
    InputSpec,
    Manifest,
    Normalization,
    StageSpec,
    full_graph_outputs,
    graphs_version,
    stage_file,
)
from model import atomic
from model.calibration import ExitStats, calibrate, evaluate, sweep
from model.checkpoint import (
    HELDOUT_FILE,
    CheckpointError,
    RunConfig,
    load_checkpoint,
    load_config,
)

log = logging.getLogger(__name__)

PROG = "hff-export"
DEFAULT_OPSET = 18
# The dynamo exporter writes opset 18 natively; below that it tries a version converter that
# fails on these graphs and silently falls back to 18, so lower opsets are refused up front.
MIN_OPSET = 18
DEFAULT_EPSILON = 0.005  # accuracy an early exit may lose against the full network (0.5 points)
DEFAULT_CONFIDENCE = 0.95  # how sure the calibration must be that an exit stays within epsilon
PARITY_BATCHES = (1, 7, 64)
PARITY_ATOL = 1e-5  # on probabilities
EXAMPLE_BATCH = 4  # > 1, so the exporter cannot specialise the batch axis to a constant


class ExportError(Exception):
    """The export cannot be done or failed verification; the message says why in one line."""


def max_opset() -> int:
    import onnx

    return onnx.defs.onnx_opset_version()


def check_opset(opset: int) -> None:
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise ExportError(f"opset {opset} is not supported: use {MIN_OPSET} to {top} "
                          f"(default {DEFAULT_OPSET})")


# --- the exported modules ---------------------------------------------------------------------

class FullGraph(nn.Module):
    """The whole network: pixels in [0, 1] -> (probs_1, ..., probs_L)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(logits.softmax(dim=1) for logits in self.net(x, detach=False))


class StageGraph(nn.Module):
    """Block k alone: its input (the [0, 1] image for block 1) -> (feature map, probs)."""

    def __init__(self, net: nn.Module, index: int):
        super().__init__()
        self.norm = net.input_norm if index == 0 else None  # normalisation lives in stage 1
        self.block = net.blocks[index]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.norm is not None:
            x = self.norm(x)
        h, logits = self.block(x)
        return h, logits.softmax(dim=1)


def block_macs(net: nn.Module, input_shape: tuple[int, ...]) -> list[int]:
    """Multiply-accumulates of each block (body + prototype head) for one input.

    conv: k*k*Cin*Cout*Hout*Wout per layer; linear: in*out; head: D*(C*P) for the prototype
    matmul. Norms, activations and pools are not counted (they are not multiply-accumulates).
    """
    counts: list[int] = []
    current = [0]

    def hook(module: nn.Module, _inputs: Any, output: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            current[0] += module.weight.numel() * output.shape[2] * output.shape[3]
        elif isinstance(module, nn.Linear):
            current[0] += module.weight.numel()

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = net.training
    net.eval()  # a batch of one through BatchNorm1d needs eval mode
    try:
        with torch.no_grad():
            h = net.input_norm(torch.zeros(1, *input_shape))
            for block in net.blocks:
                current[0] = 0
                h, _ = block(h)
                counts.append(current[0] + block.head.prototypes.numel())
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    return counts


# --- export and verification --------------------------------------------------------------

def export_graph(module: nn.Module, example: Tensor, path: Path, output_names: list[str],
                 opset: int) -> None:
    """One module -> one ONNX file with input GRAPH_INPUT and a dynamic batch axis.

    The dynamo (torch.export) exporter: it is torch 2.13's default and maintained path, its
    optimiser folds BatchNorm into the convolutions and drops the Identity/Constant clutter the
    legacy TorchScript exporter leaves (58 nodes against 96 for digits-cnn), and the legacy
    exporter is deprecated with a removal notice. Both pass onnx.checker and parity here.
    """
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings(), _quiet_torch_onnx():
            # torch-internal deprecation notices are not the user's business
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            program = torch.onnx.export(
                module.eval(), (example,), None, input_names=[GRAPH_INPUT],
                output_names=output_names, opset_version=opset, dynamo=True,
                dynamic_shapes=({0: batch},), optimize=True, verbose=False)
            program.save(str(path), external_data=False)
        _strip_debug_metadata(path)
    except Exception as e:  # the exporter raises many types; all mean the same to the user
        raise ExportError(f"torch.onnx.export failed for {path.name}: "
                          f"{type(e).__name__}: {_first_line(e)}") from e
    _check_graph(path, opset, output_names)


def _strip_debug_metadata(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (source paths, line numbers, module names).

    It leaks the exporting machine's paths into the artifact and makes the content-hash version
    depend on where the code was run from; without it, the same checkpoint gives the same bytes.
    """
    import onnx

    proto = onnx.load(str(path))
    graphs = [proto.graph] + [f for f in proto.functions]
    for graph in graphs:
        del graph.metadata_props[:]
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        del value.metadata_props[:]
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _quiet_torch_onnx():
    """Mute the exporter's chatter: torchvision ops it cannot find (never used here) and the
    onnxscript optimiser's INFO lines per rewrite; real failures still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _check_graph(path: Path, opset: int, output_names: list[str]) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejects {path.name}: {_first_line(e)}") from e
    graph = onnx.load(str(path), load_external_data=False)
    got = {o.domain: o.version for o in graph.opset_import}.get("")
    if got != opset:
        raise ExportError(f"{path.name} was written with opset {got}, not the {opset} asked for")
    inputs = [i for i in graph.graph.input]
    if [i.name for i in inputs] != [GRAPH_INPUT]:
        raise ExportError(f"{path.name} has inputs {[i.name for i in inputs]}, "
                          f"expected {[GRAPH_INPUT]}")
    if not inputs[0].type.tensor_type.shape.dim[0].dim_param:
        raise ExportError(f"{path.name} has a fixed batch size; the batch axis must be dynamic")
    outputs = [o.name for o in graph.graph.output]
    if outputs != output_names:
        raise ExportError(f"{path.name} has outputs {outputs}, expected {output_names}")


def make_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot load {path.name}: {_first_line(e)}") from e


def run_session(session: Any, x: np.ndarray) -> list[np.ndarray]:
    """All outputs of one graph for input `x` (kept separate so tests can corrupt it)."""
    return session.run(None, {GRAPH_INPUT: x})


def verify_parity(full: nn.Module, model_dir: Path, num_blocks: int,
                  input_shape: tuple[int, ...], atol: float = PARITY_ATOL,
                  batches: tuple[int, ...] = PARITY_BATCHES, seed: int = 0) -> float:
    """onnxruntime against torch on every block's probabilities, whole graph and chained stages.

    Returns the largest absolute difference seen; raises ExportError when it exceeds `atol`.
    """
    whole = make_session(model_dir / FULL_GRAPH)
    stages = [make_session(model_dir / stage_file(k)) for k in range(1, num_blocks + 1)]
    gen = torch.Generator().manual_seed(seed)
    worst, where = 0.0, ""
    for batch in batches:
        x = torch.rand(batch, *input_shape, generator=gen)  # pixels in [0, 1]
        with torch.no_grad():
            ref = [p.numpy() for p in full(x)]
        got = {FULL_GRAPH: run_session(whole, x.numpy())}
        h, chained = x.numpy(), []
        for session in stages:
            h, probs = run_session(session, h)
            chained.append(probs)
        got["chained stages"] = chained
        for graph, outputs in got.items():
            for k, (a, b) in enumerate(zip(outputs, ref, strict=True), 1):
                if a.shape != b.shape:
                    raise ExportError(f"{graph} gives probs_{k} of shape {a.shape} at batch "
                                      f"{batch}, torch gives {b.shape}")
                diff = float(np.abs(a - b).max())
                if not diff <= worst:  # also catches NaN
                    worst, where = diff, f"probs_{k} of {graph} at batch {batch}"
    if not worst <= atol:
        raise ExportError(f"onnxruntime disagrees with torch by {worst:.3g} (tolerance {atol:g}) "
                          f"on {where}")
    log.info("parity: largest difference %.3g at batches %s", worst, list(batches))
    return worst


# --- held-out data and calibration ----------------------------------------------------------

def load_heldout(run_dir: Path, num_blocks: int, num_classes: int) -> dict[str, np.ndarray]:
    """The trainer's per-block probabilities on val and test: probs (N, L, C), labels (N,)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = run_dir / HELDOUT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run has not finished (hff-train writes it "
                              "after the last epoch)")
    try:
        data = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({e})") from None
    for split in ("val", "test"):
        probs, labels = data.get(f"{split}_probs"), data.get(f"{split}_labels")
        if probs is None or labels is None:
            raise CheckpointError(f"{path} lacks {split}_probs or {split}_labels")
        if probs.ndim != 3 or probs.shape[1:] != (num_blocks, num_classes) or len(probs) == 0:
            raise CheckpointError(f"{path}: {split}_probs has shape {probs.shape}, config.json "
                                  f"implies (N, {num_blocks}, {num_classes})")
        if labels.shape != (len(probs),) or labels.min() < 0 or labels.max() >= num_classes:
            raise CheckpointError(f"{path}: {split}_labels do not match {split}_probs")
        if not np.isfinite(probs).all():
            raise CheckpointError(f"{path}: {split}_probs holds NaN or infinite values")
    return data


@dataclass
class ExportResult:
    """What an export wrote and measured (the CLI prints it)."""

    model_dir: Path
    manifest: Manifest
    trade_off: list[tuple[float | None, ExitStats]]  # shared threshold -> stats on val
    parity_max_diff: float
    test_full_accuracy: float  # the last block alone on test, next to the manifest's early exit


def _early_exit(heldout: dict[str, np.ndarray], macs: list[int], epsilon: float,
                confidence: float) -> tuple[EarlyExitSpec, list[float], list]:
    val_probs, val_labels = heldout["val_probs"], heldout["val_labels"]
    test_probs, test_labels = heldout["test_probs"], heldout["test_labels"]
    blocks = val_probs.shape[1]
    thresholds = calibrate(val_probs, val_labels, epsilon, confidence)
    val = evaluate(val_probs, val_labels, thresholds, macs)
    full = evaluate(val_probs, val_labels, [None] * (blocks - 1), macs)
    test = evaluate(test_probs, test_labels, thresholds, macs)
    section = EarlyExitSpec(
        epsilon=epsilon,
        confidence=confidence,
        thresholds=thresholds,
        expected_exit_fraction=val.exit_fraction,
        expected_accuracy=val.accuracy,
        full_accuracy=full.accuracy,
        mean_blocks=val.mean_blocks,
        compute_fraction=val.compute_fraction,
        test_accuracy=test.accuracy,
        test_compute_fraction=test.compute_fraction,
    )
    per_block = [float(v) for v in (test_probs.argmax(2) == test_labels[:, None]).mean(0)]
    return section, per_block, sweep(val_probs, val_labels, macs)


# --- the whole export ---------------------------------------------------------------------

def export_model(run_dir: str | Path, out: str | Path, name: str | None = None,
                 opset: int = DEFAULT_OPSET, epsilon: float = DEFAULT_EPSILON,
                 atol: float = PARITY_ATOL,
                 confidence: float = DEFAULT_CONFIDENCE) -> ExportResult:
    """Export, verify and calibrate `run_dir` into the model dir `out` (replaced atomically)."""
    check_opset(opset)
    if not 0.0 <= epsilon < 1.0:
        raise ExportError(f"epsilon must be a fraction in [0, 1) (0.005 = 0.5 points), got {epsilon}")
    if not 0.0 <= confidence < 1.0:
        raise ExportError(f"confidence must be in [0, 1) (0.95 = 95%; 0 = no bound), got {confidence}")
    run_dir, out = Path(run_dir), Path(out)
    cfg = load_config(run_dir).model
    if cfg.family != "hff":
        raise ExportError(f"{run_dir} holds a {cfg.family!r} network: only 'hff' networks have "
                          "per-block probabilities to export")
    config, net = load_checkpoint(run_dir)
    cfg = config.model
    heldout = load_heldout(run_dir, cfg.num_blocks, cfg.num_classes)
    _check_target(run_dir, out)
    tmp = _make_temp_dir(out)
    try:
        result = _export_into(tmp, config, net, name or out.resolve().name, opset, epsilon, atol,
                              heldout, confidence)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.model_dir = out
    log.info("exported %s to %s (version %s)", run_dir, out, result.manifest.version)
    return result


def _export_into(tmp: Path, config: RunConfig, net: nn.Module, name: str, opset: int,
                 epsilon: float, atol: float, heldout: dict[str, np.ndarray],
                 confidence: float) -> ExportResult:
    cfg = config.model
    input_shape = tuple(cfg.input_shape)
    full = FullGraph(net).eval()
    example = torch.rand(EXAMPLE_BATCH, *input_shape, generator=torch.Generator().manual_seed(0))
    log.info("exporting %s", FULL_GRAPH)
    export_graph(full, example, tmp / FULL_GRAPH, full_graph_outputs(cfg.num_blocks), opset)
    stages, h = [], example
    shape = input_shape
    macs = block_macs(net, input_shape)
    for k in range(1, cfg.num_blocks + 1):
        stage = StageGraph(net, k - 1).eval()
        log.info("exporting %s", stage_file(k))
        export_graph(stage, h, tmp / stage_file(k), STAGE_OUTPUTS, opset)
        with torch.no_grad():
            h, _ = stage(h)
        feature_shape = tuple(h.shape[1:])
        stages.append(StageSpec(block=k, file=stage_file(k), input_shape=list(shape),
                                feature_shape=list(feature_shape), macs=macs[k - 1]))
        shape = feature_shape
    worst = verify_parity(full, tmp, cfg.num_blocks, input_shape, atol=atol)
    early_exit, per_block, trade_off = _early_exit(heldout, macs, epsilon, confidence)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=name,
        version=graphs_version(tmp, [FULL_GRAPH] + [s.file for s in stages]),
        preset=cfg.name,
        dataset=config.dataset,
        family=cfg.family,
        input=InputSpec(shape=list(input_shape)),  # float32 pixels in [0, 1], resized bilinearly
        normalization=Normalization(mean=cfg.input_mean, std=cfg.input_std, in_graph=True),
        class_names=cfg.class_names,
        num_classes=cfg.num_classes,
        num_blocks=cfg.num_blocks,
        opset=opset,
        full_graph=FULL_GRAPH,
        stages=stages,
        early_exit=early_exit,
        test_accuracy_per_block=per_block,
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    from model.exit_plot import plot_trade_off

    plot_trade_off(trade_off, early_exit, tmp / PLOT_FILE, title=f"{cfg.name} on {config.dataset}")
    atomic.write_text(tmp / MANIFEST_FILE, manifest.model_dump_json(indent=2) + "\n")
    return ExportResult(tmp, manifest, trade_off, worst, per_block[-1])


def _check_target(run_dir: Path, out: Path) -> None:
    """Refuse to replace anything but an earlier model dir (a typo must not eat a checkpoint)."""
    if out.resolve() == run_dir.resolve():
        raise ExportError(f"--out {out} is the checkpoint dir itself; pick another dir")
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
            raise ExportError(f"{out} is not empty and holds no {MANIFEST_FILE}: refusing to "
                              "replace what is not a model dir")


def _make_temp_dir(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise ExportError(f"cannot write to {out.parent}: {e.strerror or e}") from None


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished dir into place; an existing model dir is swapped out, then removed."""
    os.chmod(tmp, 0o777 & ~atomic._UMASK)  # mkdtemp makes 0700 dirs; a model dir is shared
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / "dir")  # out is gone only for the instant between the two renames
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / "dir", out)  # put the previous model dir back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- command line ---------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error; we print one line that says what was wrong."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Export a checkpoint dir to a verified ONNX model dir.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="checkpoint dir written by hff-train")
    p.add_argument("--out", required=True, help="model dir to write (an earlier one is replaced)")
    p.add_argument("--name", default=None, help="model name in the manifest (default: --out's name)")
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
    print(f"model dir: {result.model_dir}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = export_model(args.run_dir, args.out, name=args.name, opset=args.opset,
                              epsilon=args.epsilon, confidence=args.confidence)
    except (ExportError, CheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no model dir was written", file=sys.stderr)
        return 130
    print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
