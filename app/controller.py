"""The load controller: which operating point answers early-exit-'auto' rows right now.

The manifest lists operating points from the calibrated one (index 0) to ever cheaper ones.
With a latency target (HFF_LATENCY_TARGET_MS) the controller estimates how long the rows queued
now will wait, the larger of the oldest queued row's age (since its request arrived, so time spent
waiting for admission counts) and queued rows / capacity (rows answered per second of inference;
it sees a burst before its rows have aged), smoothed over `smoothing_s` (an exponential average
in time; default half the target), and moves:
  - one point cheaper when that estimate passes `high` x target (a quarter of it: before the
    admission queue, which waits up to HFF_QUEUE_WAIT_S, starts refusing), at most once per
    `down_dwell_s` (so a move has time to show before the next one);
  - back towards the calibrated point when the estimate stays under `low` x target and the
    dearer point would keep the inference thread at most `climb_utilization` busy (its busy
    share now x the two points' compute fractions): one point per `climb_dwell_s`, so a server
    that stepped down in a burst is back at the calibrated point within a second of the burst.
    A manifest without compute fractions climbs one point per `up_dwell_s` of calm instead.
The smoothing keeps one long stage call from moving the point: the oldest row's age peaks at
about the length of the call it waits behind (a 64-row stage of cifar-cnn takes 15-40 ms on a
shared core), which passed a quarter of a 100 ms target at half the capacity, while a real
overload keeps the estimate up and gets through within milliseconds of a large burst (a backlog
worth half a second passes a quarter of a 100 ms target within 3 ms). The gap between the bounds is the hysteresis: a load the dearer point could not carry with room
to spare keeps the cheaper point however calm the queue looks, and a load between `low` and
`high` keeps whatever point it has. The first `warmup_batches` stage calls make no moves: a cold
server (first runs of each batch size, connections being opened) queues for reasons that more
compute would not fix.

Floor: points whose accuracy lower bound (on val, at the export's confidence: the calibrated
point's accuracy minus an upper bound on what the point loses against it on the same rows) is
under HFF_MIN_ACCURACY (default: the calibrated point's expected accuracy minus 2 points) are
never used; a manifest without the bound is checked with the point's expected (val) accuracy.
Without a target the controller stays at point 0.
"""

from __future__ import annotations

import math

import numpy as np

from contract.model_dir import OperatingPoint

DEFAULT_FLOOR_MARGIN = 0.02  # the default floor: 2 points under the calibrated expected accuracy
UTILIZATION_WINDOW_S = 0.1  # wall seconds over which the inference thread's busy share is taken


def floor_accuracy(point: OperatingPoint) -> float | None:
    """What the floor is checked against: the lower bound, else the expected accuracy."""
    if point.accuracy_lower_bound is not None:
        return point.accuracy_lower_bound
    return point.expected_accuracy


def default_floor(points: list[OperatingPoint]) -> float | None:
    """HFF_MIN_ACCURACY's default: the calibrated point's expected accuracy minus 2 points."""
    calibrated = points[0].expected_accuracy
    return None if calibrated is None else calibrated - DEFAULT_FLOOR_MARGIN


