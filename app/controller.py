"""The load controller: which operating point answers early-exit-'auto' rows right now.

The manifest lists operating points from the calibrated one (index 0) to ever cheaper ones.
With a latency target (HFF_LATENCY_TARGET_MS) the controller estimates how long the rows queued
now will wait, the larger of the oldest queued row's age (since its request arrived, so time spent
waiting for admission counts) and queued rows / capacity (rows answered per second of inference;
it sees a burst before its rows have aged), and moves:
  - one point cheaper when that estimate passes half the target, at most once per `down_dwell_s`
    (so a move has time to show before the next one);
  - one point back towards the calibrated point when it stayed under `low` x target for
    `up_dwell_s` without a break.
The gap between the two bounds and the longer dwell upwards are the hysteresis: a load that sits
between them keeps its point, and one quiet moment does not undo a move. Points whose expected
(validation) accuracy is under the floor (HFF_MIN_ACCURACY, default: the calibrated point's minus
2 points) are never used. Without a target the controller stays at point 0.
"""

from __future__ import annotations

import math

import numpy as np

from contract.model_dir import OperatingPoint

DEFAULT_FLOOR_MARGIN = 0.02  # the default floor: 2 points under the calibrated expected accuracy


class LoadController:
    def __init__(self, points: list[OperatingPoint], target_ms: float | None = None,
                 min_accuracy: float | None = None, high: float = 0.5, low: float = 0.15,
                 down_dwell_s: float | None = None, up_dwell_s: float = 1.0):
        if not points:
            raise ValueError("at least one operating point is needed (the calibrated one)")
        calibrated = points[0].expected_accuracy
        if min_accuracy is None and calibrated is not None:
            min_accuracy = calibrated - DEFAULT_FLOOR_MARGIN
        self.min_accuracy = min_accuracy
        # the usable points: the calibrated one always, cheaper ones down to the floor
        usable = [points[0]]
        for p in points[1:]:
            if min_accuracy is not None and (p.expected_accuracy is None
                                             or p.expected_accuracy < min_accuracy):
                break
            usable.append(p)
        self.points = usable
        self._thresholds = [np.asarray([math.inf if t is None else t for t in p.thresholds],
                                       dtype=np.float64) for p in usable]
        self.target = target_ms / 1000.0 if target_ms else None
        self.high, self.low = high, low
        self.down_dwell = down_dwell_s if down_dwell_s is not None else (
            (self.target or 0.1) / 2)
        self.up_dwell = up_dwell_s
        self.index = 0
        self.moves = 0
        self._last_move = -math.inf
        self._calm_since: float | None = None
        self._rate = 0.0  # capacity: rows answered per busy second, smoothed
        self._rate_rows = 0
        self._rate_busy = 0.0

    @property
    def enabled(self) -> bool:
        return self.target is not None and len(self.points) > 1

    @property
    def thresholds(self) -> np.ndarray:
        """The current point's per-block thresholds (L-1,), inf = never exit there."""
        return self._thresholds[self.index]

    @property
    def point(self) -> OperatingPoint:
        return self.points[self.index]

    def answered(self, rows: int, busy_seconds: float) -> None:
        """`rows` rows were answered after `busy_seconds` of inference: feeds the capacity
        estimate (rows per busy second, not per wall second, so light traffic does not look
        like a slow server), over windows of 0.05 busy seconds or 64 rows, smoothed."""
        self._rate_rows += rows
        self._rate_busy += busy_seconds
        if self._rate_busy >= 0.05 or (self._rate_rows >= 64 and self._rate_busy > 0):
            instant = self._rate_rows / self._rate_busy
            self._rate = instant if self._rate == 0 else self._rate + 0.3 * (instant - self._rate)
            self._rate_rows, self._rate_busy = 0, 0.0

    def update(self, now: float, queued_rows: int, oldest_age: float) -> int:
        """Look at the queue at `now`; returns the point index to use from now on."""
        if not self.enabled:
            return self.index
        assert self.target is not None
        backlog = queued_rows / self._rate if self._rate > 0 else 0.0
        delay = max(oldest_age, backlog)
        if delay > self.high * self.target:
            self._calm_since = None
            if self.index + 1 < len(self.points) and now - self._last_move >= self.down_dwell:
                self._move(self.index + 1, now)
        elif delay < self.low * self.target:
            if self._calm_since is None:
                self._calm_since = now
            elif self.index > 0 and now - self._calm_since >= self.up_dwell \
                    and now - self._last_move >= self.up_dwell:
                self._move(self.index - 1, now)
                self._calm_since = now
        else:
            self._calm_since = None
        return self.index

    def _move(self, index: int, now: float) -> None:
        self.index = index
        self._last_move = now
        self.moves += 1
