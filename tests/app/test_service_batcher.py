"""The batcher against a scripted runtime: order, splitting, per-row exit, early answers, limits."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from app.batcher import Batcher, QueueFull, ShuttingDown
from app.metrics import Metrics
from app.runtime import StageOutput

CLASSES = 4
BLOCKS = 3


class ScriptedRuntime:
    """Row r = [id, sure_at]: confident in class id % 4 from block `sure_at` on, unsure before."""

    def __init__(self, block_gate: dict[int, threading.Event] | None = None):
        self.manifest = SimpleNamespace(num_blocks=BLOCKS)
        self.has_stages = True
        self.gate = block_gate or {}
        self.stage_rows: list[tuple[int, int]] = []  # (block, rows) of every stage call
        self.full_calls: list[int] = []

    def _probs(self, x: np.ndarray, block: int) -> np.ndarray:
        ids, sure_at = x[:, 0, 0, 0].astype(int), x[:, 0, 0, 1]
        probs = np.full((len(x), CLASSES), 1.0 / CLASSES, dtype=np.float32)
        sure = sure_at <= block
        probs[sure] = 0.02
        probs[sure, ids[sure] % CLASSES] = 0.94
        return probs

    def run_stage(self, k: int, x: np.ndarray, rows: int) -> StageOutput:
        if k + 1 in self.gate:
            self.gate[k + 1].wait(timeout=10)
        self.stage_rows.append((k + 1, len(x)))
        return StageOutput(x, self._probs(x, k + 1))

    def run_full(self, x: np.ndarray) -> list[np.ndarray]:
        self.full_calls.append(len(x))
        return [self._probs(x, k) for k in range(1, BLOCKS + 1)]

    @staticmethod
    def select_rows(features, keep, rows):
        return features[keep]


def rows(ids, sure_at) -> np.ndarray:
    x = np.zeros((len(ids), 1, 1, 2), dtype=np.float32)  # (n, C=1, H=1, W=2)
    x[:, 0, 0, 0] = ids
    x[:, 0, 0, 1] = sure_at
    return x


THRESHOLDS = np.array([0.9, 0.9])


def run(coro):
    return asyncio.run(coro)


def test_rows_exit_at_their_block_in_request_order_across_split_batches():
    async def go():
        runtime = ScriptedRuntime()
        b = Batcher(runtime, Metrics(), max_batch_size=4, max_wait_ms=0)
        b.start()
        ids = np.arange(10)
        sure_at = np.array([1, 3, 2, 1, 3, 2, 1, 1, 2, 3])
        job = b.submit(rows(ids, sure_at), THRESHOLDS, return_blocks=True)
        await asyncio.wait_for(job.future, 5)
        await b.stop()
        return runtime, job, sure_at

    runtime, job, sure_at = run(go())
    assert job.exit_block.tolist() == sure_at.tolist()
    assert job.probs.argmax(1).tolist() == [i % CLASSES for i in range(10)]
    # split into batches of at most 4 rows; later stages see only the survivors
    assert max(r for _, r in runtime.stage_rows) <= 4
    assert sum(r for blk, r in runtime.stage_rows if blk == 1) == 10
    assert sum(r for blk, r in runtime.stage_rows if blk == 3) == int((sure_at == 3).sum())
    for i, blocks in enumerate(job.blocks):
        assert [b["block"] for b in blocks] == list(range(1, sure_at[i] + 1))
        assert [b["threshold"] for b in blocks][:-1] == [0.9] * (sure_at[i] - 1)
        assert blocks[-1]["threshold"] == (None if sure_at[i] == BLOCKS else 0.9)


def test_a_request_is_answered_while_the_rest_of_its_batch_still_runs():
    async def go():
        gate = threading.Event()
        runtime = ScriptedRuntime({2: gate})
        b = Batcher(runtime, Metrics(), max_batch_size=8, max_wait_ms=50)
        b.start()
        slow = b.submit(rows([0, 1], [3, 3]), THRESHOLDS, False)
        fast = b.submit(rows([2], [1]), THRESHOLDS, False)
        await asyncio.wait_for(fast.future, 5)  # answered after block 1 ...
        assert not slow.future.done()  # ... while block 2 waits on the gate
        gate.set()
        await asyncio.wait_for(slow.future, 5)
        await b.stop()
        return runtime, slow

    runtime, slow = run(go())
    assert runtime.stage_rows[0] == (1, 3)  # both requests shared the first batch
    assert slow.exit_block.tolist() == [3, 3]


def test_off_rows_run_the_full_graph_once_and_auto_rows_use_stages():
    async def go():
        runtime = ScriptedRuntime()
        b = Batcher(runtime, Metrics(), max_batch_size=16, max_wait_ms=0)
        b.start()
        off = b.submit(rows([0, 1, 2], [1, 1, 1]), None, True)
        auto = b.submit(rows([3], [1]), THRESHOLDS, False)
        await asyncio.gather(off.future, auto.future)
        await b.stop()
        return runtime, off, auto

    runtime, off, auto = run(go())
    assert runtime.full_calls == [3]
    assert off.exit_block.tolist() == [BLOCKS] * 3
    assert [len(bl) for bl in off.blocks] == [BLOCKS] * 3
    assert auto.exit_block.tolist() == [1]


def test_a_lone_request_does_not_wait_out_the_batch_window():
    async def go():
        b = Batcher(ScriptedRuntime(), Metrics(), max_batch_size=64, max_wait_ms=60_000)
        b.start()
        job = b.submit(rows([5], [1]), THRESHOLDS, False)
        # a minute-long window would time this out; the lone row must go at once
        await asyncio.wait_for(job.future, 10)
        await b.stop()
        return job

    assert run(go()).exit_block.tolist() == [1]


def test_queue_bound_refuses_and_shutdown_answers_everything_accepted():
    async def go():
        gate = threading.Event()
        runtime = ScriptedRuntime({1: gate})
        b = Batcher(runtime, Metrics(), max_batch_size=2, max_wait_ms=0, queue_bound=6)
        b.start()
        jobs = [b.submit(rows([i, i + 1], [1, 2]), THRESHOLDS, False) for i in range(3)]
        await asyncio.sleep(0.05)  # the first batch is taken and blocks in block 1
        jobs.append(b.submit(rows([9, 9], [1, 1]), THRESHOLDS, False))  # 4 queued + 2 = bound
        with pytest.raises(QueueFull):
            b.submit(rows([7], [1]), THRESHOLDS, False)
        b.close()
        with pytest.raises(ShuttingDown):
            b.submit(rows([8], [1]), THRESHOLDS, False)
        stopping = asyncio.create_task(b.stop())
        gate.set()
        await asyncio.wait_for(stopping, 5)
        return jobs, b

    jobs, b = run(go())
    assert all(j.future.done() and j.future.exception() is None for j in jobs)
    assert b.accepted_requests == b.answered_requests == 4


def test_invalid_batcher_settings_name_a_valid_value():
    with pytest.raises(ValueError, match="e.g. 64"):
        Batcher(ScriptedRuntime(), Metrics(), max_batch_size=0)
    with pytest.raises(ValueError, match="e.g. 2.0"):
        Batcher(ScriptedRuntime(), Metrics(), max_wait_ms=-1)
