"""Forward-Forward objectives: Hinton's and SymBa's losses, cumulative goodness and its remedies.

Every block d has a goodness g_d(x, label). A positive pairs x with its true label y, a negative
with a wrong label drawn uniformly from the other C - 1 (never y). The loss of block d acts on the
cumulative goodness

    G_d = g_d + gamma * sum_{j<d} g_j          (the prior sum detached: it trains block d only)

gamma = 0 is block-local FF, gamma = 1 the fully cumulative form. With a large prior margin
P = sum_{j<d} (g_j(x, y) - g_j(x, neg)) the loss saturates and block d receives almost no gradient
(it "free-rides" on earlier blocks): against the block-local loss its gradient is scaled by
R = (1 + e^{beta m}) / (1 + e^{beta (m + gamma P)}), m = g_d(x, y) - g_d(x, neg), beta = alpha.
The three remedies of the free-riding study (`remedy`):

- per-block: add `weight` * (the loss on g_d alone);
- hardness: gamma_d(x) = gamma * sigmoid(tau * (kappa - P(x))), so easy examples (large prior
  margin) fall back to the block-local loss;
- depth: add lambda_d * mean_x[w(x) * (the loss on g_d alone)], w(x) = sigmoid(-depth_alpha * P(x))
  normalised to mean 1 over the batch, lambda_d = weight * (d - 1) / (L - 1) (0 at block 1, whose
  cumulative and local losses coincide, `weight` at the deepest block).

Losses per (positive, negative) pair: "ff" (Hinton) softplus(-alpha (G_pos - theta_d)) +
softplus(alpha (G_neg - theta_d)) with theta_d = theta * (1 + gamma_d (d - 1)) so the threshold
follows the cumulative sum's scale; "symba" softplus(-alpha (G_pos - G_neg)).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from model.checkpoint import RunConfig
from model.config import FFConfig
from training.diagnostics import accuracy, margins
from training.objectives import StepStats

Remedy = Literal["none", "per-block", "hardness", "depth"]
ATTENUATED = 0.01  # R below this counts as an attenuated (free-riding) example


class FFTrainConfig(BaseModel):
    """FF training settings (stored in config.json under train.ff)."""

    model_config = ConfigDict(extra="forbid")

    loss: Literal["ff", "symba"] = Field(
        "symba", description="Hinton's thresholded loss (ff) or SymBa's pairwise one")
    alpha: float = Field(4.0, gt=0.0, description="softplus sharpness (SymBa's alpha; beta of R)")
    gamma: float = Field(0.0, ge=0.0, le=1.0, description="cumulative goodness weight: "
                                                          "0 block-local, 1 fully cumulative")
    remedy: Remedy = Field("none", description="free-riding remedy: per-block adds the block-local "
                           "loss, hardness gates gamma per example, depth weighs hard examples "
                           "more in deeper blocks")
    weight: float = Field(1.0, ge=0.0, description="lambda of the per-block / depth-scaled terms")
    gate_tau: float = Field(4.0, gt=0.0, description="hardness gate tau (its steepness)")
    gate_kappa: float = Field(0.5, description="hardness gate kappa (the prior margin where it "
                                               "halves)")
    depth_alpha: float = Field(4.0, gt=0.0, description="depth-scaled remedy: example weight "
                                                        "sigmoid(-depth_alpha * prior margin)")


def wrong_labels(y: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """A label drawn uniformly from the C - 1 wrong ones for each example (never y)."""
    shift = torch.randint(1, num_classes, y.shape, generator=generator, device="cpu").to(y.device)
    return (y + shift) % num_classes


def hardness_gate(gamma: float, tau: float, kappa: float, prior_margin: Tensor) -> Tensor:
    """gamma_d(x) = gamma * sigmoid(tau * (kappa - P(x))), per example."""
    return gamma * torch.sigmoid(tau * (kappa - prior_margin))


def attenuation(margin: Tensor, prior_margin: Tensor, gamma: Tensor | float, beta: float) -> Tensor:
    """R = (1 + e^{beta m}) / (1 + e^{beta (m + gamma P)}), computed in log space (no overflow)."""
    return torch.exp(F.softplus(beta * margin) - F.softplus(beta * (margin + gamma * prior_margin)))


class FFObjective:
    """FF training for `FFNet`: one pass over positives and negatives stacked, all blocks' losses."""

    name = "ff"

    def __init__(self, model_ff: FFConfig, cfg: FFTrainConfig, num_blocks: int):
        self.cfg = cfg
        self.threshold = model_ff.threshold
        self.num_blocks = num_blocks
        self.score_blocks = [k - 1 for k in model_ff.score_blocks or range(1, num_blocks + 1)]

    # --- losses ---------------------------------------------------------------------------------

    def pair_loss(self, g_pos: Tensor, g_neg: Tensor, theta: Tensor | float) -> Tensor:
        """Per-pair loss (no reduction) of positive and negative goodness."""
        a = self.cfg.alpha
        if self.cfg.loss == "symba":
            return F.softplus(-a * (g_pos - g_neg))
        return F.softplus(-a * (g_pos - theta)) + F.softplus(a * (g_neg - theta))

    def gamma_for(self, prior_margin: Tensor) -> Tensor | float:
        c = self.cfg
        if c.remedy == "hardness":
            return hardness_gate(c.gamma, c.gate_tau, c.gate_kappa, prior_margin)
        return c.gamma

    def block_losses(self, pos: list[Tensor], neg: list[Tensor]) -> list[Tensor]:
        """Mean loss of every block from per-block goodness of positives and negatives [(B,)] * L."""
        c = self.cfg
        losses = []
        prior_pos = torch.zeros_like(pos[0])
        prior_neg = torch.zeros_like(neg[0])
        for d, (gp, gn) in enumerate(zip(pos, neg, strict=True)):
            prior_margin = prior_pos - prior_neg  # P(x), already detached
            gamma = self.gamma_for(prior_margin)
            theta = self.threshold * (1 + gamma * d)
            loss = self.pair_loss(gp + gamma * prior_pos, gn + gamma * prior_neg, theta).mean()
            if d > 0 and c.remedy == "per-block":
                loss = loss + c.weight * self.pair_loss(gp, gn, self.threshold).mean()
            elif d > 0 and c.remedy == "depth":
                w = torch.sigmoid(-c.depth_alpha * prior_margin)
                w = w / w.mean()  # mean 1 over the batch
                lam = c.weight * d / max(1, self.num_blocks - 1)
                loss = loss + lam * (w * self.pair_loss(gp, gn, self.threshold)).mean()
            losses.append(loss)
            prior_pos = prior_pos + gp.detach()
            prior_neg = prior_neg + gn.detach()
        return losses

    # --- the Objective protocol -----------------------------------------------------------------

    def train_step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepStats:
        b = len(y)
        x = model.input_norm(x)
        both = torch.cat([model.embed(x, y), model.embed(x, wrong_labels(y, model.num_classes))])
        goodness = model.block_goodness(both)  # one pass over positives and negatives: [(2B,)] * L
        pos = [g[:b] for g in goodness]
        neg = [g[b:] for g in goodness]
        losses = self.block_losses(pos, neg)
        torch.stack(losses).sum().backward()  # each block's graph only reaches its own weights
        # Training "accuracy" of FF: positives that out-score their negative at that block.
        correct = [(gp.detach() > gn.detach()).sum() for gp, gn in zip(pos, neg, strict=True)]
        return StepStats([loss.detach() for loss in losses], correct)

    def block_scores(self, model: nn.Module, x: Tensor) -> list[Tensor]:
        return model(x)

    def score_loss(self, scores: list[Tensor], targets: Tensor) -> list[float]:
        """Each block's loss on evaluation scores [(N, C)] * L, every wrong label as a negative.

        The cumulative form with this run's gamma (gated per example and negative for the hardness
        remedy); the remedies' extra terms are left out, so runs compare on one loss.
        """
        n, k = scores[0].shape
        wrong = ~F.one_hot(targets, k).bool()  # (N, C)
        out = []
        prior = torch.zeros_like(scores[0])
        for d, s in enumerate(scores):
            prior_true = prior.gather(1, targets.view(-1, 1))  # (N, 1)
            gamma = self.gamma_for(prior_true - prior)  # scalar or (N, C)
            g_pos = s.gather(1, targets.view(-1, 1)) + gamma * prior_true  # (N, 1) or (N, C)
            g_neg = s + gamma * prior  # (N, C)
            theta = self.threshold * (1 + gamma * d)
            pair = self.pair_loss(g_pos.expand(n, k), g_neg, theta)
            out.append(float(pair[wrong].mean()))
            prior = prior + s
        return out

    def report(self, scores: list[Tensor], targets: Tensor) -> dict[str, Any]:
        """FF extras for metrics.json: the prediction's accuracy and the gradient attenuation R.

        R uses each block's hardest wrong label (that block's own margin m and the prior blocks'
        margin P against the same label); `attenuated_fraction[d]` is the share with R < 0.01,
        `attenuation_median[d]` the median R (1 at block 1 and for block-local runs).
        """
        combined = torch.stack([scores[k] for k in self.score_blocks]).sum(0)
        fractions, medians = [], []
        prior = torch.zeros_like(scores[0])
        for s in scores:
            hardest = s.scatter(1, targets.view(-1, 1), float("-inf")).argmax(1, keepdim=True)
            m = margins(s, targets)
            p = (prior.gather(1, targets.view(-1, 1)) - prior.gather(1, hardest)).squeeze(1)
            r = attenuation(m, p, self.gamma_for(p), self.cfg.alpha)
            fractions.append(float((r < ATTENUATED).float().mean()))
            medians.append(float(r.median()))
            prior = prior + s
        return {"final_accuracy": accuracy(combined, targets), "attenuated_fraction": fractions,
                "attenuation_median": medians}


def make_ff_objective(config: RunConfig) -> FFObjective:
    if config.model.family != "ff":
        raise ValueError("objective 'ff' needs a model of family 'ff'")
    model_ff = config.model.ff or FFConfig()
    train_ff = FFTrainConfig.model_validate(config.train.get("ff") or {})
    return FFObjective(model_ff, train_ff, config.model.num_blocks)

