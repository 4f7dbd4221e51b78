"""Local losses of HFF blocks, and the correct count each block reports beside its loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def prototype_loss(logits: Tensor, targets: Tensor, scale: Tensor, margin: float = 0.0,
                   label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy over prototype logits, with an additive cosine margin on the true class.

    logits = scale * s; the margin subtracts `margin` from the true class's score s (CosFace), so
    the block must beat every other class by at least `margin` in cosine before the loss relaxes.
    `label_smoothing` spreads that share of the target over all classes (Szegedy et al.).
    """
    if margin > 0:
        logits = logits - (scale * margin) * F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def correct_count(logits: Tensor, targets: Tensor) -> Tensor:
    """Correctly classified examples in a batch, as a tensor (the caller syncs once per step)."""
    return (logits.detach().argmax(dim=1) == targets).sum()