class LoadController:
    def __init__(self, points: list[OperatingPoint], target_ms: float | None = None,
                 min_accuracy: float | None = None, high: float = 0.25, low: float = 0.1,
                 down_dwell_s: float | None = None, up_dwell_s: float = 1.0,
                 climb_dwell_s: float = 0.25, climb_utilization: float = 0.85,
                 warmup_batches: int = 32, smoothing_s: float | None = None):
        if not points:
            raise ValueError("at least one operating point is needed (the calibrated one)")
        if min_accuracy is None:
            min_accuracy = default_floor(points)
        self.min_accuracy = min_accuracy
        # the usable points: the calibrated one always, cheaper ones down to the floor
        usable = [points[0]]
        for p in points[1:]:
            bound = floor_accuracy(p)
            if min_accuracy is not None and (bound is None or bound < min_accuracy):
                break
            usable.append(p)
        self.points = usable
        self._thresholds = [np.asarray([math.inf if t is None else t for t in p.thresholds],
                                       dtype=np.float64) for p in usable]
        self._compute = [p.compute_fraction for p in usable]
        self.target = target_ms / 1000.0 if target_ms else None
        self.high, self.low = high, low
        self.down_dwell = down_dwell_s if down_dwell_s is not None else (
            (self.target or 0.1) / 2)
        self.up_dwell = up_dwell_s
        self.climb_dwell = climb_dwell_s
        self.climb_utilization = climb_utilization
        self.warmup_batches = warmup_batches
        self.smoothing = smoothing_s if smoothing_s is not None else (self.target or 0.1) / 2
        self.delay = 0.0  # the smoothed estimate of how long queued rows will wait, seconds
        self._last_update: float | None = None
        self.index = 0
        self.moves = 0
        self.batches = 0  # stage calls seen (the warm-up counts them)
        self._last_move = -math.inf
        self._calm_since: float | None = None
        self._rate = 0.0  # capacity: rows answered per busy second, smoothed
        self._rate_rows = 0
        self._rate_busy = 0.0
        self.utilization: float | None = None  # the inference thread's busy share, smoothed,
        self._window_start: float | None = None  # since the last move (None: not measured yet)
        self._window_busy = 0.0

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

    @property
    def warming_up(self) -> bool:
        return self.batches < self.warmup_batches

    def ran(self, busy_seconds: float, cpu_seconds: float | None = None) -> None:
        """One stage call took `busy_seconds` (wall) of the inference thread, `cpu_seconds` of
        them on a core (None: all). The capacity estimate counts wall time, since that is what
        queued rows wait for; the utilization counts CPU time: on a core shared with the HTTP
        event loop the wall time of a call includes the loop's turns, which a dearer point
        would not make longer."""
        self.batches += 1
        self._rate_busy += busy_seconds
        self._window_busy += busy_seconds if cpu_seconds is None else cpu_seconds

    def answered(self, rows: int) -> None:
        """`rows` rows were answered: with the busy seconds from `ran`, the capacity estimate
        (rows per busy second, not per wall second, so light traffic does not look like a slow
        server), over windows of 0.05 busy seconds or 64 rows, smoothed."""
        self._rate_rows += rows
        if self._rate_busy >= 0.05 or (self._rate_rows >= 64 and self._rate_busy > 0):
            instant = self._rate_rows / self._rate_busy
            self._rate = instant if self._rate == 0 else self._rate + 0.3 * (instant - self._rate)
            self._rate_rows, self._rate_busy = 0, 0.0

    def _measure_utilization(self, now: float) -> None:
        if self._window_start is None:
            self._window_start = now
            self._window_busy = 0.0
            return
        span = now - self._window_start
        if span >= UTILIZATION_WINDOW_S:
            instant = min(1.0, self._window_busy / span)
            self.utilization = instant if self.utilization is None else (
                self.utilization + 0.5 * (instant - self.utilization))
            self._window_start, self._window_busy = now, 0.0

    def climb_allowed(self) -> bool:
        """Would the next dearer point keep the inference thread under `climb_utilization`?"""
        here, dearer = self._compute[self.index], self._compute[self.index - 1]
        if not here or not dearer or self.utilization is None:
            return False
        return self.utilization * dearer / here <= self.climb_utilization

    def update(self, now: float, queued_rows: int, oldest_age: float) -> int:
        """Look at the queue at `now`; returns the point index to use from now on."""
        if not self.enabled:
            return self.index
        assert self.target is not None
        self._measure_utilization(now)
        if self.warming_up:
            return self.index
        backlog = queued_rows / self._rate if self._rate > 0 else 0.0
        delay = self._smooth(now, max(oldest_age, backlog))
        if delay > self.high * self.target:
            self._calm_since = None
            if self.index + 1 < len(self.points) and now - self._last_move >= self.down_dwell:
                self._move(self.index + 1, now)
        elif delay < self.low * self.target:
            if self._calm_since is None:
                self._calm_since = now
            if self.index > 0 and self._can_climb(now):
                self._move(self.index - 1, now)
        else:
            self._calm_since = None
        return self.index

    def _smooth(self, now: float, delay: float) -> float:
        """The delay estimate averaged exponentially over the last `smoothing` seconds."""
        if self._last_update is None or self.smoothing <= 0:
            self.delay = delay
        else:
            weight = 1.0 - math.exp(-max(0.0, now - self._last_update) / self.smoothing)
            self.delay += weight * (delay - self.delay)
        self._last_update = now
        return self.delay

    def _can_climb(self, now: float) -> bool:
        assert self._calm_since is not None
        calm = now - self._calm_since
        since_move = now - self._last_move
        if self._compute[self.index] and self._compute[self.index - 1]:
            return calm >= self.climb_dwell and since_move >= self.climb_dwell \
                and self.climb_allowed()
        # no compute fractions to predict the dearer point's load with: a slow, blind climb
        return calm >= self.up_dwell and since_move >= self.up_dwell

    def _move(self, index: int, now: float) -> None:
        self.index = index
        self._last_move = now
        self.moves += 1
        # what the thread did at the old point says little about the new one: measure afresh
        self.utilization, self._window_start, self._window_busy = None, now, 0.0
