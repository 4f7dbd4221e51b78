"""Parameters and multiply-accumulates (MACs) per image of every preset, per block and in total.

    python bench/model_stats.py                 # every preset, 10 classes
    python bench/model_stats.py cifar-cnn --classes 100

MACs count the convolutions, linear layers and prototype heads (z . p for every prototype) of one
image's forward pass, with the exporter's counter (`model.onnx_graphs.block_macs`, forward hooks on the
built network; normalisation, pooling and activations are left out).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import list_presets, preset_config  # noqa: E402
from model.factory import build_model  # noqa: E402
from model.onnx_graphs import block_macs  # noqa: E402  (the exporter's counter, reused)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("presets", nargs="*", help="default: every registered preset")
    p.add_argument("--classes", type=int, default=10)
    args = p.parse_args()
    names = args.presets or list_presets()
    print(f"# torch {torch.__version__}, python {platform.python_version()}, {args.classes} classes")
    header = f"{'preset':<18} {'input':<10} {'blocks':>6} {'params':>11} {'MACs/image':>12}  per-block MACs (M)"
    print(header)
    print("-" * len(header))
    for name in names:
        cfg = preset_config(name, class_names=[str(i) for i in range(args.classes)])
        if cfg.family != "hff":
            continue
        model = build_model(cfg)
        params = sum(p.numel() for p in model.parameters())
        per_block = block_macs(model, cfg.input_shape)
        shape = "x".join(str(v) for v in cfg.input_shape)
        blocks = " ".join(f"{m / 1e6:.1f}" for m in per_block)
        print(f"{name:<18} {shape:<10} {cfg.num_blocks:>6} {params:>11,} {sum(per_block):>12,}  {blocks}")


if __name__ == "__main__":
    main()
