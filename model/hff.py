"""Hyperspherical Forward-Forward network: blocks with local prototype heads (docs/architecture.md).

Block k maps h_{k-1} to h_k, pools and L2-normalises h_k to z_k, and scores z_k against C x P
unit-norm prototypes: s_c = tau * logsumexp_j(z . p_cj / tau); logits = exp(log_scale) * s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import BlockConfig, ModelConfig


class InputNorm(nn.Module):
    """(x - mean) / std per channel, so the network takes pixels in [0, 1]."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _norm(kind: str, channels: int, conv: bool) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels) if conv else nn.BatchNorm1d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels) if conv else nn.LayerNorm(channels)
    return nn.Identity()


def build_body(cfg: BlockConfig, in_shape: tuple[int, ...]) -> tuple[nn.Sequential, tuple[int, ...]]:
    """The layers of one block and the shape of its output (without the batch axis)."""
    act = nn.ReLU if cfg.activation == "relu" else nn.GELU
    layers: list[nn.Module] = []
    if cfg.kind == "conv":
        if len(in_shape) != 3:
            raise ValueError(f"conv block needs a (C, H, W) input, got {in_shape}")
        c, h, w = in_shape
        for _ in range(cfg.layers):
            conv = nn.Conv2d(c, cfg.width, cfg.kernel, padding=cfg.kernel // 2, bias=cfg.norm == "none")
            layers += [conv, _norm(cfg.norm, cfg.width, conv=True), act()]
            c = cfg.width
        if cfg.downsample != "none":
            layers.append(nn.MaxPool2d(2) if cfg.downsample == "maxpool" else nn.AvgPool2d(2))
            h, w = h // 2, w // 2
        out_shape: tuple[int, ...] = (c, h, w)
    else:
        features = math.prod(in_shape)
        if len(in_shape) != 1:
            layers.append(nn.Flatten())  # (B, C, H, W) -> (B, C*H*W)
        for _ in range(cfg.layers):
            layers += [nn.Linear(features, cfg.width), _norm(cfg.norm, cfg.width, conv=False), act()]
            features = cfg.width
        out_shape = (features,)
    if cfg.dropout > 0:
        layers.append(nn.Dropout(cfg.dropout))
    return nn.Sequential(*layers), out_shape


def _to_channels_last(grad: Tensor) -> Tensor:
    return grad.contiguous(memory_format=torch.channels_last)


class GradInInputLayout(nn.Module):
    """Identity whose backward hands the gradient back in its input's memory layout.

    The head flattens its pooled (B, C, g, g) map, which copies a channels-last map to NCHW
    order, so the gradient reaching the pooling's backward would be NCHW against a channels-last
    input: CPU pooling backward takes a slow path on that mix (1.5 against 0.6 ms a call on
    fmnist-vgg's heads at batch 128) and the layers below follow the NCHW gradient. Converting
    the small pooled gradient first keeps the block's backward on the channels-last path."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.requires_grad and x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            x.register_hook(_to_channels_last)
        return x


class PrototypeHead(nn.Module):
    """Pools a feature map to a unit vector and scores it against unit-norm class prototypes."""

    def __init__(self, feature_shape: tuple[int, ...], cfg: ModelConfig):
        super().__init__()
        self.num_classes = cfg.num_classes
        self.per_class = cfg.prototypes_per_class
        self.temperature = cfg.prototype_temperature
        if len(feature_shape) == 3:
            grid = min(cfg.pool_grid, feature_shape[1], feature_shape[2])
            pool = nn.AdaptiveAvgPool2d(grid) if cfg.feature_pool == "avg" else nn.AdaptiveMaxPool2d(grid)
            # (B, C, H, W) -> (B, C*g*g); no parameters, so checkpoints do not see the middle one
            self.pool: nn.Module = nn.Sequential(pool, GradInInputLayout(), nn.Flatten())
            dim = feature_shape[0] * grid * grid
        else:
            self.pool = nn.Identity()
            dim = feature_shape[0]
        self.prototypes = nn.Parameter(F.normalize(torch.randn(self.num_classes * self.per_class, dim), dim=1))
        log_scale = torch.tensor(math.log(cfg.init_scale))
        if cfg.learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def unit_prototypes(self) -> Tensor:
        return F.normalize(self.prototypes, dim=1)

    def scores(self, h: Tensor) -> Tensor:
        """Class scores in [-1, 1] (cosines when P = 1): (B, ...) -> (B, num_classes)."""
        z = F.normalize(self.pool(h), dim=1)  # (B, D), on the unit sphere
        cos = z @ self.unit_prototypes().t()  # (B, C*P)
        if self.per_class == 1:
            return cos
        cos = cos.view(-1, self.num_classes, self.per_class)  # (B, C, P)
        return self.temperature * torch.logsumexp(cos / self.temperature, dim=2)

    def forward(self, h: Tensor) -> Tensor:
        return self.scale * self.scores(h)


class HFFBlock(nn.Module):
    """One block: body plus its local prototype head. forward -> (feature map, logits)."""

    def __init__(self, cfg: BlockConfig, in_shape: tuple[int, ...], model_cfg: ModelConfig):
        super().__init__()
        self.body, self.out_shape = build_body(cfg, in_shape)
        self.head = PrototypeHead(self.out_shape, model_cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return h, self.head(h)


class HFFNet(nn.Module):
    """A stack of HFF blocks behind an input normalisation. forward -> every block's logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "hff":
            raise ValueError(f"HFFNet builds family 'hff', config says {cfg.family!r}")
        self.config = cfg
        self.input_norm = InputNorm(cfg.input_mean, cfg.input_std)
        blocks, shape = [], tuple(cfg.input_shape)
        for block_cfg in cfg.blocks:
            block = HFFBlock(block_cfg, shape, cfg)
            blocks.append(block)
            shape = block.out_shape
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, detach: bool | None = None) -> list[Tensor]:
        """Logits of every block. `detach` (default: in training) cuts gradients between blocks."""
        detach = self.training if detach is None else detach
        h = self.input_norm(x)
        logits = []
        for block in self.blocks:
            h, block_logits = block(h.detach() if detach else h)
            logits.append(block_logits)
        return logits
