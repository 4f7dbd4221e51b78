"""Images/s of torch eager against onnxruntime for the whole HFF graph, side by side in one run.

    python bench/onnx_vs_torch.py [--threads 1] [--presets digits-cnn cifar-cnn] [--batches 1 8 64]

Weights are random (speed does not depend on them). Both runtimes get the same thread count and
run in alternating rounds, so background load on a shared machine hits both alike; each cell is
the median of the rounds. Not collected by pytest; holds no pass/fail threshold.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from contract.model_dir import full_graph_outputs  # noqa: E402
from model.config import preset_config  # noqa: E402
from model.export import DEFAULT_OPSET, EXAMPLE_BATCH, FullGraph, export_graph  # noqa: E402
from model.hff import HFFNet  # noqa: E402


def time_calls(fn, min_time: float) -> float:
    """Seconds per call: repeat `fn` for at least `min_time` seconds."""
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return elapsed / calls


def bench_preset(preset: str, batches: list[int], threads: int, rounds: int, min_time: float,
                 workdir: Path) -> list[tuple[str, int, float, float]]:
    torch.manual_seed(0)
    cfg = preset_config(preset)
    full = FullGraph(HFFNet(cfg).eval()).eval()
    path = workdir / f"{preset}.onnx"
    example = torch.rand(EXAMPLE_BATCH, *cfg.input_shape)
    export_graph(full, example, path, full_graph_outputs(cfg.num_blocks), DEFAULT_OPSET)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rows = []
    for batch in batches:
        x = torch.rand(batch, *cfg.input_shape)
        x_np = x.numpy()

        def run_torch(x=x):
            with torch.inference_mode():
                full(x)

        def run_ort(x_np=x_np):
            session.run(None, {"input": x_np})

        for fn in (run_torch, run_ort):  # warm-up: allocations, kernels, caches
            time_calls(fn, min_time / 2)
        torch_s, ort_s = [], []
        for _ in range(rounds):
            torch_s.append(time_calls(run_torch, min_time))
            ort_s.append(time_calls(run_ort, min_time))
        rows.append((preset, batch, batch / statistics.median(torch_s),
                     batch / statistics.median(ort_s)))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["digits-cnn", "cifar-cnn"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per cell")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timing")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"{platform.system()} {platform.release()}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
          f"{ort.__version__}, numpy {np.__version__}; threads {args.threads} each, "
          f"{args.rounds} rounds, median")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for preset in args.presets:
            rows += bench_preset(preset, args.batches, args.threads, args.rounds, args.min_time,
                                 Path(tmp))
    print(f"\n{'preset':<12} {'batch':>5} {'torch img/s':>12} {'ort img/s':>12} {'ort/torch':>9}")
    for preset, batch, t, o in rows:
        print(f"{preset:<12} {batch:>5} {t:>12.0f} {o:>12.0f} {o / t:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
