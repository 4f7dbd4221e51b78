"""Inference speed of HFF (one pass) against Forward-Forward (one pass per class), same backbone.

Both networks are built from the same block list (same widths, same norm layers); HFF adds its
prototype heads, FF embeds the label as a one-hot overlay on the first C input values (so its first
layer costs what HFF's does) and stacks the C label variants of a batch into one (C * B) forward
pass: FF's fastest honest form, no loop over images or labels. The timed call is the whole
prediction: HFF's last-block argmax, FF's argmax of the summed goodness. HFF and FF are timed in
alternating rounds so both see the same machine load; the table gives the median images/s over the
rounds and the ratio of the medians (its limit, for FF's cost, is the number of classes).

    python bench/hff_vs_ff.py                        # 10 classes 1x8x8 and 100 classes 3x32x32
    python bench/hff_vs_ff.py --preset-100 cifar-cnn --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
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


def throughput(fn: Callable[[], torch.Tensor], images: int, min_time: float, sync: Callable[[], None]) -> float:
    """Images per second of `fn`, calling it until at least `min_time` seconds have passed."""
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        sync()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return calls * images / elapsed


def measure(hff, ff, shape, batch, device, rounds, min_time) -> tuple[float, float, list[float]]:
    x = torch.rand(batch, *shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run_hff = lambda: hff(x)[-1].argmax(1)  # noqa: E731
    run_ff = lambda: ff.predict(x)  # noqa: E731
    for _ in range(2):  # warm-up: allocator, oneDNN / cuDNN algorithm choice for these shapes
        run_hff(), run_ff()
    sync()
    h, f = [], []
    for _ in range(rounds):
        h.append(throughput(run_hff, batch, min_time, sync))
        f.append(throughput(run_ff, batch, min_time, sync))
    return statistics.median(h), statistics.median(f), [a / b for a, b in zip(h, f, strict=True)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--preset-10", default="digits-cnn", help="backbone for 10 classes, 1x8x8")
    p.add_argument("--preset-100", default=None,
                   help="backbone for 100 classes, 3x32x32 (default: a light 16-32-64 conv stack)")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1])
    p.add_argument("--rounds", type=int, default=5, help="alternating HFF/FF rounds per cell")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed round")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cases = [(10, (1, 8, 8), args.preset_10), (100, (3, 32, 32), args.preset_100)]
    print(f"machine: {platform.machine()} {platform.processor()}, {os.cpu_count()} cpus, "
          f"torch threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"python {platform.python_version()}, torch {torch.__version__}; "
          f"{args.rounds} alternating rounds of >= {args.min_time}s, median images/s")
    print("\n| classes | input | backbone | batch | HFF img/s | FF img/s | HFF / FF | "
          "limit (C) | ratio / limit | per-round ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for classes, shape, preset in cases:
            hff, ff, cfg = pair(classes, shape, preset)
            hff, ff = hff.to(device), ff.to(device)
            widths = "-".join(str(b.width) for b in cfg.blocks)
            for batch in args.batches:
                h, f, ratios = measure(hff, ff, shape, batch, device, args.rounds, args.min_time)
                ratio = h / f
                print(f"| {classes} | {'x'.join(map(str, shape))} | {cfg.name} ({widths}) | {batch} "
                      f"| {h:,.0f} | {f:,.0f} | **{ratio:.1f}x** | {classes} | {ratio / classes:.2f} "
                      f"| {min(ratios):.1f}-{max(ratios):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
