"""FF objective: cumulative loss locality, hardness gate, remedies, negatives, diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import FFConfig, preset_config
from model.factory import build_model
from training.diagnostics import block_report, margins, separation
from training.ff_objectives import (
    FFObjective,
    FFTrainConfig,
    attenuation,
    hardness_gate,
    wrong_labels,
)


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def objective(num_blocks: int = 2, **train) -> FFObjective:
    return FFObjective(FFConfig(), FFTrainConfig(**train), num_blocks)


@pytest.mark.parametrize("remedy", ["none", "per-block", "hardness", "depth"])
@pytest.mark.parametrize("loss", ["ff", "symba"])
def test_cumulative_loss_gives_no_gradient_to_earlier_blocks(remedy: str, loss: str) -> None:
    torch.manual_seed(0)
    model = build_model(preset_config("ff-mlp", family="ff")).train()
    obj = objective(3, gamma=1.0, remedy=remedy, loss=loss)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    h = model.input_norm(x)
    goodness = model.block_goodness(torch.cat([model.embed(h, y), model.embed(h, wrong_labels(y, 10))]))
    losses = obj.block_losses([g[:16] for g in goodness], [g[16:] for g in goodness])
    losses[-1].backward()  # the deepest block's cumulative loss alone
    for block in model.blocks[:-1]:
        for p in block.parameters():
            assert p.grad is None or not p.grad.any()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks[-1].parameters())


def test_hardness_gate_matches_its_formula() -> None:
    gate = hardness_gate(0.7, 2.0, 1.0, torch.tensor([0.0, 1.0, 3.0]))
    expected = [0.7 * sigmoid(2.0), 0.35, 0.7 * sigmoid(-4.0)]
    torch.testing.assert_close(gate, torch.tensor(expected))


def test_hardness_gated_loss_on_hand_made_goodness() -> None:
    obj = objective(gamma=0.7, remedy="hardness", gate_tau=2.0, gate_kappa=1.0, alpha=1.0)
    pos = [torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.2])]
    neg = [torch.tensor([1.0, 1.5]), torch.tensor([0.3, 0.6])]
    l1, l2 = obj.block_losses(pos, neg)
    assert l1.item() == pytest.approx((softplus(-1.0) + softplus(0.5)) / 2, rel=1e-5)
    # prior margins P = (1.0, -0.5) -> gamma(x) = 0.7 sigmoid(2 (1 - P))
    g_a, g_b = 0.7 * sigmoid(0.0), 0.7 * sigmoid(3.0)
    m_a = (0.5 + g_a * 2.0) - (0.3 + g_a * 1.0)
    m_b = (0.2 + g_b * 1.0) - (0.6 + g_b * 1.5)
    assert l2.item() == pytest.approx((softplus(-m_a) + softplus(-m_b)) / 2, rel=1e-5)


def test_depth_scaled_and_per_block_terms_on_hand_made_goodness() -> None:
    pos = [torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.2])]
    neg = [torch.tensor([1.0, 1.5]), torch.tensor([0.3, 0.6])]
    cum = [softplus(-((0.5 + 0.5 * 2.0) - (0.3 + 0.5 * 1.0))),
           softplus(-((0.2 + 0.5 * 1.0) - (0.6 + 0.5 * 1.5)))]
    local = [softplus(-(0.5 - 0.3)), softplus(-(0.2 - 0.6))]
    w = [sigmoid(-2.0 * 1.0), sigmoid(-2.0 * -0.5)]
    w = [v / (sum(w) / 2) for v in w]  # mean 1
    depth = objective(gamma=0.5, remedy="depth", alpha=1.0, depth_alpha=2.0, weight=3.0)
    expected = sum(cum) / 2 + 3.0 * (w[0] * local[0] + w[1] * local[1]) / 2
    assert depth.block_losses(pos, neg)[1].item() == pytest.approx(expected, rel=1e-5)
    per_block = objective(gamma=0.5, remedy="per-block", alpha=1.0, weight=3.0)
    expected = sum(cum) / 2 + 3.0 * sum(local) / 2
    assert per_block.block_losses(pos, neg)[1].item() == pytest.approx(expected, rel=1e-5)


def test_thresholded_loss_scales_theta_with_the_cumulative_sum() -> None:
    obj = FFObjective(FFConfig(threshold=2.0), FFTrainConfig(loss="ff", alpha=1.0, gamma=0.5), 2)
    pos = [torch.tensor([3.0]), torch.tensor([2.5])]
    neg = [torch.tensor([1.0]), torch.tensor([0.5])]
    theta2 = 2.0 * (1 + 0.5)
    expected = softplus(-(2.5 + 1.5 - theta2)) + softplus(0.5 + 0.5 - theta2)
    assert obj.block_losses(pos, neg)[1].item() == pytest.approx(expected, rel=1e-5)


def test_negatives_never_carry_the_true_label_and_cover_the_others() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (20_000,), generator=gen)
    neg = wrong_labels(y, 10, gen)
    assert not (neg == y).any()
    counts = torch.bincount(neg[y == 3], minlength=10)
    assert counts[3] == 0
    others = counts[torch.arange(10) != 3].float()
    assert others.min() > 0.7 * others.mean()  # uniform over the 9 wrong labels
    assert not (wrong_labels(torch.tensor([0, 1] * 500), 2) == torch.tensor([0, 1] * 500)).any()


def test_separation_on_a_hand_made_example() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [1.0, 1.0, 4.0]])
    targets = torch.tensor([0, 2, 2])
    torch.testing.assert_close(margins(scores, targets), torch.tensor([1.0, -4.0, 3.0]))
    assert separation(scores, targets) == pytest.approx(0.0)
    report = block_report([scores], targets)
    assert report["accuracy"] == [pytest.approx(2 / 3)]
    assert report["separation"] == [pytest.approx(0.0)]


def test_attenuation_and_the_report_on_hand_made_scores() -> None:
    r = attenuation(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0]), 0.5, 2.0)
    expected = [1.0, (1 + math.exp(2.0)) / (1 + math.exp(2.0 * (1.0 + 0.5 * 2.0)))]
    torch.testing.assert_close(r, torch.tensor(expected))
    # Block 1 gives example 0 a prior margin of 5 against its hardest block-2 label; example 1
    # has none, so only example 0 is attenuated below 0.01 at block 2 (beta = 4, gamma = 1).
    s1 = torch.tensor([[6.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    s2 = torch.tensor([[1.0, 0.0, 0.5], [0.5, 0.5, 0.0]])
    targets = torch.tensor([0, 1])
    report = objective(alpha=4.0, gamma=1.0).report([s1, s2], targets)
    assert report["attenuated_fraction"] == [0.0, 0.5]
    assert report["attenuation_median"][0] == 1.0
    assert report["final_accuracy"] == pytest.approx(0.5)  # argmax of s1 + s2: [0, 0]


def test_score_loss_uses_every_wrong_label() -> None:
    s = torch.tensor([[2.0, 1.0, 0.0]])
    loss = objective(1, alpha=1.0).score_loss([s], torch.tensor([0]))
    assert loss == [pytest.approx((softplus(-1.0) + softplus(-2.0)) / 2, rel=1e-5)]
