"""Peak training memory and images/s of HFF local training vs backprop on one architecture.

Each objective trains in its own fresh process (so one cannot inherit the other's peak) on
synthetic CIFAR-shaped batches, with the trainer's own optimizer, autocast and memory layout,
once per malloc: glibc's, and jemalloc with hff-train's settings (what hff-train re-executes
itself on when it is installed, training/allocator.py) when it is; `--allocators` takes either
with other settings too (jemalloc:MALLOC_CONF, glibc:GLIBC_TUNABLES), each its own cells:

    python bench/train_memory.py                          # cifar-cnn, batch 256, on CPU
    python bench/train_memory.py --preset fmnist-vgg --precision bf16 --threads 2
    python bench/train_memory.py --device cuda --steps 300  # on a GPU: max_memory_allocated
    python bench/train_memory.py --preset fmnist-vgg --allocators jemalloc \
        jemalloc:dirty_decay_ms:10000,oversize_threshold:8388608   # against jemalloc's defaults

Memory on CPU is measured three ways, each as HFF against backprop:
- training: the process's peak resident set (VmHWM) minus the resident set just before the
  first step (torch, the model and the batches are loaded by then);
- own: the same without the pages of torch's libraries that the first step pages in (code it
  had not run yet: clean, file-backed, shared with every process mapping them), so only the
  process's own memory: gradients, optimizer state, activations kept for backward,
  temporaries, oneDNN's generated kernels, and what the malloc keeps of what was freed;
- tensor: gradients and optimizer state plus the peak of torch's CPU allocations during one
  more step, from torch.profiler's memory events: the floor any malloc has to hold, the CPU's
  counterpart of the CUDA figure.
On CUDA it is torch.cuda.max_memory_allocated against memory_allocated before the first step.
Run it on a quiet machine; images/s on shared cores is noisy, so compare the cells within one
run only (they are interleaved).
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
sys.path.insert(0, str(ROOT))
from training import allocator  # noqa: E402  (torch-free: the parent process stays light)

LAYOUTS = ("contiguous", "channels-last")


def _rss_kib(field: str) -> int:
    """VmRSS (now), VmHWM (peak), RssFile or RssShmem of this process in KiB, from /proc
    (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _mapped_kib() -> int:
    """The resident pages mapped from files (the libraries' code and data) and shared memory:
    the part of the resident set that is not this process's own allocations."""
    return _rss_kib("RssFile") + _rss_kib("RssShmem")


def tensor_peak_bytes(model, optimizer, step, i: int) -> int:
    """The most tensor bytes training holds at once in one more step (after VmHWM is read: the
    profiler's own buffers must not count): the gradients and optimizer state alive as it
    starts, plus the peak of torch's CPU allocations and frees during it (activations kept for
    backward, temporaries). The malloc cannot change this figure: it is what any allocator has
    to hold, the CPU's counterpart of CUDA's max_memory_allocated."""
    from torch.profiler import ProfilerActivity, profile

    def nbytes(tensors) -> int:
        return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)

    state = nbytes(p.grad for p in model.parameters()) + nbytes(
        v for s in optimizer.state.values() for v in s.values() if hasattr(v, "untyped_storage"))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(i)
    live = peak = 0
    events = prof.profiler.kineto_results.events()
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += event.nbytes()  # + allocated, - freed
        peak = max(peak, live)
    return state + peak


