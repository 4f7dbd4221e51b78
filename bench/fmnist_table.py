"""The README's Fashion-MNIST tables: HFF against backprop on one recipe, and the FF rows.

Headline: HFF (every block trained by its own local loss) and backprop on the same preset and
recipe (by default the data set's: hff-train's epochs, batch, learning rate, augmentation, erasing
and label smoothing for fashion-mnist), several seeds: mean ± std of the final-block test accuracy,
every block's test accuracy and the deepest block's separation, training wall time and images/s,
and peak training memory (HFF / backprop) from bench/train_memory.py at batch 256 (its last
line: on the malloc hff-train runs on, jemalloc when installed).
FF rows (`--ff`): the SymBa Forward-Forward baseline and the free-riding variants (cumulative
gamma 0 and 0.7, and the three remedies) on a lighter backbone and fewer epochs (--ff-preset,
--ff-epochs), as in bench/digits_table.py.

Each cell is a real `python -m training` run into --work/<variant>-s<seed>; finished runs are
reused and a run cut short (by --launcher's time limit, say) resumes from its last epoch, so the
table can be filled in several sittings. `--launcher` prefixes every training command, e.g. a lock
that keeps timed runs alone on a shared machine:

    python bench/fmnist_table.py --seeds 0 1 2
    python bench/fmnist_table.py --launcher "/work/bin/quiet timeout 240" --seeds 0 --ff
    python bench/fmnist_table.py --ff-only --seeds 0 1 2     # the FF rows alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy

from digits_table import ff_report, fmt, slug  # noqa: E402  (bench/ is the script's own dir)

HEADLINE = {"HFF (local)": ["--objective", "hff"], "backprop": ["--objective", "backprop"]}
FF = ["--objective", "ff"]
FF_VARIANTS = {
    "FF SymBa block-local (gamma=0)": [*FF, "--gamma", "0"],
    "FF cumulative gamma=0.7": [*FF, "--gamma", "0.7"],
    "FF cum. 0.7 + per-block": [*FF, "--gamma", "0.7", "--remedy", "per-block"],
    "FF cum. 0.7 + hardness-gated": [*FF, "--gamma", "0.7", "--remedy", "hardness"],
    "FF cum. 0.7 + depth-scaled": [*FF, "--gamma", "0.7", "--remedy", "depth"],
}


def run_one(variant: str, flags: list[str], seed: int, epochs: int | None, preset: str,
            args: argparse.Namespace) -> dict:
    """The metrics of one finished run, training (or resuming) it first when needed."""
    out = Path(args.work) / f"{slug(variant)}-s{seed}"
    metrics_path = out / "metrics.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    while not metrics_path.is_file():
        if (out / "train_state.pt").is_file():  # an earlier sitting finished some epochs
            cmd = [sys.executable, "-m", "training", "--out", str(out), "--resume", "--no-progress"]
        else:
            cmd = [sys.executable, "-m", "training", "--dataset", "fashion-mnist",
                   "--preset", preset, "--out", str(out), "--seed", str(seed),
                   "--no-progress", "--overwrite", *flags]
            # what is not given comes from the data set's recipe (hff-train's defaults)
            for flag, value in (("--epochs", epochs), ("--batch-size", args.batch_size),
                                ("--lr", args.lr)):
                cmd += [flag, str(value)] if value is not None else []
            cmd += ["--data-dir", args.data_dir] if args.data_dir else []
        before = _epochs_done(out)
        t0 = time.perf_counter()
        proc = subprocess.run([*shlex.split(args.launcher), *cmd], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        print(f"  {variant} seed {seed}: {time.perf_counter() - t0:.0f}s, "
              f"epochs done {_epochs_done(out)}", flush=True)
        if proc.returncode != 0 and _epochs_done(out) <= before:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}) and finished no "
                               f"epoch:\n{proc.stderr[-2000:]}")
    metrics = json.loads(metrics_path.read_text())
    if "attenuated_fraction" in metrics["test"] and "attenuation_median" not in metrics["test"]:
        metrics["test"].update(ff_report(out))
    return metrics


def _epochs_done(out: Path) -> int:
    csv = out / "metrics.csv"
    return max(0, len(csv.read_text().splitlines()) - 1) if csv.is_file() else 0


def train_memory(preset: str, launcher: str, precision: str, micro_batches: int) -> str:
    """bench/train_memory.py's ratio line for `preset` at batch 256 (fresh processes), in the
    runs' precision and with HFF's micro-batches as the runs had them."""
    cmd = [*shlex.split(launcher), sys.executable, str(ROOT / "bench" / "train_memory.py"),
           "--preset", preset, "--batch-size", "256", "--steps", "3", "--repeats", "3",
           "--precision", precision, "--micro-batches", str(micro_batches)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return proc.stdout.strip().splitlines()[-1]


def early_exit_report(run_dir: Path, model_dir: Path) -> list[str]:
    """The exported model's calibrated thresholds (fit on the validation split) applied to the
    run's test probabilities: accuracy against the full network, share of MACs, exit histogram."""
    from safetensors.numpy import load_file

    from model.calibration import evaluate
    from model.checkpoint import HELDOUT_FILE

    manifest = json.loads((model_dir / "manifest.json").read_text())
    heldout = load_file(str(run_dir / HELDOUT_FILE))
    probs, labels = heldout["test_probs"], heldout["test_labels"]
    macs = [stage["macs"] for stage in manifest["stages"]]
    blocks = len(macs)
    early = evaluate(probs, labels, manifest["early_exit"]["thresholds"], macs)
    full = evaluate(probs, labels, [None] * (blocks - 1), macs)
    val_n = len(heldout["val_labels"])
    thresholds = ", ".join("never" if t is None else f"{t:.3f}"
                           for t in manifest["early_exit"]["thresholds"])
    return [
        f"early exit ({model_dir}): thresholds {thresholds} calibrated on {val_n:,} validation "
        f"images (epsilon {manifest['early_exit']['epsilon']}), applied to {len(labels):,} test images",
        f"  test accuracy {early.accuracy * 100:.2f}% vs full network {full.accuracy * 100:.2f}% "
        f"({(early.accuracy - full.accuracy) * 100:+.2f} points), "
        f"{early.compute_fraction * 100:.1f}% of the full network's MACs, "
        f"mean exit block {early.mean_blocks:.2f}",
        "  exits per block: " + " / ".join(f"{k}: {f * 100:.1f}%"
                                           for k, f in enumerate(early.exit_fraction, 1)),
    ]


