"""The load controller: down the operating points when the queue would miss the target, back up
when it calms down, hysteresis in between, never below the floor; and inside the batcher under a
synthetic slow stage, where 'off' and explicit thresholds never change."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from app.batcher import Batcher
from app.controller import LoadController
from app.metrics import Metrics
from contract.model_dir import OperatingPoint
from tests.app.test_service_batcher import BLOCKS, HoldingRuntime, rows

POINTS = [OperatingPoint(thresholds=[t, t], expected_accuracy=a, compute_fraction=c)
          for t, a, c in ((0.99, 0.97, 0.9), (0.9, 0.965, 0.7), (0.5, 0.955, 0.5),
                          (0.3, 0.90, 0.3))]


def test_without_compute_fractions_it_moves_down_with_a_dwell_up_after_calm_and_stays_between():
    blind = [p.model_copy(update={"compute_fraction": None}) for p in POINTS]
    c = LoadController(blind, target_ms=100, high=0.5, low=0.15, down_dwell_s=0.05,
                       up_dwell_s=1.0, warmup_batches=0, smoothing_s=0)
    assert c.enabled and c.min_accuracy == pytest.approx(0.95)
    assert len(c.points) == 3  # point 3 (0.90) is under the default floor (0.97 - 0.02)
    assert c.update(0.0, 0, 0.06) == 1  # the oldest row waited over half the target: cheaper
    assert c.update(0.01, 0, 0.2) == 1  # within the dwell: no second move yet
    assert c.update(0.06, 0, 0.2) == 2
    assert c.update(0.2, 0, 0.5) == 2  # the floor: no cheaper point is allowed
    for t in np.arange(0.3, 3.0, 0.1):  # between the bounds (15..50 ms): it stays
        assert c.update(float(t), 0, 0.03) == 2
    assert c.update(3.0, 0, 0.001) == 2  # calm starts ...
    assert c.update(3.5, 0, 0.001) == 2
    assert c.update(4.01, 0, 0.001) == 1  # ... and after a second of it, one step back up
    assert c.update(4.5, 0, 0.03) == 1  # a moment in the middle band resets the calm
    assert c.update(5.2, 0, 0.001) == 1
    assert c.update(6.3, 0, 0.001) == 0
    assert c.thresholds.tolist() == [0.99, 0.99]


def test_a_backlog_counts_before_its_rows_have_aged():
    c = LoadController(POINTS, target_ms=100, down_dwell_s=0.0, warmup_batches=0, smoothing_s=0)
    for _ in range(10):  # 1000 rows per second of inference
        c.ran(0.1)
        c.answered(100)
    assert c.update(1.0, 20, 0.0) == 0  # 20 queued rows are 20 ms of work
    assert c.update(1.0, 30, 0.0) == 1  # 30 are 30 ms: over a quarter of the target


def test_without_a_target_or_with_a_high_floor_it_stays_at_the_calibrated_point():
    assert not LoadController(POINTS).enabled
    assert LoadController(POINTS).update(0.0, 10_000, 10.0) == 0
    c = LoadController(POINTS, target_ms=10, min_accuracy=0.969)
    assert len(c.points) == 1 and not c.enabled
    c = LoadController(POINTS, target_ms=10, min_accuracy=0.5)
    assert len(c.points) == 4


def busy(c: LoadController, start: float, stop: float, share: float, step: float = 0.01) -> None:
    """The inference thread busy `share` of the time from `start` to `stop`, the queue calm."""
    for t in np.arange(start, stop, step):
        c.ran(step * share)
        c.answered(1)
        c.update(float(t), 0, 0.001)


def test_no_moves_while_warming_up():
    c = LoadController(POINTS, target_ms=100, down_dwell_s=0.0, warmup_batches=5, smoothing_s=0)
    for i in range(5):
        assert c.update(i * 0.1, 0, 1.0) == 0  # a cold server's queue: not a reason to degrade
        c.ran(0.01)
    assert not c.warming_up
    assert c.update(1.0, 0, 1.0) == 1


def test_climbs_back_fast_when_the_dearer_point_has_room_and_not_when_it_would_not():
    c = LoadController(POINTS, target_ms=100, down_dwell_s=0.0, warmup_batches=0, smoothing_s=0)
    for t in (0.0, 0.01):
        c.update(t, 0, 1.0)
    assert c.index == 2
    # light load: at point 2 (compute 0.5) the thread is 20% busy, point 1 (0.7) would be 28%,
    # point 0 (0.9) 36%: a step every climb_dwell (0.25 s), back at point 0 within a second
    busy(c, 0.02, 0.5, share=0.2)
    assert c.index == 1
    busy(c, 0.5, 0.8, share=0.28)
    assert c.index == 0 and c.moves == 4
    # heavy load that the cheap point carries at 70% busy: point 1 would be 98%, over the
    # climb utilization (85%), so the calm queue does not bring it back (hysteresis)
    for t in (1.0, 1.01):
        c.update(t, 0, 1.0)
    assert c.index == 2
    busy(c, 1.02, 4.0, share=0.7)
    assert c.index == 2


def test_one_long_stage_call_does_not_move_it_but_a_sustained_queue_does():
    """At half capacity the oldest row's age peaks at the length of the stage call it waits
    behind (30 ms here, over a quarter of the 100 ms target) and is back to a few ms after it:
    the smoothed estimate stays under the bound. A queue that stays at 40 ms moves it down
    within a few updates, and a large burst at the first look."""
    c = LoadController(POINTS, target_ms=100, down_dwell_s=0.0, warmup_batches=0)
    assert c.smoothing == pytest.approx(0.05)  # half the target
    t = 0.0
    for _ in range(50):  # each period: 5 ms waits, then a 30 ms call with a row waiting 30 ms
        for age in (0.005, 0.005, 0.03):
            t += 0.01 if age < 0.03 else 0.03
            assert c.update(t, 0, age) == 0
    looks = 0
    while c.index == 0 and looks < 20:  # sustained: every look, 10 ms apart, sees 40 ms
        looks += 1
        c.update(t + 0.01 * looks, 0, 0.04)
    assert c.index == 1 and looks <= 6
    burst = LoadController(POINTS, target_ms=100, down_dwell_s=0.0, warmup_batches=0)
    burst.update(0.0, 0, 0.002)
    assert burst.update(0.01, 0, 0.5) == 1  # half a second of queue: over 25 ms at once


def test_the_floor_is_checked_against_the_accuracy_lower_bound():
    """Point 1 measured 96.5% on val but, with the few rows behind it, is only shown to keep
    94%: under the default floor (95%), so neither it nor the points after it are used."""
    bounded = [POINTS[0].model_copy(update={"accuracy_lower_bound": 0.97}),
               POINTS[1].model_copy(update={"accuracy_lower_bound": 0.94}),
               POINTS[2].model_copy(update={"accuracy_lower_bound": 0.955})]
    c = LoadController(bounded, target_ms=100)
    assert c.min_accuracy == pytest.approx(0.95) and len(c.points) == 1 and not c.enabled
    bounded[1] = bounded[1].model_copy(update={"accuracy_lower_bound": 0.951})
    assert len(LoadController(bounded, target_ms=100).points) == 3


def test_the_batcher_degrades_auto_under_a_slow_stage_and_recovers_but_never_off_or_fixed():
    """A stage that takes 20 ms with a 30 ms target: the queue outgrows the target, 'auto' rows
    move to cheaper points; 'off' rows still run every block and an explicit threshold keeps
    its value. When the stage is fast again and traffic is light, the point goes back to 0."""
    points = [OperatingPoint(thresholds=[1.0, 1.0], expected_accuracy=0.97, compute_fraction=1.0),
              OperatingPoint(thresholds=[0.9, 0.9], expected_accuracy=0.96, compute_fraction=0.5)]

    async def go():
        runtime = HoldingRuntime(delay=0.02)
        controller = LoadController(points, target_ms=30, up_dwell_s=0.3, warmup_batches=4)
        metrics = Metrics().for_model("m", "1")
        b = Batcher(runtime, metrics, max_batch_size=4, max_wait_ms=0, controller=controller)
        b.start()
        # rows sure from block 1 on: point 0 (threshold 1.0) never exits early, point 1 does
        auto = [b.submit(rows([i] * 4, [1] * 4), controller.thresholds, True, adaptive=True)
                for i in range(20)]
        off = b.submit(rows([7, 7], [1, 1]), None, True)
        fixed = b.submit(rows([8, 8], [1, 1]), np.array([0.93, 0.93]), True)
        await asyncio.wait_for(asyncio.gather(*(j.future for j in auto), off.future,
                                              fixed.future), 20)
        lowest = metrics.operating_point._value.get()
        moved_down = controller.index
        runtime.delay = 0.0
        recovered = []
        t_end = time.monotonic() + 5
        while time.monotonic() < t_end and controller.index != 0:
            job = b.submit(rows([1], [1]), controller.thresholds, False, adaptive=True)
            await asyncio.wait_for(job.future, 5)
            recovered.append(int(job.operating_point[0]))
            await asyncio.sleep(0.05)
        await b.stop()
        return auto, off, fixed, moved_down, lowest, controller, recovered

    auto, off, fixed, moved_down, lowest, controller, recovered = run(go())
    assert moved_down == 1 and lowest == 1
    answered_by = np.concatenate([j.operating_point for j in auto])
    assert (answered_by == 1).any()  # some auto rows were answered at the cheaper point ...
    exits = np.concatenate([j.exit_block for j in auto])
    # ... and early, which point 0 never does (a row answered by the last block after the move
    # counts as point 1's: the point in effect when it was answered)
    assert (exits[answered_by == 1] < BLOCKS).any()
    assert (exits[answered_by == 0] == BLOCKS).all()
    assert off.exit_block.tolist() == [BLOCKS, BLOCKS] and off.operating_point.tolist() == [-1, -1]
    assert fixed.exit_block.tolist() == [1, 1] and fixed.operating_point.tolist() == [-1, -1]
    assert [blk["threshold"] for blk in fixed.blocks[0]] == [0.93]  # its own, not the point's
    assert controller.index == 0 and recovered[-1] == 0


def run(coro):
    return asyncio.run(coro)
