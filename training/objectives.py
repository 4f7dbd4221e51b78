"""Training objectives: how one batch updates a network, and how it scores a batch per block.

An objective's `train_step` runs the forward pass, back-propagates its losses (the caller steps the
optimizer) and returns per-block losses and correct counts; `block_scores` returns every block's
class scores (logits for HFF) for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from model.checkpoint import RunConfig
from training.losses import correct_count, prototype_loss
from training.micro_batch import block_step_in_slices, split_at_norm


@dataclass
class StepStats:
    """Per-block sums over one batch (tensors, so the caller syncs with the device once)."""

    loss: list[Tensor]  # mean loss of each block on the batch
    correct: list[Tensor]  # correctly classified examples at each block


class Objective(Protocol):
    name: str

    def train_step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepStats: ...

    def block_scores(self, model: nn.Module, x: Tensor) -> list[Tensor]: ...


class HFFLocal:
    """Greedy local learning: each block's loss is back-propagated as soon as the block has run.

    The block's input is detached, so its graph is freed by its own backward pass before the next
    block runs; peak memory stays near one block's activations.
    """

    name = "hff"

    def __init__(self, margin: float = 0.0, label_smoothing: float = 0.0, micro_batches: int = 1):
        self.margin = margin
        self.label_smoothing = label_smoothing
        self.micro_batches = micro_batches

    def train_step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepStats:
        h = model.input_norm(x)
        losses, correct = [], []
        for block in model.blocks:
            split = split_at_norm(block.body) if self.micro_batches > 1 else None
            if split is not None:  # the same gradient, a slice of the batch at a time
                result = block_step_in_slices(
                    block, split, h.detach(), y, self.micro_batches,
                    lambda logits, target, b=block: prototype_loss(
                        logits, target, b.head.scale, self.margin, self.label_smoothing))
                h = result.features
                losses.append(result.loss)
                correct.append(result.correct)
                continue
            h, logits = block(h.detach())
            loss = prototype_loss(logits, y, block.head.scale, self.margin, self.label_smoothing)
            loss.backward()  # frees this block's graph now
            losses.append(loss.detach())
            correct.append(correct_count(logits, y))
        return StepStats(losses, correct)

    def block_scores(self, model: nn.Module, x: Tensor) -> list[Tensor]:
        return model(x, detach=True)


class Backprop:
    """End-to-end baseline: the last block's loss trains every block through the whole stack.

    Earlier heads are trained as probes on detached features, so they report per-block accuracy
    (and allow early exit) without sending any gradient into the backbone.
    """

    name = "backprop"

    def __init__(self, margin: float = 0.0, label_smoothing: float = 0.0):
        self.margin = margin
        self.label_smoothing = label_smoothing

    def train_step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepStats:
        h = model.input_norm(x)
        losses, correct = [], []
        last = len(model.blocks) - 1
        for k, block in enumerate(model.blocks):
            h = block.body(h)
            logits = block.head(h if k == last else h.detach())
            losses.append(prototype_loss(logits, y, block.head.scale, self.margin,
                                         self.label_smoothing))
            correct.append(correct_count(logits, y))
        torch.stack(losses).sum().backward()
        return StepStats([loss.detach() for loss in losses], correct)

    def block_scores(self, model: nn.Module, x: Tensor) -> list[Tensor]:
        return model(x, detach=False)


def _ff(config: RunConfig) -> Objective:
    from training.ff_objectives import make_ff_objective  # imports this module: no cycle at load

    return make_ff_objective(config)


# name -> factory from the run config.
OBJECTIVES: dict[str, Callable[[RunConfig], Objective]] = {
    "hff": lambda cfg: HFFLocal(cfg.model.margin, cfg.train.get("label_smoothing", 0.0),
                                cfg.train.get("micro_batches", 1)),
    "backprop": lambda cfg: Backprop(cfg.model.margin, cfg.train.get("label_smoothing", 0.0)),
    "ff": _ff,
}


def make_objective(config: RunConfig) -> Objective:
    name = config.train.get("objective", "hff")
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r} (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name](config)
