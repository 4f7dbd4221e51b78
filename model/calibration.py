"""Early-exit calibration: per-block max-softmax thresholds from held-out per-block probabilities.

A row exits at block k < L when its max probability is >= thresholds[k-1] (None: never exits
there); every row that reaches block L exits there. Compute is counted in multiply-accumulates,
so exiting at block k costs the MACs of blocks 1..k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def calibrate(probs: np.ndarray, labels: np.ndarray, epsilon: float) -> list[float | None]:
    """For each block k < L, the smallest threshold whose exiting rows lose at most `epsilon`.

    Greedy from block 1: among the rows still in the network, a threshold t selects those with
    max probability >= t; it is accepted when block k's accuracy on them is at least the final
    block's accuracy on the same rows minus `epsilon`. Comparing on the same rows (rather than
    with the final block's overall accuracy) bounds the total: every exit group loses at most
    epsilon against the full network, so the calibrated accuracy on this split is at least the
    full network's minus epsilon. The threshold is placed halfway between the accepted
    confidence and the next lower one, so float rounding in another runtime cannot flip a row.
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
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
        # Exiting the top m rows: block k's and the final block's correct counts on them.
        gain = np.cumsum(correct[order, k].astype(np.int64) - correct[order, -1].astype(np.int64))
        m = np.arange(1, len(order) + 1)
        ok = gain >= -epsilon * m - 1e-9  # acc_k - acc_L >= -epsilon on the top m rows
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
