"""Build a network from its config, whatever its family."""

from __future__ import annotations

from torch import nn

from model.config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "hff":
        from model.hff import HFFNet

        return HFFNet(cfg)
    if cfg.family == "ff":
        from model.ff import FFNet

        return FFNet(cfg)
    raise ValueError(f"unknown model family {cfg.family!r}")
