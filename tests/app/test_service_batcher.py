"""The batcher against a scripted runtime: order, splitting, per-row exit, early answers, limits."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from app.batcher import Batcher, DeadlineExpired, QueueFull, ShuttingDown
from app.metrics import Metrics, ModelMetrics
from app.runtime import StageOutput

CLASSES = 4
BLOCKS = 3


def model_metrics() -> ModelMetrics:
    return Metrics().for_model("m", "1")


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

    def run_full(self, x: np.ndarray, shared: bool = False) -> list[np.ndarray]:
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
        b = Batcher(runtime, model_metrics(), max_batch_size=4, max_wait_ms=0)
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
        b = Batcher(runtime, model_metrics(), max_batch_size=8, max_wait_ms=50)
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
        b = Batcher(runtime, model_metrics(), max_batch_size=16, max_wait_ms=0)
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


class GatedFullRuntime(ScriptedRuntime):
    """ScriptedRuntime whose whole-graph calls wait on `gate`; `begun` lists the calls begun,
    (rows, shared) each, in the order they began."""

    def __init__(self):
        super().__init__()
        self.full_gate = threading.Event()
        self.begun: list[tuple[int, bool]] = []

    @property
    def started(self) -> int:
        return len(self.begun)

    def run_full(self, x: np.ndarray, shared: bool = False) -> list[np.ndarray]:
        self.begun.append((len(x), shared))
        self.full_gate.wait(timeout=10)
        return super().run_full(x, shared)


def test_whole_graph_batches_are_handed_to_the_thread_one_ahead():
    """While one model.onnx call runs, the next batch is taken and queued on the inference
    thread (it starts the moment the first ends, without waiting for the event loop), but no
    more than one: the rows after it stay in the queue and join a later, fuller batch. Every
    row is still answered once, in order, and shutdown waits for the calls handed over."""
    async def go():
        runtime = GatedFullRuntime()
        b = Batcher(runtime, model_metrics(), max_batch_size=8, max_wait_ms=0,
                    inline_below_ms=0.0)
        b.start()
        first = b.submit(rows([0, 1], [1, 1]), None, False)
        while runtime.started == 0:  # the first call runs (and waits on the gate)
            await asyncio.sleep(0.001)
        second = b.submit(rows([2], [1]), None, False)
        await asyncio.sleep(0.05)
        assert b.queued_rows == 0  # taken and handed to the thread behind the first call
        later = [b.submit(rows([3 + i], [1]), None, False) for i in range(3)]
        await asyncio.sleep(0.05)
        assert b.queued_rows == 3  # two calls handed over: the rest waits in the queue
        runtime.full_gate.set()
        await asyncio.wait_for(asyncio.gather(*(j.future for j in [first, second, *later])), 5)
        await b.stop()
        return runtime, [first, second, *later]

    runtime, jobs = run(go())
    assert runtime.full_calls == [2, 1, 3]  # the three later rows in one batch
    assert [j.probs.argmax(1).tolist() for j in jobs] == [[0, 1], [2], [3], [0], [1]]
    assert all(j.exit_block.tolist() == [BLOCKS] * len(j.exit_block) for j in jobs)


def test_two_whole_graph_calls_run_side_by_side_and_a_third_waits_ahead():
    """concurrent_calls=2: a second batch starts beside the running one (on its share of the
    cores: shared=True), a third is handed over to start when one ends, and the rows after it
    wait in the queue. A call that began alone has every core (shared=False)."""
    async def go():
        runtime = GatedFullRuntime()
        b = Batcher(runtime, model_metrics(), max_batch_size=12, max_wait_ms=0,
                    inline_below_ms=0.0, concurrent_calls=2)
        b.start()
        first = b.submit(rows([0, 1], [1, 1]), None, False)
        while runtime.started == 0:
            await asyncio.sleep(0.001)
        second = b.submit(rows([2], [1]), None, False)
        while runtime.started == 1:  # runs beside the first, which still waits on the gate
            await asyncio.sleep(0.001)
        third = b.submit(rows([3], [1]), None, False)
        await asyncio.sleep(0.05)
        assert b.queued_rows == 0 and runtime.started == 2  # handed over, not running yet
        later = [b.submit(rows([4 + i], [1]), None, False) for i in range(2)]
        await asyncio.sleep(0.05)
        assert b.queued_rows == 2
        runtime.full_gate.set()
        jobs = [first, second, third, *later]
        await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 5)
        await b.stop()
        return runtime, jobs

    runtime, jobs = run(go())
    assert runtime.begun[:2] == [(2, False), (1, True)]  # alone, then beside it
    assert sorted(n for n, _ in runtime.begun[2:]) == [1, 2]  # the two later rows together
    assert [j.probs.argmax(1).tolist() for j in jobs] == [[0, 1], [2], [3], [0], [1]]


def test_an_idle_thread_gets_half_a_whole_graph_batch_and_the_rest_goes_ahead():
    """Rows waiting while the inference thread is idle: half a batch starts at once and the
    rest is queued behind it (a full batch would leave the model idle while every client of
    that batch sends its next request). Rows with early exit behind them run their stages as
    before."""
    async def go():
        runtime = GatedFullRuntime()
        runtime.full_gate.set()
        b = Batcher(runtime, model_metrics(), max_batch_size=8, max_wait_ms=0,
                    inline_below_ms=0.0)
        off = b.submit(rows(list(range(8)), [1] * 8), None, False)
        staged = b.submit(rows(list(range(8, 16)), [1] * 8), THRESHOLDS, False)
        b.start()
        await asyncio.wait_for(asyncio.gather(off.future, staged.future), 5)
        await b.stop()
        return runtime, off, staged

    runtime, off, staged = run(go())
    assert runtime.full_calls == [4, 4]
    assert sum(n for block, n in runtime.stage_rows if block == 1) == 8
    assert off.probs.argmax(1).tolist() == [i % CLASSES for i in range(8)]
    assert staged.exit_block.tolist() == [1] * 8


def test_a_lone_request_does_not_wait_out_the_batch_window():
    async def go():
        b = Batcher(ScriptedRuntime(), model_metrics(), max_batch_size=64, max_wait_ms=60_000)
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
        b = Batcher(runtime, model_metrics(), max_batch_size=2, max_wait_ms=0, queue_bound=6)
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
        Batcher(ScriptedRuntime(), model_metrics(), max_batch_size=0)
    with pytest.raises(ValueError, match="e.g. 2.0"):
        Batcher(ScriptedRuntime(), model_metrics(), max_wait_ms=-1)


# --- stage-level scheduling, deadlines and the load controller (issue 14) -------------------

class HoldingRuntime(ScriptedRuntime):
    """ScriptedRuntime whose stage calls wait on `gate` when a row's id is in `held`, and
    sleep `delay` seconds per call (a synthetic slow stage)."""

    def __init__(self, held: set[int] = frozenset(), delay: float = 0.0):
        super().__init__()
        self.held, self.delay = set(held), delay
        self.hold = threading.Event()

    def run_stage(self, k, x, rows_):
        if self.held & set(x[:, 0, 0, 0].astype(int).tolist()):
            self.hold.wait(timeout=10)
        if self.delay:
            time.sleep(self.delay)
        return super().run_stage(k, x, rows_)


@pytest.mark.parametrize("scheduling", ["stage", "batch"])
def test_many_requests_lose_no_row_and_keep_their_order(scheduling):
    """Requests of random sizes and exits, mixed with early exit off, submitted while earlier
    ones run: every row answered once, at its block, in its request's order."""
    rng = np.random.default_rng(0)

    async def go():
        runtime = ScriptedRuntime()
        b = Batcher(runtime, model_metrics(), max_batch_size=8, max_wait_ms=1, scheduling=scheduling)
        b.start()
        jobs, want = [], []
        for i in range(60):
            n = int(rng.integers(1, 12))
            ids = np.arange(n) + 100 * i
            sure_at = rng.integers(1, BLOCKS + 1, n)
            off = i % 7 == 0
            jobs.append(b.submit(rows(ids, sure_at), None if off else THRESHOLDS, False))
            want.append((ids, np.full(n, BLOCKS) if off else sure_at))
            if i % 5 == 0:
                await asyncio.sleep(0.001)  # let a few stages run between arrivals
        await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 10)
        await b.stop()
        return runtime, jobs, want, b

    runtime, jobs, want, b = run(go())
    for job, (ids, blocks) in zip(jobs, want, strict=True):
        assert job.exit_block.tolist() == blocks.tolist()
        assert job.probs.argmax(1).tolist() == (ids % CLASSES).tolist()
    staged = sum(len(ids) for (ids, _), j in zip(want, jobs, strict=True) if j.thresholds is not None)
    assert sum(r for blk, r in runtime.stage_rows if blk == 1) == staged  # each row ran block 1 once
    assert b.accepted_requests == b.answered_requests == 60 and b._in_flight == 0


