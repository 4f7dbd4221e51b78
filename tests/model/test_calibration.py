"""Early-exit calibration on synthetic per-block probabilities (fast, no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from model.calibration import calibrate, evaluate, exit_blocks, sweep


def probs_from(conf: np.ndarray, preds: np.ndarray, classes: int = 4) -> np.ndarray:
    """(N, L) confidences and predicted classes -> (N, L, C) rows with that max and argmax."""
    n, blocks = conf.shape
    rest = (1 - conf) / (classes - 1)
    out = np.repeat(rest[:, :, None], classes, axis=2)
    out[np.arange(n)[:, None], np.arange(blocks)[None, :], preds] = conf
    return out.astype(np.float32)


def random_split(n: int = 600, blocks: int = 3, seed: int = 0):
    """Later blocks more accurate; confidence correlates with being right, as in a real net."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    conf = np.empty((n, blocks))
    preds = np.empty((n, blocks), dtype=int)
    for k in range(blocks):
        right = rng.random(n) < 0.75 + 0.1 * k
        preds[:, k] = np.where(right, labels, (labels + 1 + rng.integers(0, 3, n)) % 4)
        conf[:, k] = np.where(right, rng.uniform(0.4, 1.0, n), rng.uniform(0.3, 0.8, n))
    return probs_from(conf, preds), labels


def test_exit_blocks_follow_the_contract():
    conf = np.array([[0.9, 0.5, 0.3], [0.5, 0.8, 0.3], [0.5, 0.5, 0.3], [0.7, 0.99, 0.3]])
    probs = probs_from(conf, np.zeros((4, 3), dtype=int))
    # row exits at the first block whose max prob is >= its threshold; None never exits
    assert exit_blocks(probs, [0.9, 0.8]).tolist() == [0, 1, 2, 1]
    assert exit_blocks(probs, [None, 0.8]).tolist() == [2, 1, 2, 1]
    assert exit_blocks(probs, [None, None]).tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="need 2 thresholds"):
        exit_blocks(probs, [0.5])


def test_evaluate_counts_compute_by_cumulative_macs():
    conf = np.array([[0.9, 0.9], [0.1 + 0.5, 0.9]])
    probs = probs_from(conf, np.array([[0, 1], [1, 1]]), classes=2)
    stats = evaluate(probs, np.array([0, 0]), [0.8], macs=[1, 3])
    assert stats.exit_fraction == [0.5, 0.5]
    assert stats.accuracy == 0.5  # row 0 right at block 1, row 1 wrong at block 2
    assert stats.mean_blocks == 1.5
    assert stats.compute_fraction == pytest.approx((0.25 + 1.0) / 2)


@pytest.mark.parametrize("epsilon", [0.0, 0.005, 0.02])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibrated_accuracy_is_within_epsilon_of_the_full_network(epsilon, seed):
    probs, labels = random_split(seed=seed)
    thresholds = calibrate(probs, labels, epsilon)
    macs = [1, 2, 3]
    full = evaluate(probs, labels, [None, None], macs)
    cal = evaluate(probs, labels, thresholds, macs)
    assert cal.accuracy >= full.accuracy - epsilon - 1e-12
    assert cal.compute_fraction <= 1.0
    assert sum(cal.exit_fraction) == pytest.approx(1.0)


def test_thresholds_are_the_smallest_that_hold():
    probs, labels = random_split(seed=3)
    epsilon = 0.005
    thresholds = calibrate(probs, labels, epsilon)
    assert thresholds[0] is not None
    conf = probs.max(axis=2)
    preds = probs.argmax(axis=2)
    # block 1: every lower cut (admitting the next less confident row) breaks the condition
    lower = np.sort(conf[conf[:, 0] < thresholds[0], 0])[::-1]
    for t in lower[:20]:
        leave = conf[:, 0] >= t
        gap = (preds[leave, 0] == labels[leave]).mean() - (preds[leave, -1] == labels[leave]).mean()
        assert gap < -epsilon
    leave = conf[:, 0] >= thresholds[0]
    gap = (preds[leave, 0] == labels[leave]).mean() - (preds[leave, -1] == labels[leave]).mean()
    assert gap >= -epsilon


def test_a_block_that_is_never_good_enough_gets_no_threshold():
    n = 100
    labels = np.zeros(n, dtype=int)
    conf = np.full((n, 2), 0.9)
    preds = np.stack([np.ones(n, dtype=int), labels], axis=1)  # block 1 always wrong, sure of it
    assert calibrate(probs_from(conf, preds), labels, 0.005) == [None]


def test_epsilon_out_of_range_is_refused():
    probs, labels = random_split(n=20)
    with pytest.raises(ValueError, match="epsilon"):
        calibrate(probs, labels, 1.5)


def test_sweep_goes_from_eager_to_never():
    probs, labels = random_split()
    curve = sweep(probs, labels, [1, 1, 1])
    assert curve[-1][0] is None and curve[-1][1].compute_fraction == 1.0
    computes = [s.compute_fraction for _, s in curve]
    assert computes == sorted(computes)  # a higher shared threshold never exits more rows