def worker(args: argparse.Namespace) -> dict:
    """One objective, in this process: train `steps` batches and report memory and speed."""
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
                                         precision=args.precision,
                                         micro_batches=args.micro_batches[0]))
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
        mapped_before = _mapped_kib() * 1024
    for i in range(args.warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    # The first step pages in code of torch's libraries it had not run yet (backward kernels,
    # oneDNN): clean file pages, shared with every process that maps them, counted in VmHWM
    # but not allocated by training. They stay resident, so at the peak they were what they are
    # now; the process's own memory at its peak is VmHWM minus them.
    anon_train = None if device.type == "cuda" else (
        peak - _mapped_kib() * 1024 - (base - mapped_before))
    tensor_peak = None if device.type == "cuda" else tensor_peak_bytes(model, optimizer, step, args.steps)
    return {
        "objective": args.objective,
        "peak_mib": peak / 2**20,
        "base_mib": base / 2**20,
        "train_mib": (peak - base) / 2**20,
        "anon_mib": None if anon_train is None else anon_train / 2**20,
        "tensor_mib": None if tensor_peak is None else tensor_peak / 2**20,
        "images_per_s": args.steps * args.batch_size / elapsed,
        "threads": torch.get_num_threads(),
        "allocator": allocator.active(),
        "channels_last": channels_last,
        "precision": args.precision,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "params": sum(p.numel() for p in model.parameters()),
    }


MALLOCS = ("glibc", "jemalloc")


def parse_malloc(spec: str) -> tuple[str, str]:
    """"glibc", "jemalloc", or either with its settings after a colon: "jemalloc:CONF" (CONF is
    MALLOC_CONF, e.g. oversize_threshold:0) or "glibc:TUNABLES" (GLIBC_TUNABLES, e.g.
    glibc.malloc.mmap_threshold=4194304)."""
    name, _, conf = spec.partition(":")
    if name not in MALLOCS:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected glibc or jemalloc, optionally "
                                         "followed by :SETTINGS")
    return name, conf


def allocator_env(spec: str) -> dict[str, str]:
    """The environment of a worker on malloc `spec`: glibc's (nothing preloaded), or jemalloc
    preloaded as hff-train does it (training/allocator.py, with hff-train's settings), either
    with the settings the spec names instead."""
    name, conf = parse_malloc(spec)
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")}
    if name == "glibc":
        return {**env, "GLIBC_TUNABLES": conf} if conf else env
    library = allocator.find_jemalloc()
    if library is None:
        sys.exit("jemalloc is not installed (apt-get install libjemalloc2); "
                 "measure with --allocators glibc")
    env = allocator.preload_env(env, library)
    return {**env, "MALLOC_CONF": conf} if conf else env


def variant(label: str) -> tuple[str, int]:
    """(objective, micro-batches) of a row label: "hff", "hff/4" (its sliceable blocks in 4
    micro-batches, as hff-train --micro-batches 4) or "backprop"."""
    objective, _, slices = label.partition("/")
    return objective, int(slices or 1)


