"""Forward-Forward networks (Hinton 2022): the label is part of the input, every block has a goodness.

The candidate label is embedded in the input (`FFConfig.label_embedding`: a one-hot overlay on the
first C input values, or appended as C extra features / C constant one-hot planes for conv nets).
Block d's goodness is the sum or mean of its squared output activations. Between blocks the
activations are divided by their root-mean-square (Hinton's "layer normalisation": the length, and
with it the goodness, does not leak into the next block, only the direction does) and detached.
Inference scores every candidate label: the C label variants of a batch form one label-major
(C * B) stack, run in one forward pass or, with `chunk`, in passes of at most `chunk` rows (on a
CPU a 25,600-row pass is bound by memory traffic; a few thousand rows run faster per image). The
prediction is the argmax of the goodness summed over `FFConfig.score_blocks`. Bodies are built by the same `build_body` as HFF's, so the two
families share backbones block for block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import FFConfig, ModelConfig
from model.hff import InputNorm, build_body

NORM_EPS = 1e-6


def mean_square(h: Tensor) -> Tensor:
    """Mean of every example's squared activations, (B, ...) -> (B,): one pass over h, in any
    memory layout (no flatten, so a channels-last h is not copied)."""
    return torch.linalg.vector_norm(h, dim=tuple(range(1, h.ndim))).square() / h[0].numel()


def rms_normalise(h: Tensor, ms: Tensor | None = None) -> Tensor:
    """Divide every example by the RMS of all its activations: goodness 1 in, direction kept.
    `ms`: h's mean_square when the caller has it already."""
    rms = (mean_square(h) if ms is None else ms).add(NORM_EPS).sqrt()  # (B,)
    return h / rms.view(-1, *([1] * (h.ndim - 1)))


class FFNet(nn.Module):
    """Stack of block bodies scored by goodness. forward(x) -> every block's (B, C) goodness."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "ff":
            raise ValueError(f"FFNet builds family 'ff', config says {cfg.family!r}")
        self.config = cfg
        self.ff: FFConfig = cfg.ff or FFConfig()
        self.num_classes = cfg.num_classes
        self.input_norm = InputNorm(cfg.input_mean, cfg.input_std)
        self.flat_input = cfg.blocks[0].kind == "linear"
        shape: tuple[int, ...] = tuple(cfg.input_shape)
        if self.ff.label_embedding == "concat":
            c, h, w = cfg.input_shape
            shape = (c * h * w + self.num_classes,) if self.flat_input else (c + self.num_classes, h, w)
        bodies = []
        for block_cfg in cfg.blocks:
            body, shape = build_body(block_cfg, shape)
            bodies.append(body)
        self.blocks = nn.ModuleList(bodies)
        self.score_blocks = [k - 1 for k in (self.ff.score_blocks or range(1, cfg.num_blocks + 1))]

    def embed(self, x: Tensor, labels: Tensor) -> Tensor:
        """Put label `labels[i]` into normalised input `x[i]`: (B, C, H, W) -> the first block's input."""
        onehot = F.one_hot(labels, self.num_classes).to(x.dtype) * self.ff.label_scale  # (B, K)
        if self.ff.label_embedding == "overlay":
            flat = x.flatten(1)  # (B, C*H*W)
            return torch.cat([onehot, flat[:, self.num_classes:]], 1).view_as(x)
        if self.flat_input:
            return torch.cat([x.flatten(1), onehot], 1)  # (B, C*H*W + K)
        planes = onehot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])  # (B, K, H, W)
        return torch.cat([x, planes], 1)  # (B, C + K, H, W)

    def block_goodness(self, h: Tensor) -> list[Tensor]:
        """Goodness of every block for embedded inputs `h` (B, ...): [(B,)] * L.

        Each block's input is detached, so a loss on block d's goodness trains block d alone.
        Goodness is the sum or mean of the squared activations per example; the mean square is
        computed once per block and serves both the goodness and the next block's RMS norm.
        """
        out, ms = [], None
        for body in self.blocks:
            if ms is not None:
                h = rms_normalise(h, ms)
            h = body(h.detach())
            ms = mean_square(h)
            out.append(ms * h[0].numel() if self.ff.goodness == "sum" else ms)
        return out

    def forward(self, x: Tensor, chunk: int | None = None) -> list[Tensor]:
        """Goodness of every block for every candidate label: [(B, C)] * L.

        Row r of the label-major (K * B) stack is image r % B with label r // B; `chunk` runs the
        stack in passes of at most that many rows (None: one pass). The result does not depend on it.
        """
        b, k = x.shape[0], self.num_classes
        x = self.input_norm(x)
        rows = torch.arange(k * b, device=x.device)
        passes = [self.block_goodness(self.embed(x[r % b], r // b))
                  for r in rows.split(chunk or k * b)]
        return [torch.cat(g).view(k, b).t() for g in zip(*passes, strict=True)]

    def scores(self, x: Tensor, chunk: int | None = None) -> Tensor:
        """The prediction's class scores: goodness summed over the score blocks, (B, C)."""
        per_block = self(x, chunk)
        return torch.stack([per_block[k] for k in self.score_blocks]).sum(0)

    def predict(self, x: Tensor, chunk: int | None = None) -> Tensor:
        return self.scores(x, chunk).argmax(1)

