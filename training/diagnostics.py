"""Per-block diagnostics: accuracy and separation (true-class score minus the best other)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def margins(scores: Tensor, targets: Tensor) -> Tensor:
    """Per example: score of the true class minus the largest score of any other class. (B,)"""
    true = scores.gather(1, targets.view(-1, 1)).squeeze(1)
    others = scores.scatter(1, targets.view(-1, 1), float("-inf"))
    return true - others.max(dim=1).values


def separation(scores: Tensor, targets: Tensor) -> float:
    """Mean margin over examples: > 0 when the block separates the true class on average."""
    return float(margins(scores, targets).mean())


def accuracy(scores: Tensor, targets: Tensor) -> float:
    return float((scores.argmax(dim=1) == targets).float().mean())


def block_report(block_scores: list[Tensor], targets: Tensor,
                 loss_fn: Callable[[list[Tensor], Tensor], list[float]] | None = None,
                 ) -> dict[str, list[float]]:
    """Accuracy, separation and loss of every block's scores.

    The loss is cross-entropy over the scores (HFF logits) unless the objective brings its own
    (`loss_fn`: FF goodness is no logit, its loss is the objective's).
    """
    if loss_fn is None:
        losses = [float(torch.nn.functional.cross_entropy(s, targets)) for s in block_scores]
    else:
        losses = loss_fn(block_scores, targets)
    return {
        "accuracy": [accuracy(s, targets) for s in block_scores],
        "separation": [separation(s, targets) for s in block_scores],
        "loss": losses,
    }