def run_in_subprocess(args: argparse.Namespace, label: str, threads: int | None = None,
                      layout: str | None = None, malloc: str = "glibc") -> dict:
    threads = args.threads if threads is None else threads
    objective, slices = variant(label)
    cmd = [sys.executable, __file__, "--worker", "--objective", objective, "--preset", args.preset,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--device", args.device, "--threads", str(threads),
           "--layout", layout or args.layout, "--precision", args.precision,
           "--micro-batches", str(slices)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env=allocator_env(malloc))
    if proc.returncode != 0:
        sys.exit(f"worker for {label} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["allocator"] != parse_malloc(malloc)[0]:
        sys.exit(f"worker for {label} ran on {result['allocator']}, not {malloc}")
    return result


def sweep(args: argparse.Namespace) -> None:
    """Both objectives at 1 and all threads, contiguous and channels-last: one process each."""
    settings = [(t, layout) for t in sorted({1, os.cpu_count() or 1}) for layout in LAYOUTS]
    malloc = args.allocators[-1]
    print(f"# setting sweep: {args.preset}, batch {args.batch_size}, {args.steps} timed steps, "
          f"one process per cell, {malloc}")
    print("| threads | layout | HFF images/s | backprop images/s | HFF training MiB | "
          "backprop training MiB |")
    print("|---|---|---|---|---|---|")
    for threads, layout in settings:
        hff, bp = (run_in_subprocess(args, o, threads, layout, malloc) for o in ("hff", "backprop"))
        print(f"| {threads} | {layout} "
              f"| {hff['images_per_s']:.1f} | {bp['images_per_s']:.1f} | {hff['train_mib']:.0f} "
              f"| {bp['train_mib']:.0f} |", flush=True)
    print()


def default_allocators() -> list[str]:
    """glibc's, then jemalloc's (what hff-train runs on) when it is installed."""
    return ["glibc", "jemalloc"] if allocator.find_jemalloc() else ["glibc"]


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
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1],
                   help="one HFF row per count: its blocks that can be sliced exactly run in that "
                        "many micro-batches (hff-train's --micro-batches; rows hff/K), side by side")
    p.add_argument("--allocators", nargs="+", default=default_allocators(),
                   type=lambda spec: parse_malloc(spec) and spec,
                   help="the mallocs to measure, each in its own processes: glibc, jemalloc, or "
                        "either with settings, jemalloc:MALLOC_CONF or glibc:GLIBC_TUNABLES "
                        "(default: glibc and, when installed, jemalloc with hff-train's "
                        "settings; the last line is the last one's)")
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
    hff_rows = [f"hff/{k}" if k > 1 else "hff" for k in args.micro_batches]
    cells = [(m, o) for m in args.allocators for o in (*hff_rows, "backprop")]
    results: dict[tuple[str, str], list[dict]] = {cell: [] for cell in cells}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every cell alike
        for malloc, objective in cells:
            results[malloc, objective].append(run_in_subprocess(args, objective, malloc=malloc))
    first = results[cells[0]][0]
    kind = "GPU max_memory_allocated" if args.device == "cuda" else "CPU peak RSS (VmHWM)"
    print(f"# {args.preset}, batch {args.batch_size}, {args.steps} timed steps after "
          f"{args.warmup} warm-up, {args.repeats} processes per objective and malloc, {args.device}"
          + ("; hff/K: HFF's sliceable blocks in K micro-batches (hff-train --micro-batches K)"
             if hff_rows != ["hff"] else ""))
    print(f"# machine: {platform.node()} {platform.machine()} {first['device_name'] or ''} "
          f"{os.cpu_count()} cpus, torch {first['torch']} ({first['threads']} threads), "
          f"python {platform.python_version()}, {first['params']:,} parameters")
    print(f"# memory: {kind}; training = peak - before the first step (median over processes); "
          f"layout {'channels-last' if first['channels_last'] else 'contiguous'}, "
          f"precision {first['precision']}; own = training without the library code pages the "
          "first step pages in (VmHWM - RssFile - RssShmem, against the same before it); "
          "tensor = gradients + optimizer state + the peak of "
          "torch's allocations in one profiled step (any malloc's floor)")
    header = (f"{'malloc':<9} {'objective':<10} {'peak MiB':>9} {'before MiB':>10} "
              f"{'training MiB':>12} {'own MiB':>8} {'tensor MiB':>10} {'images/s':>9}")
    print(header)
    print("-" * len(header))
    med = {}
    for (malloc, objective), rows in results.items():
        med[malloc, objective] = m = {
            k: statistics.median(r[k] for r in rows)
            for k in ("peak_mib", "base_mib", "train_mib", "anon_mib", "tensor_mib",
                      "images_per_s")
            if rows[0][k] is not None}
        own = f"{m['anon_mib']:>8.0f}" if "anon_mib" in m else f"{'-':>8}"
        tensor = f"{m['tensor_mib']:>10.0f}" if "tensor_mib" in m else f"{'-':>10}"
        print(f"{malloc:<9} {objective:<10} {m['peak_mib']:>9.0f} {m['base_mib']:>10.0f} "
              f"{m['train_mib']:>12.0f} {own} {tensor} {m['images_per_s']:>9.1f}")
    base = args.allocators[0]
    for malloc in args.allocators[1:]:
        print(f"{malloc} / {base} images/s: " + ", ".join(
            f"{o} {med[malloc, o]['images_per_s'] / med[base, o]['images_per_s']:.2f}"
            for o in (*hff_rows, "backprop")))
    for malloc, row in ((m, r) for m in args.allocators for r in hff_rows):
        h, b = med[malloc, row], med[malloc, "backprop"]
        tensor = (f"own memory {h['anon_mib'] / b['anon_mib']:.2f}, "
                  f"tensor bytes {h['tensor_mib'] / b['tensor_mib']:.2f}, "
                  if "tensor_mib" in h else "")
        name = "HFF" if row == "hff" else f"HFF in {variant(row)[1]} micro-batches"
        print(f"{name} / backprop ({malloc}): training memory {h['train_mib'] / b['train_mib']:.2f}, "
              f"{tensor}whole-process peak {h['peak_mib'] / b['peak_mib']:.2f}, "
              f"images/s {h['images_per_s'] / b['images_per_s']:.2f}")


if __name__ == "__main__":
    main()
