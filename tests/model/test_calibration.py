"""Early-exit calibration on synthetic per-block probabilities (fast, no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from model.calibration import calibrate, evaluate, exit_blocks, sweep, upper_losses


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


@pytest.mark.parametrize("confidence", [0.0, 0.95])
@pytest.mark.parametrize("epsilon", [0.0, 0.005, 0.02])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibrated_accuracy_is_within_epsilon_of_the_full_network(epsilon, seed, confidence):
    probs, labels = random_split(seed=seed)
    thresholds = calibrate(probs, labels, epsilon, confidence)
    macs = [1, 2, 3]
    full = evaluate(probs, labels, [None, None], macs)
    cal = evaluate(probs, labels, thresholds, macs)
    assert cal.accuracy >= full.accuracy - epsilon - 1e-12
    assert cal.compute_fraction <= 1.0
    assert sum(cal.exit_fraction) == pytest.approx(1.0)


def test_without_a_bound_thresholds_are_the_smallest_that_hold():
    probs, labels = random_split(seed=3)
    epsilon = 0.005
    thresholds = calibrate(probs, labels, epsilon, confidence=0.0)
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


# --- the confidence bound ---------------------------------------------------------------------

def test_upper_losses_is_the_clopper_pearson_bound():
    stats = pytest.importorskip("scipy.stats")
    n = np.array([0, 1, 2, 3, 9, 10, 40, 5, 120])
    x = np.array([0, 0, 0, 1, 3, 3, 25, 5, 70])
    for confidence in [0.5, 0.9, 0.95, 0.99]:
        ref = [0.0 if k == 0 else k * (1.0 if j == k else stats.beta.ppf(confidence, j + 1, k - j))
               for k, j in zip(n, x, strict=True)]
        np.testing.assert_allclose(upper_losses(n, x, confidence), ref, rtol=1e-9, atol=1e-12)
    # by hand: with no loss among n discordant rows, P(0 losses) = (1 - q)^n = 1 - confidence
    assert upper_losses(np.array([1]), np.array([0]), 0.95)[0] == pytest.approx(0.95)
    assert upper_losses(np.array([2]), np.array([0]), 0.95)[0] == pytest.approx(2 * (1 - 0.05 ** 0.5))
    # confidence 0: the observed losses, no bound
    assert upper_losses(n, x, 0.0).tolist() == x.tolist()


def lucky_tail():
    """Two blocks, 200 rows: 150 confident rows both blocks get right, then 50 unsure ones whose
    six discordant rows are three wins for block 1 followed by three losses (net 0)."""
    n = 200
    labels = np.zeros(n, dtype=int)
    conf = np.full((n, 2), 0.99)
    conf[:, 0] = np.concatenate([np.linspace(0.99, 0.8, 150), np.linspace(0.7, 0.5, 50)])
    preds = np.zeros((n, 2), dtype=int)
    preds[[150, 151, 152], 1] = 1  # block 1 right where the final block is wrong
    preds[[153, 154, 155], 0] = 1  # block 1 wrong where the final block is right
    return probs_from(conf, preds), labels, conf


def test_a_few_lucky_discordant_rows_no_longer_buy_a_low_threshold():
    probs, labels, conf = lucky_tail()
    # The point estimate never loses on any prefix, so everything exits at block 1.
    assert calibrate(probs, labels, 0.005, confidence=0.0) == [pytest.approx(0.25)]
    # Three wins and three losses out of six are no evidence that block 1 is as good there:
    # the bound (2 * 5.33 - 6 = 4.7 rows) is far over the 1-row budget, and even three straight
    # wins bound at 0.79 rows > 0.005 * 153. Only the 150 rows without disagreement exit.
    t = calibrate(probs, labels, 0.005, confidence=0.95)
    assert t == [pytest.approx((0.8 + 0.7) / 2)]
    assert exit_blocks(probs, t).tolist() == [0] * 150 + [1] * 50


def test_rows_the_two_blocks_agree_on_exit_under_any_confidence():
    probs, labels, _ = lucky_tail()
    agree = probs.copy()
    agree[:, 0] = agree[:, 1]  # no discordant row at all
    for confidence in [0.0, 0.95, 0.999]:
        assert calibrate(agree, labels, 0.0, confidence) == [pytest.approx(0.99 / 2)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_more_confidence_never_exits_more(seed):
    probs, labels = random_split(seed=seed)
    macs = [1, 2, 3]
    computes = [evaluate(probs, labels, calibrate(probs, labels, 0.02, c), macs).compute_fraction
                for c in [0.0, 0.5, 0.9, 0.99]]
    assert computes == sorted(computes)
    assert computes[0] < computes[-1]  # the bound does bite on these noisy blocks


def test_confidence_out_of_range_is_refused():
    probs, labels = random_split(n=20)
    for bad in [1.0, -0.1, float("nan")]:
        with pytest.raises(ValueError, match="confidence"):
            calibrate(probs, labels, 0.005, bad)
