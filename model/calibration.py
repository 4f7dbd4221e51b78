"""Early-exit calibration: per-block max-softmax thresholds from held-out per-block probabilities.

A row exits at block k < L when its max probability is >= thresholds[k-1] (None: never exits
there); every row that reaches block L exits there. Compute is counted in multiply-accumulates,
so exiting at block k costs the MACs of blocks 1..k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import beta


@dataclass
class ExitStats:
    """What a set of thresholds does to one split."""

    accuracy: float
    exit_fraction: list[float]  # length L: share of rows that exit at each block
    mean_blocks: float  # mean 1-based exit block
    compute_fraction: float  # mean MACs executed / MACs of the whole network


def exit_blocks(probs: np.ndarray, thresholds: list[float | None]) -> np.ndarray:
    """0-based exit block of every row: probs (N, L, C) -> (N,)."""
    n, blocks, _ = probs.shape
    if len(thresholds) != blocks - 1:
        raise ValueError(f"need {blocks - 1} thresholds for {blocks} blocks, got {len(thresholds)}")
    exits = np.full(n, blocks - 1)
    pending = np.ones(n, dtype=bool)
    conf = probs.max(axis=2)  # (N, L)
    for k, t in enumerate(thresholds):
        if t is None:
            continue
        leave = pending & (conf[:, k] >= t)
        exits[leave] = k
        pending &= ~leave
    return exits


def evaluate(probs: np.ndarray, labels: np.ndarray, thresholds: list[float | None],
             macs: list[int]) -> ExitStats:
    """Accuracy, exit shares and compute of early exit with `thresholds` on one split."""
    blocks = probs.shape[1]
    exits = exit_blocks(probs, thresholds)
    preds = probs.argmax(axis=2)[np.arange(len(exits)), exits]  # the exit block's prediction
    cost = np.cumsum(np.asarray(macs, dtype=np.float64)) / float(sum(macs))  # (L,) share by exit
    return ExitStats(
        accuracy=float((preds == labels).mean()),
        exit_fraction=[float(v) for v in np.bincount(exits, minlength=blocks) / len(exits)],
        mean_blocks=float(exits.mean() + 1),
        compute_fraction=float(cost[exits].mean()),
    )


def upper_losses(discordant: np.ndarray, losses: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided upper confidence bound on the losing share of discordant rows, as a count.

    Sign test on the discordant rows (McNemar's exact test): of `discordant` rows where the early
    block and the final block disagree on being right, `losses` are the ones the early block gets
    wrong. Their true share q is bounded above by the Clopper-Pearson bound at `confidence`
    (q_U with P(Binomial(n, q_U) <= losses) = 1 - confidence); the result is n * q_U, so the
    expected net loss on these rows is at most 2 * n * q_U - n. With no discordant rows it is 0;
    when every discordant row is a loss it is that count. `confidence` 0 gives the counts as
    observed (no bound).
    """
    n = np.asarray(discordant, dtype=np.int64)
    x = np.asarray(losses, dtype=np.int64)
    if confidence == 0.0:
        return x.astype(np.float64)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    # The Clopper-Pearson upper bound is the `confidence` quantile of Beta(x + 1, n - x); when
    # every discordant row is a loss (x = n, including n = 0) the share may be 1.
    open_rows = x < n
    q_upper = np.ones(n.shape)
    q_upper[open_rows] = beta.ppf(confidence, x[open_rows] + 1, n[open_rows] - x[open_rows])
    return n * q_upper


def calibrate(probs: np.ndarray, labels: np.ndarray, epsilon: float,
              confidence: float = 0.95) -> list[float | None]:
    """For each block k < L, the smallest threshold whose exiting rows lose at most `epsilon`.

    Greedy from block 1: among the rows still in the network, a threshold t selects the m rows
    with max probability >= t; it is accepted when block k's accuracy on them, against the final
    block's accuracy on the same rows, loses at most `epsilon` with probability `confidence`.
    Only the discordant rows tell the two apart: of the n where exactly one of the two blocks is
    right, x are block k's losses. The rule needs (2 * U - n) / m <= epsilon, U the one-sided
    Clopper-Pearson upper bound on x (`upper_losses`, a sign test): a few lucky discordant rows
    in a small validation split no longer buy a low threshold, which is how the point estimate
    (`confidence` 0, (x - (n - x)) / m <= epsilon) overfits. Comparing on the same rows bounds
    the total: every exit group loses at most epsilon against the full network, so the
    calibrated accuracy on this split is at least the full network's minus epsilon. The threshold
    is placed halfway between the accepted confidence and the next lower one, so float rounding
    in another runtime cannot flip a row.
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    n, blocks, _ = probs.shape
    preds = probs.argmax(axis=2)  # (N, L)
    correct = preds == labels[:, None]  # (N, L)
    conf = probs.max(axis=2)  # (N, L)
    pending = np.ones(n, dtype=bool)
    thresholds: list[float | None] = []
    for k in range(blocks - 1):
        idx = np.flatnonzero(pending)
        order = idx[np.argsort(-conf[idx, k], kind="stable")]  # most confident first
        c = conf[order, k]
        # Exiting the top m rows: block k's losses and wins against the final block on them.
        early, final = correct[order, k], correct[order, -1]
        losses = np.cumsum(final & ~early)
        discordant = losses + np.cumsum(early & ~final)
        m = np.arange(1, len(order) + 1)
        bound = 2 * upper_losses(discordant, losses, confidence) - discordant
        ok = bound <= epsilon * m + 1e-9  # (upper) acc_L - acc_k <= epsilon on the top m rows
        # Only cut where the confidence changes: rows with equal confidence exit together.
        boundary = np.append(c[1:] < c[:-1], True)
        valid = np.flatnonzero(ok & boundary)
        if len(valid) == 0:
            thresholds.append(None)
            continue
        last = int(valid[-1])  # the largest exiting set = the smallest threshold
        lower = float(c[last + 1]) if last + 1 < len(c) else 0.0
        t = (float(c[last]) + lower) / 2 if lower < float(c[last]) else float(c[last])
        thresholds.append(t)
        pending[order[: last + 1]] = False
    return thresholds


def sweep(probs: np.ndarray, labels: np.ndarray, macs: list[int],
          levels: list[float | None] | None = None) -> list[tuple[float | None, ExitStats]]:
    """The trade-off curve: one shared threshold for every block k < L (None: never exit)."""
    if levels is None:
        levels = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, None]
    blocks = probs.shape[1]
    return [(t, evaluate(probs, labels, [t] * (blocks - 1), macs)) for t in levels]
