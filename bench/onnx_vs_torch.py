"""Images/s of torch against onnxruntime for the whole HFF graph, side by side in one run.

    python bench/onnx_vs_torch.py [--threads 1] [--presets digits-cnn cifar-cnn] [--batches 1 8 64]

torch runs in each of its inference forms, all under inference_mode: eager as built; eager with
every BatchNorm folded into its convolution (torch.fx fuse, what the ONNX exporter's graph gets);
the same in channels-last memory; and TorchScript traced, frozen and optimize_for_inference'd. The
fastest form of each cell is torch's figure; the table keeps eager beside it. Weights are random
(speed does not depend on them). Both runtimes get the same thread count and every form runs in
alternating rounds, so background load on a shared machine hits all alike; each cell is the median
of the rounds. Not collected by pytest; holds no pass/fail threshold.
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
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.fx.experimental.optimization as fx_optimization  # noqa: E402

from contract.model_dir import full_graph_outputs  # noqa: E402
from model.config import preset_config  # noqa: E402
from model.hff import HFFNet  # noqa: E402
from model.onnx_graphs import EXAMPLE_BATCH, FullGraph, export_graph  # noqa: E402
from model.onnx_verify import DEFAULT_OPSET  # noqa: E402


def time_calls(fn, min_time: float) -> float:
    """Seconds per call: repeat `fn` for at least `min_time` seconds."""
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return elapsed / calls


def torch_forms(full: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """torch's inference forms of `full` on input `x`, each a call to time."""
    folded = fx_optimization.fuse(full)  # Conv2d + BatchNorm2d -> one Conv2d (eval mode)
    folded_cl = fx_optimization.fuse(full).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        script = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(full, x)))

    def under_inference_mode(module, inp):
        def run():
            with torch.inference_mode():
                return module(inp)
        return run

    def scripted():
        with torch.no_grad():  # TorchScript's frozen graph; inference_mode is eager's
            return script(x)
    return {"eager": under_inference_mode(full, x), "BN folded": under_inference_mode(folded, x),
            "BN folded, channels-last": under_inference_mode(folded_cl, x_cl),
            "TorchScript frozen": scripted}


def bench_preset(preset: str, batches: list[int], threads: int, rounds: int, min_time: float,
                 workdir: Path) -> list[tuple[str, int, dict[str, float], float]]:
    """Per batch: (preset, batch, torch images/s per form, onnxruntime images/s)."""
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
        fns = torch_forms(full, x)
        fns["onnxruntime"] = lambda x_np=x_np: session.run(None, {"input": x_np})
        for fn in fns.values():  # warm-up: allocations, kernels, caches, TorchScript's profiling runs
            for _ in range(3):
                fn()
            time_calls(fn, min_time / 2)
        seconds: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                seconds[name].append(time_calls(fn, min_time))
        rates = {name: batch / statistics.median(s) for name, s in seconds.items()}
        ort_rate = rates.pop("onnxruntime")
        rows.append((preset, batch, rates, ort_rate))
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
    forms = list(rows[0][2])
    print("\ntorch forms, images/s (the fastest of each row is torch's figure below):\n")
    print("| preset | batch | " + " | ".join(forms) + " |")
    print("|---|---:|" + "---:|" * len(forms))
    for preset, batch, rates, _ in rows:
        best = max(rates, key=rates.get)
        cells = [f"**{rates[f]:.0f}**" if f == best else f"{rates[f]:.0f}" for f in forms]
        print(f"| {preset} | {batch} | " + " | ".join(cells) + " |")
    print("\nonnxruntime against torch's fastest form (and against eager):\n")
    print("| preset | batch | torch form | torch img/s | ort img/s | ort / torch | ort / torch eager |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for preset, batch, rates, ort_rate in rows:
        best = max(rates, key=rates.get)
        print(f"| {preset} | {batch} | {best} | {rates[best]:.0f} | {ort_rate:.0f} "
              f"| **{ort_rate / rates[best]:.2f}x** | {ort_rate / rates['eager']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
