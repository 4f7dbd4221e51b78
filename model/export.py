"""ONNX export: a checkpoint dir -> a verified model dir (model.onnx, stage_k.onnx, manifest.json).

The model dir contract is contract/model_dir.py. Everything is written into a temp dir beside the
target and renamed into place only after onnx.checker, the torch/onnxruntime parity checks and the
early-exit calibration have passed, so a failed export never leaves a model dir behind.
`export_to_repository` publishes the next version of a model in a Triton-layout repository
(`<repository>/<model>/<version>/`) the same way: the version dir appears complete, manifest.json
included, in one rename, so a server polling the repository never sees it half-written. The
graphs come from model/onnx_graphs.py, their checks from model/onnx_verify.py, the command line
is model/export_cli.py.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from contract.model_dir import (
    FORMAT_VERSION,
    FULL_GRAPH,
    MANIFEST_FILE,
    PLOT_FILE,
    STAGE_OUTPUTS,
    EarlyExitSpec,
    InputSpec,
    Manifest,
    Normalization,
    OperatingPoint,
    StageSpec,
    full_graph_outputs,
    graphs_version,
    stage_file,
)
from model import atomic
from model.calibration import ExitStats, calibrate, evaluate, exit_blocks, sweep, upper_losses
from model.checkpoint import RunConfig, load_checkpoint, load_config, load_heldout
from model.onnx_graphs import EXAMPLE_BATCH, FullGraph, StageGraph, block_macs, export_graph
from model.onnx_verify import (
    DEFAULT_OPSET,
    PARITY_ATOL,
    ExportError,
    check_opset,
    verify_parity,
)

log = logging.getLogger(__name__)

DEFAULT_EPSILON = 0.005  # accuracy an early exit may lose against the full network (0.5 points)
DEFAULT_CONFIDENCE = 0.95  # how sure the calibration must be that an exit stays within epsilon
# A model's name in a repository: a path segment and a URL segment (/v2/models/<name>) as it is
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION_NAME = re.compile(r"[0-9]{1,18}")  # a version dir's name, as the server reads it


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
    """The manifest's early_exit section (thresholds calibrated on val, measured on val and
    test), the per-block test accuracy, and the val trade-off curve for the report."""
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
    section.operating_points = operating_points(heldout, macs, epsilon, confidence)
    per_block = [float(v) for v in (test_probs.argmax(2) == test_labels[:, None]).mean(0)]
    return section, per_block, sweep(val_probs, val_labels, macs)


# Accuracy losses the cheaper operating points are calibrated for, beyond the export's epsilon:
# up to 10 points below the full network, past which an answer is rarely worth having.
OPERATING_POINT_EPSILONS = (0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1)
# A cheaper point must save at least this share of the previous point's MACs (on val): a step
# that buys a few percent of compute with a point of accuracy is not worth taking under load,
# and each extra point is one more val measurement that a small split may overstate.
OPERATING_POINT_MIN_SAVING = 0.1


def operating_points(heldout: dict[str, np.ndarray], macs: list[int], epsilon: float,
                     confidence: float) -> list[OperatingPoint]:
    """The calibrated point, then the points calibrated for larger losses, each kept only when
    it saves at least OPERATING_POINT_MIN_SAVING of the MACs of the one before on val (so the
    list runs from dear to cheap in real steps)."""
    val_probs, val_labels = heldout["val_probs"], heldout["val_labels"]
    points: list[OperatingPoint] = []
    calibrated_right: np.ndarray | None = None
    for eps in (epsilon, *(e for e in OPERATING_POINT_EPSILONS if e > epsilon)):
        thresholds = calibrate(val_probs, val_labels, eps, confidence)
        val = evaluate(val_probs, val_labels, thresholds, macs)
        if points and val.compute_fraction > points[-1].compute_fraction * (
                1 - OPERATING_POINT_MIN_SAVING) + 1e-9:
            continue
        right = rows_right(val_probs, val_labels, thresholds)
        if calibrated_right is None:
            calibrated_right = right
        test = evaluate(heldout["test_probs"], heldout["test_labels"], thresholds, macs)
        points.append(OperatingPoint(
            thresholds=thresholds, epsilon=eps, expected_accuracy=val.accuracy,
            accuracy_lower_bound=points[0].expected_accuracy - loss_bound(
                calibrated_right, right, confidence) if points else val.accuracy,
            compute_fraction=val.compute_fraction, test_accuracy=test.accuracy,
            test_compute_fraction=test.compute_fraction))
    return points


def rows_right(probs: np.ndarray, labels: np.ndarray, thresholds: list[float | None]) -> np.ndarray:
    """Per row: is the block it exits at with `thresholds` right?"""
    exits = exit_blocks(probs, thresholds)
    return probs.argmax(axis=2)[np.arange(len(exits)), exits] == labels


def loss_bound(reference: np.ndarray, point: np.ndarray, confidence: float) -> float:
    """Upper confidence bound on the accuracy a point loses against the reference point, from
    the same rows (per row: right or not under each): the sign test on the discordant rows that
    `calibrate` uses. A floor checked against the point's own val accuracy trusts a few hundred
    rows too much (the cheaper points measured 2 points lower on test than on val); this bound
    widens with the evidence's thinness, so a point whose loss is not shown stays unused."""
    losses = int(np.sum(reference & ~point))
    discordant = losses + int(np.sum(point & ~reference))
    upper = float(upper_losses(np.array([discordant]), np.array([losses]), confidence)[0])
    return (2 * upper - discordant) / len(reference)


# --- the whole export ---------------------------------------------------------------------

