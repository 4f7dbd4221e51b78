"""Parameters and multiply-accumulates (MACs) per image of every preset, per block and in total.

    python bench/model_stats.py                 # every preset, 10 classes
    python bench/model_stats.py cifar-cnn --classes 100

MACs count the convolutions, linear layers and prototype heads (z . p for every prototype) of one
image's forward pass, measured with forward hooks on the built network (normalisation, pooling
and activations are left out: they are a few per cent at most).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import list_presets, preset_config  # noqa: E402
from model.factory import build_model  # noqa: E402


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> list[int]:
    """MACs per image of each block (body + head), from one forward pass of a single image."""
    macs: dict[int, int] = {}
    current = [0]
    hooks = []

    def on_conv(module: nn.Conv2d, _inp, out):
        per_out = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        macs[current[0]] = macs.get(current[0], 0) + out[0].numel() * per_out

    def on_linear(module: nn.Linear, _inp, out):
        macs[current[0]] = macs.get(current[0], 0) + module.in_features * module.out_features

    def on_head(module, _inp, out):
        macs[current[0]] = macs.get(current[0], 0) + module.prototypes.numel()  # (C*P, D) dots

    for k, block in enumerate(model.blocks):
        hooks.append(block.register_forward_pre_hook(lambda *_, k=k: current.__setitem__(0, k)))
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                hooks.append(m.register_forward_hook(on_conv))
            elif isinstance(m, nn.Linear):
                hooks.append(m.register_forward_hook(on_linear))
        if hasattr(block, "head") and hasattr(block.head, "prototypes"):
            hooks.append(block.head.register_forward_hook(on_head))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for h in hooks:
        h.remove()
    return [macs.get(k, 0) for k in range(len(model.blocks))]


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
        per_block = count_macs(model, cfg.input_shape)
        shape = "x".join(str(v) for v in cfg.input_shape)
        blocks = " ".join(f"{m / 1e6:.1f}" for m in per_block)
        print(f"{name:<18} {shape:<10} {cfg.num_blocks:>6} {params:>11,} {sum(per_block):>12,}  {blocks}")


if __name__ == "__main__":
    main()
