"""The README's free-riding table: HFF, backprop and the FF variants on digits, several seeds.

Each cell is a real `python -m training` run (the hff-train CLI) into --work/<variant>-s<seed>;
finished runs are reused, so an interrupted table resumes. Prints mean +- std over the seeds of
the final test accuracy, the deepest block's test separation and (FF) the deepest block's share of
examples with gradient attenuation R < 0.01 and its median R.

    python bench/digits_table.py --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy

FF = ["--objective", "ff", "--preset", "digits-cnn"]
VARIANTS: dict[str, list[str]] = {
    "HFF (local)": ["--objective", "hff"],
    "backprop": ["--objective", "backprop"],
    "FF block-local (gamma=0)": [*FF, "--gamma", "0"],
    "FF cumulative gamma=0.7": [*FF, "--gamma", "0.7"],
    "FF cum. 0.7 + per-block": [*FF, "--gamma", "0.7", "--remedy", "per-block"],
    "FF cum. 0.7 + hardness-gated": [*FF, "--gamma", "0.7", "--remedy", "hardness"],
    "FF cum. 0.7 + depth-scaled": [*FF, "--gamma", "0.7", "--remedy", "depth"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_one(variant: str, seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.work) / f"{slug(variant)}-s{seed}"
    metrics_path = out / "metrics.json"
    if not metrics_path.is_file():
        epochs = args.ff_epochs if "ff" in VARIANTS[variant] else args.epochs
        cmd = [sys.executable, "-m", "training", "--dataset", "digits", "--out", str(out),
               "--seed", str(seed), "--epochs", str(epochs), "--no-progress", "--overwrite",
               *VARIANTS[variant]]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if args.jobs > 1:
            env["OMP_NUM_THREADS"] = "1"  # jobs share the cores instead of oversubscribing them
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        print(f"  done {variant} seed {seed} in {time.perf_counter() - t0:.0f}s", flush=True)
    metrics = json.loads(metrics_path.read_text())
    if "attenuated_fraction" in metrics["test"] and "attenuation_median" not in metrics["test"]:
        metrics["test"].update(ff_report(out))
    return metrics


def ff_report(run_dir: Path) -> dict:
    """The FF objective's report recomputed from a checkpoint (runs from before a field existed)."""
    from model.checkpoint import load_checkpoint
    from training.data import load_dataset
    from training.objectives import make_objective
    from training.trainer import predict_blocks

    config, model = load_checkpoint(run_dir)
    objective = make_objective(config)
    data = load_dataset(config.dataset, config.data_dir)
    scores, labels = predict_blocks(objective, model, data.test, 512, model.input_norm.mean.device)
    return objective.report(scores, labels)


def fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40, help="HFF and backprop epochs")
    p.add_argument("--ff-epochs", type=int, default=15, help="FF epochs")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--work", default="runs/digits-table", help="where the runs are kept")
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    args = p.parse_args()
    variants = [v for v in VARIANTS if args.only is None or v in args.only]
    cells = [(v, s) for v in variants for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda c: run_one(c[0], c[1], args), cells))
    by_variant: dict[str, list[dict]] = {}
    for (variant, _), metrics in zip(cells, results, strict=True):
        by_variant.setdefault(variant, []).append(metrics)

    import torch

    print(f"\ndigits, seeds {args.seeds}; {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    threads = "1 thread each" if args.jobs > 1 else f"{torch.get_num_threads()} threads"
    print(f"every method: hff-train's defaults for its objective (same batch size, AdamW schedule, "
          f"augmentation; {args.epochs} epochs HFF and backprop, {args.ff_epochs} FF), {args.jobs} "
          f"run(s) at a time, {threads}; train s = the trainer's own training time")
    print("| method | test accuracy (%) | deepest-block separation | deepest block: share R < 0.01 "
          "| deepest block: median R | train s |")
    print("|---|---|---|---|---|---|")
    for variant, runs in by_variant.items():
        acc = fmt([m["final_test_accuracy"] for m in runs], 100)
        sep = fmt([m["test"]["separation"][-1] for m in runs], digits=3)
        is_ff = all("attenuated_fraction" in m["test"] for m in runs)
        att = fmt([m["test"]["attenuated_fraction"][-1] for m in runs], digits=3) if is_ff else "n/a"
        med = fmt([m["test"]["attenuation_median"][-1] for m in runs], digits=3) if is_ff else "n/a"
        secs = statistics.mean(m["train_time_s"] for m in runs)
        print(f"| {variant} | {acc} | {sep} | {att} | {med} | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