def test_stage_level_scheduling_runs_later_stages_at_fuller_batches():
    """Half of each batch exits at block 1: run-to-the-end runs block 2 on half batches, the
    stage-level scheduler joins the survivors of two stage-1 batches into one full batch."""
    def sizes(scheduling):
        async def go():
            runtime = ScriptedRuntime()
            b = Batcher(runtime, model_metrics(), max_batch_size=4, max_wait_ms=1000,
                        scheduling=scheduling)
            b.start()
            jobs = [b.submit(rows([4 * i + j for j in range(4)], [1, 3, 1, 3]), THRESHOLDS, False)
                    for i in range(4)]
            await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 5)
            await b.stop()
            return runtime.stage_rows, jobs
        return run(go())

    batch_calls, batch_jobs = sizes("batch")
    stage_calls, stage_jobs = sizes("stage")
    assert [r for blk, r in batch_calls if blk == 2] == [2, 2, 2, 2]
    assert [r for blk, r in stage_calls if blk == 2] == [4, 4]
    assert len(stage_calls) < len(batch_calls)
    for a, c in zip(batch_jobs, stage_jobs, strict=True):  # the same answers either way
        assert a.exit_block.tolist() == c.exit_block.tolist() == [1, 3, 1, 3]


def test_a_deadline_that_passed_answers_from_the_block_reached_or_refuses():
    async def go():
        runtime = HoldingRuntime(held={99})
        b = Batcher(runtime, model_metrics(), max_batch_size=2, max_wait_ms=1000, scheduling="stage")
        b.start()
        late = b.submit(rows([1], [3]), THRESHOLDS, True, deadline=time.monotonic() + 0.2)
        quick = b.submit(rows([2], [1]), THRESHOLDS, False)
        blocker = b.submit(rows([99, 99], [1, 1]), THRESHOLDS, False)  # holds block 1 a while
        await asyncio.wait_for(quick.future, 5)
        await asyncio.sleep(0.3)  # `late` waits for block 2 behind the held call, past its deadline
        runtime.hold.set()
        await asyncio.wait_for(asyncio.gather(late.future, blocker.future), 5)
        expired = b.submit(rows([3], [1]), THRESHOLDS, False, deadline=time.monotonic() - 1)
        with pytest.raises(DeadlineExpired, match="deadline_ms"):
            await asyncio.wait_for(expired.future, 5)
        await b.stop()
        return late, b

    late, b = run(go())
    assert late.exit_block.tolist() == [1] and late.deadline_missed.tolist() == [True]
    assert late.operating_point.tolist() == [-1]
    assert [blk["block"] for blk in late.blocks[0]] == [1]  # block 2 never ran for it
    assert b.metrics.deadline_misses.labels(outcome="answered")._value.get() == 1
    assert b.metrics.deadline_misses.labels(outcome="refused")._value.get() == 1
    assert b._in_flight == 0


