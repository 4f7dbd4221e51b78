"""Peak training memory and images/s of HFF local training vs backprop on one architecture.

Each objective trains in its own fresh process (so one cannot inherit the other's peak) on
synthetic CIFAR-shaped batches, with the trainer's own optimizer, autocast and memory layout:

    python bench/train_memory.py                          # cifar-cnn, batch 256, on CPU
    python bench/train_memory.py --device cuda --steps 300  # on a GPU: max_memory_allocated

Memory on CPU is the process's peak resident set (VmHWM); "training" memory is that peak minus
the resident set just before the first step (torch, the model and the batches are loaded by then),
which is what the objective itself adds: activations kept for backward, gradients and the
optimizer state. On CUDA it is torch.cuda.max_memory_allocated against memory_allocated before the
first step. Run it on a quiet machine; images/s on shared cores is noisy, so compare the two
objectives within one run only.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("contiguous", "channels-last")


def _rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in KiB, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args: argparse.Namespace) -> dict:
    """One objective, in this process: train `steps` batches and report memory and speed."""
    sys.path.insert(0, str(ROOT))
    import torch

    from model.config import preset_config
    from model.factory import build_model
    from training.objectives import make_objective
    from training.trainer import TrainConfig, autocast, make_run_config, param_groups, to_device

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_cfg = preset_config(args.preset)
    config = make_run_config(model_cfg, "synthetic", None, 0,
                             TrainConfig(objective=args.objective, batch_size=args.batch_size,
                                         precision=args.precision))
    model = build_model(model_cfg).to(device)
    channels_last = args.layout == "channels-last"  # the trainer's default
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    objective = make_objective(config)
    optimizer = torch.optim.AdamW(param_groups(model, 5e-4), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    n_batches = 4  # a few distinct batches, reused: the data pipeline is not what is measured
    xs = [to_device(torch.rand(args.batch_size, *model_cfg.input_shape, generator=gen), device,
                    channels_last) for _ in range(n_batches)]
    ys = [torch.randint(0, model_cfg.num_classes, (args.batch_size,), generator=gen).to(device)
          for _ in range(n_batches)]
    model.train()

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, args.precision):
            objective.train_step(model, xs[i % n_batches], ys[i % n_batches])
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
    for i in range(args.warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    return {
        "objective": args.objective,
        "peak_mib": peak / 2**20,
        "base_mib": base / 2**20,
        "train_mib": (peak - base) / 2**20,
        "images_per_s": args.steps * args.batch_size / elapsed,
        "threads": torch.get_num_threads(),
        "channels_last": channels_last,
        "precision": args.precision,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_in_subprocess(args: argparse.Namespace, objective: str, threads: int | None = None,
                      layout: str | None = None) -> dict:
    threads = args.threads if threads is None else threads
    cmd = [sys.executable, __file__, "--worker", "--objective", objective, "--preset", args.preset,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--device", args.device, "--threads", str(threads),
           "--layout", layout or args.layout, "--precision", args.precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"worker for {objective} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep(args: argparse.Namespace) -> None:
    """Both objectives at 1 and all threads, contiguous and channels-last: one process each."""
    settings = [(t, layout) for t in sorted({1, os.cpu_count() or 1}) for layout in LAYOUTS]
    print(f"# setting sweep: {args.preset}, batch {args.batch_size}, {args.steps} timed steps, "
          "one process per cell")
    print("| threads | layout | HFF images/s | backprop images/s | HFF training MiB | "
          "backprop training MiB |")
    print("|---|---|---|---|---|---|")
    for threads, layout in settings:
        hff, bp = (run_in_subprocess(args, o, threads, layout) for o in ("hff", "backprop"))
        print(f"| {threads} | {layout} "
              f"| {hff['images_per_s']:.1f} | {bp['images_per_s']:.1f} | {hff['train_mib']:.0f} "
              f"| {bp['train_mib']:.0f} |", flush=True)
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cifar-cnn")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (in the peak too)")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per objective")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--layout", default="channels-last", choices=LAYOUTS,
                   help="memory layout of the network and batches (the trainer's default: "
                        "channels-last)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="the training step's arithmetic, as hff-train's --precision (auto: bf16 "
                        "on CUDA, fp32 on the CPU)")
    p.add_argument("--sweep", action="store_true",
                   help="first, one process per objective at 1 and all threads, contiguous and "
                        "channels-last, to show each objective's fastest setting")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--objective", default="hff", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    if args.sweep:
        sweep(args)
    results: dict[str, list[dict]] = {"hff": [], "backprop": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        for objective in results:
            results[objective].append(run_in_subprocess(args, objective))
    first = results["hff"][0]
    kind = "GPU max_memory_allocated" if args.device == "cuda" else "CPU peak RSS (VmHWM)"
    print(f"# {args.preset}, batch {args.batch_size}, {args.steps} timed steps after "
          f"{args.warmup} warm-up, {args.repeats} processes per objective, {args.device}")
    print(f"# machine: {platform.node()} {platform.machine()} {first['device_name'] or ''} "
          f"{os.cpu_count()} cpus, torch {first['torch']} ({first['threads']} threads), "
          f"python {platform.python_version()}, {first['params']:,} parameters")
    print(f"# memory: {kind}; training = peak - before the first step (median over processes); "
          f"layout {'channels-last' if first['channels_last'] else 'contiguous'}, "
          f"precision {first['precision']}")
    header = f"{'objective':<10} {'peak MiB':>9} {'before MiB':>10} {'training MiB':>12} {'images/s':>9}"
    print(header)
    print("-" * len(header))
    med = {}
    for objective, rows in results.items():
        med[objective] = {k: statistics.median(r[k] for r in rows)
                          for k in ("peak_mib", "base_mib", "train_mib", "images_per_s")}
        m = med[objective]
        print(f"{objective:<10} {m['peak_mib']:>9.0f} {m['base_mib']:>10.0f} "
              f"{m['train_mib']:>12.0f} {m['images_per_s']:>9.1f}")
    h, b = med["hff"], med["backprop"]
    print(f"HFF / backprop: training memory {h['train_mib'] / b['train_mib']:.2f}, "
          f"whole-process peak {h['peak_mib'] / b['peak_mib']:.2f}, "
          f"images/s {h['images_per_s'] / b['images_per_s']:.2f}")


if __name__ == "__main__":
    main()