def headline_table(by_variant: dict[str, list[dict]], train_images: int) -> list[str]:
    lines = ["| method | final-block test acc (%) | per-block test acc (%) | deepest-block "
             "separation | train wall (s) | train images/s |", "|---|---|---|---|---|---|"]
    for variant, runs in by_variant.items():
        acc = fmt([m["final_test_accuracy"] for m in runs], 100)
        blocks = len(runs[0]["test"]["accuracy"])
        per_block = " / ".join(f"{statistics.mean(m['test']['accuracy'][k] for m in runs) * 100:.2f}"
                               for k in range(blocks))
        sep = fmt([m["test"]["separation"][-1] for m in runs], digits=3)
        wall = fmt([m["train_time_s"] for m in runs], digits=0)
        # images/s over the training wall time, which includes each epoch's validation pass
        speed = fmt([train_images * m["epochs"] / m["train_time_s"] for m in runs], digits=0)
        lines.append(f"| {variant} | {acc} | {per_block} | {sep} | {wall} | {speed} |")
    return lines


def ff_table(by_variant: dict[str, list[dict]]) -> list[str]:
    lines = ["| method | test accuracy (%) | deepest-block accuracy (%) | deepest-block separation "
             "| deepest block: median R | train s |", "|---|---|---|---|---|---|"]
    for variant, runs in by_variant.items():
        acc = fmt([m["final_test_accuracy"] for m in runs], 100)
        deep = fmt([m["test"]["accuracy"][-1] for m in runs], 100)
        sep = fmt([m["test"]["separation"][-1] for m in runs], digits=3)
        med = fmt([m["test"]["attenuation_median"][-1] for m in runs], digits=3)
        secs = statistics.mean(m["train_time_s"] for m in runs)
        lines.append(f"| {variant} | {acc} | {deep} | {sep} | {med} | {secs:.0f} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default="fmnist-vgg",
                   help="headline preset (HFF and backprop; default: the data set's)")
    p.add_argument("--epochs", type=int, default=None,
                   help="HFF and backprop epochs (default: the data set's recipe)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    p.add_argument("--ff", action="store_true", help="also the FF baseline and free-riding rows")
    p.add_argument("--ff-preset", default="mnist-cnn", help="the FF rows' (lighter) backbone")
    p.add_argument("--ff-epochs", type=int, default=3)
    p.add_argument("--ff-seeds", type=int, nargs="+", default=None, help="default: --seeds")
    p.add_argument("--ff-only", action="store_true",
                   help="only the FF rows (minutes), not the headline runs (hours) they follow")
    p.add_argument("--no-memory", action="store_true", help="skip bench/train_memory.py")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="hff-export of the first HFF seed: report its early exit on test")
    p.add_argument("--data-dir", default=None, help="default: hff-train's lookup")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each run (0: torch's)")
    p.add_argument("--launcher", default="", help="prefix of every training command")
    p.add_argument("--work", default="runs/fmnist-table", help="where the runs are kept")
    args = p.parse_args()

    headline = {} if args.ff_only else {
        v: [run_one(v, f, s, args.epochs, args.preset, args) for s in args.seeds]
        for v, f in HEADLINE.items()}
    ff_seeds = args.ff_seeds or args.seeds
    ff = {v: [run_one(v, f, s, args.ff_epochs, args.ff_preset, args) for s in ff_seeds]
          for v, f in FF_VARIANTS.items()} if args.ff or args.ff_only else {}
    ff_rows = [f"\nFF rows: {args.ff_preset}, {args.ff_epochs} epochs, seeds {ff_seeds}", *ff_table(ff)]
    if args.ff_only:
        print(f"\nFashion-MNIST; {platform.machine()} {os.cpu_count()} cpus, python "
              f"{platform.python_version()}, OMP_NUM_THREADS={args.threads or 'default'}")
        print("\n".join(ff_rows))
        return 0

    import torch

    from training.data import load_dataset

    train_images = len(load_dataset("fashion-mnist", args.data_dir).train)
    first = Path(args.work) / f"{slug('HFF (local)')}-s{args.seeds[0]}" / "config.json"
    train = json.loads(first.read_text())["train"]  # the recipe the runs recorded
    train.setdefault("precision", "auto")  # runs from before the fields
    train.setdefault("micro_batches", 1)
    recipe = ", ".join(f"{k} {train[k]}" for k in ("epochs", "batch_size", "lr", "weight_decay",
                                                    "erasing", "label_smoothing", "memory_format",
                                                    "precision", "micro_batches"))
    print(f"\nFashion-MNIST ({train_images:,} training images), {args.preset}, {recipe}, "
          f"seeds {args.seeds}; "
          f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}, "
          f"torch {torch.__version__}, OMP_NUM_THREADS={args.threads or 'default'}")
    print("\n".join(headline_table(headline, train_images)))
    accs = {v: statistics.mean(m["final_test_accuracy"] for m in runs) for v, runs in headline.items()}
    print(f"HFF - backprop: {(accs['HFF (local)'] - accs['backprop']) * 100:+.2f} points")
    if not args.no_memory:
        line = train_memory(args.preset, args.launcher, train["precision"], train["micro_batches"])
        print(f"peak training memory, batch 256 ({args.preset}): {line}")
        match = re.search(r"training memory ([0-9.]+)", line)
        if match:
            print(f"HFF / backprop training memory: {float(match.group(1)):.2f}")
    if args.model_dir is not None:
        run_dir = Path(args.work) / f"{slug('HFF (local)')}-s{args.seeds[0]}"
        print("\n".join(early_exit_report(run_dir, args.model_dir)))
    if ff:
        print("\n".join(ff_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