def export_model(run_dir: str | Path, out: str | Path, name: str | None = None,
                 opset: int = DEFAULT_OPSET, epsilon: float = DEFAULT_EPSILON,
                 atol: float = PARITY_ATOL,
                 confidence: float = DEFAULT_CONFIDENCE) -> ExportResult:
    """Export, verify and calibrate `run_dir` into the model dir `out` (replaced atomically)."""
    run_dir, out = Path(run_dir), Path(out)

    def place(tmp: Path) -> Path:
        _replace_dir(tmp, out)
        return out

    return _export(run_dir, out, name or out.resolve().name, place, lambda: _check_target(run_dir, out),
                   opset, epsilon, atol, confidence)


def export_to_repository(run_dir: str | Path, repository: str | Path, name: str,
                         opset: int = DEFAULT_OPSET, epsilon: float = DEFAULT_EPSILON,
                         atol: float = PARITY_ATOL,
                         confidence: float = DEFAULT_CONFIDENCE) -> ExportResult:
    """Export `run_dir` as the next version of model `name` in `repository`:
    `<repository>/<name>/<n + 1>/`, n the newest version there (0 when none)."""
    run_dir, repository = Path(run_dir), Path(repository)
    if not MODEL_NAME.fullmatch(name):
        raise ExportError(f"model name {name!r} is not usable in a repository: letters, digits, "
                          "'.', '_' and '-', starting with a letter or digit, at most 128")
    model_root = repository / name
    _check_repository(repository, model_root)
    # The temp dirs beside the versions are `.NAME.PID.XXXXXXXX.tmp`: hidden, never a number.
    staging = model_root / name
    return _export(run_dir, staging, name, lambda tmp: _publish_version(tmp, model_root),
                   lambda: None, opset, epsilon, atol, confidence)


def _export(run_dir: Path, out: Path, name: str, place, check_target, opset: int, epsilon: float,
            atol: float, confidence: float) -> ExportResult:
    """The export both entry points share: checks, graphs into a temp dir beside `out`, then
    `place(tmp)` moves it into place and returns where it went."""
    check_opset(opset)
    if not 0.0 <= epsilon < 1.0:
        raise ExportError(f"epsilon must be a fraction in [0, 1) (0.005 = 0.5 points), got {epsilon}")
    if not 0.0 <= confidence < 1.0:
        raise ExportError(f"confidence must be in [0, 1) (0.95 = 95%; 0 = no bound), got {confidence}")
    cfg = load_config(run_dir).model
    if cfg.family != "hff":
        raise ExportError(f"{run_dir} holds a {cfg.family!r} network: only 'hff' networks have "
                          "per-block probabilities to export")
    config, net = load_checkpoint(run_dir)
    cfg = config.model
    heldout = load_heldout(run_dir, cfg.num_blocks, cfg.num_classes)
    check_target()
    started = time.time()
    remove_stale_temp_dirs(out, started)
    tmp = _make_temp_dir(out)
    try:
        result = _export_into(tmp, config, net, name, opset, epsilon, atol, heldout, confidence)
        result.model_dir = place(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s (version %s)", run_dir, result.model_dir, result.manifest.version)
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


def _check_repository(repository: Path, model_root: Path) -> None:
    for path, what in ((repository, "--repository"), (model_root, "the model's dir")):
        if path.exists() and not path.is_dir():
            raise ExportError(f"{what} {path} is a file, not a directory (a repository holds "
                              "<model>/<version>/ model dirs)")


def repository_versions(model_root: Path) -> list[int]:
    """The version numbers taken in a model's dir, ascending (any entry with a number's name:
    a file in the way takes its number too)."""
    if not model_root.is_dir():
        return []
    return sorted(int(p.name) for p in model_root.iterdir() if VERSION_NAME.fullmatch(p.name))


def _publish_version(tmp: Path, model_root: Path) -> Path:
    """Rename the finished dir to the next version number. rename(2) refuses a target that
    exists and is not empty, so of two exports racing for number n one gets it and the other
    takes the next number."""
    os.chmod(tmp, 0o777 & ~atomic._UMASK)  # mkdtemp makes 0700 dirs; a model dir is shared
    while True:
        target = model_root / str(max(repository_versions(model_root), default=0) + 1)
        try:
            os.rename(tmp, target)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                continue  # taken since we looked: the listing now holds it
            raise
        log.info("published %s as version %s", model_root.name, target.name)
        return target


def _temp_prefix(out: Path) -> str:
    """Our temp dirs beside `out`: `.NAME.PID.XXXXXXXX.tmp` (and `.old`); the pid says whose."""
    return f".{out.name}.{os.getpid()}."


def remove_stale_temp_dirs(out: Path, started: float) -> None:
    """Remove the temp dirs an earlier export to `out` left when it was killed (kill -9 runs no
    cleanup): directories named by this exporter's pattern beside `out`, older than this run,
    whose process is gone. Nothing else is touched."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.(?:tmp|old)")
    if not out.parent.is_dir():
        return
    for path in out.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        if path.stat().st_mtime >= started or (match[1] and _alive(int(match[1]))):
            continue  # made during this run, or an export still running
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by an earlier export that did not finish", path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _make_temp_dir(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise ExportError(f"cannot write to {out.parent}: {e.strerror or e}") from None


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished dir into place; an existing model dir is swapped out, then removed."""
    os.chmod(tmp, 0o777 & ~atomic._UMASK)  # mkdtemp makes 0700 dirs; a model dir is shared
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".old", dir=out.parent))
    os.replace(out, old / "dir")  # out is gone only for the instant between the two renames
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / "dir", out)  # put the previous model dir back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