def test_survivors_point_into_the_stage_output_and_are_gathered_once_in_order():
    """Segments that select rows of a shared output (no copy) and segments of their own rows,
    split and screened, join into one stage input holding exactly their rows, in order."""
    from app.batcher import Segment, stage_input

    out = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)  # a stage's output, 6 rows
    job = object()
    lazy = Segment([job] * 6, np.arange(6), out, None).select(
        np.array([True, False, True, True, False, True]), lambda f, n: f)
    assert lazy.source is out and lazy.index.tolist() == [0, 2, 3, 5]  # nothing copied
    head, tail = lazy.select(slice(None, 3), None), lazy.select(slice(3, None), None)
    own = Segment([job] * 2, np.arange(2), np.full((2, 2), -1, dtype=np.float32), None)
    joined = stage_input([tail, own, head], lambda f, n: f)
    assert joined.tolist() == [out[5].tolist(), [-1, -1], [-1, -1], out[0].tolist(),
                               out[2].tolist(), out[3].tolist()]
    assert stage_input([own], None) is own.source  # a lone whole segment passes through
    assert stage_input([head], None).tolist() == out[[0, 2, 3]].tolist()


class ThreadRecordingRuntime(ScriptedRuntime):
    """ScriptedRuntime that records the thread of every stage call; its calls cost `cpu`
    seconds of busy CPU (so the batcher's CPU measure sees them)."""

    def __init__(self, cpu: float):
        super().__init__()
        self.cpu = cpu
        self.threads: list[str] = []

    def run_stage(self, k: int, x: np.ndarray, rows: int) -> StageOutput:
        self.threads.append(threading.current_thread().name)
        end = time.thread_time() + self.cpu
        while time.thread_time() < end:
            pass
        return super().run_stage(k, x, rows)


@pytest.mark.parametrize("inline_below_ms, call_cpu, expected", [
    (50.0, 0.0, "the loop"),  # a cheap call runs where the batch is
    (0.0, 0.0, "the thread"),  # inline off: always the inference thread
    (1.0, 0.01, "the thread"),  # a call above the bound moves to the thread after the first
])
def test_small_model_calls_run_on_the_event_loop_and_large_ones_on_the_thread(
        inline_below_ms, call_cpu, expected):
    async def go():
        runtime = ThreadRecordingRuntime(call_cpu)
        b = Batcher(runtime, model_metrics(), max_batch_size=4, max_wait_ms=0,
                    inline_below_ms=inline_below_ms)
        b.start()
        for i in range(4):  # one after another: each its own stage-1 call
            job = b.submit(rows([i], [1]), THRESHOLDS, return_blocks=False)
            await asyncio.wait_for(job.future, 5)
            assert job.exit_block.tolist() == [1]
        await b.stop()
        return runtime.threads, threading.current_thread().name

    threads, loop_thread = run(go())
    later = threads[1:]  # the first call of a stage is measured where the bound sends it
    if expected == "the loop":
        assert set(threads) == {loop_thread}
    else:
        assert later and all(t.startswith("hff-infer") for t in later), threads
