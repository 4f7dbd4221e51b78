"""Dynamic batcher with per-sample early exit and stage-level scheduling (docs/architecture.md,
"The batcher and early exit").

Each stage (block) has its own queue. New rows join stage 1's; after a stage runs, the rows whose
confidence reaches their threshold are answered at once and the others join the next stage's
queue with the features the stage produced. One worker thread runs one stage at a time; between
calls the scheduler (on the event loop, which owns every queue) picks the stage to run next:

  - `batch` (default; run-to-the-end, the classic batcher): always the deepest non-empty
    stage, so a batch's survivors run to the last block before stage 1 takes new rows.
  - `stage`: the deepest stage holding a full batch (max_batch_size rows), else
    the deepest non-empty stage; but a deeper stage whose oldest row has waited there longer
    than the batch window plus one pass of the network (the recent time of a stage call x the
    number of blocks) goes before a full batch, the deepest such. (An age rule that applied
    to every stage, stage 1 included, let new rows in stage 1 overtake the survivors at every
    block, with the same result as fullest-first below.) Full batches first is meant to raise
    throughput at saturation: the rows that leave early make room in stage 1 for new arrivals at once, and
    the survivors of several stage-1 batches fill one batch of stage 2 instead of each running
    as a small remnant; the age bound keeps survivors from starving behind a stage 1 that is
    always full. Without a full batch anywhere the survivors go first, as run-to-the-end: a
    fullest-first rule there (tried) made survivors wait at every stage for a queue to become
    the fullest, which under open-loop load added the patience once per block (p50 14 ms
    against 5 ms at half capacity) and, past capacity, let the latency and the 429s feed each
    other until goodput collapsed. On the CPU the fuller batches buy little (onnxruntime's
    cost per row is nearly flat from batch 8 up): the two measure level at saturation
    (1.00-1.02x, README "Overload benchmark"), and run-to-the-end stays the default.

Whole-graph calls (rows with early exit off) on CPU run `concurrent_calls` at a time (2 by
default, HFF_CONCURRENT_CALLS), each on its share of the cores, and one more is queued ahead:
while the calls run, the scheduler takes the next batch half a call before the first of them
should end (calls vary by a few ms: taken 2 ms ahead, 4 in 10 ended first) and hands it to the
inference threads, which start it the moment a call ends, while the event loop answers the
finished call's rows. A thread whose call has ended takes the rows there are at once, up to a
third of a batch, rather than waiting for more while its core idles. A call started when none
has run beside another for OVERLAP_MEMORY (a lone request under light load) uses every core. On
cifar-cnn at 64 connections one call at a time on both cores waited 10-20% of the time for the
loop between calls, and ran 5-15% slower than in process while the loop took a core from under
one of its two threads (they meet at every operator); two one-core calls side by side are
independent (README, "Request path"). Stage calls are not run side by side nor queued ahead:
a stage's survivors join the next stage's queue only once it has run, and the scheduler picks
among the queues after each call.

When stage 1 would run a partial batch and no other stage has work, it waits for more rows
under load only (the batch is not a lone row and the last one was not either), until its
oldest row has waited max_wait, so a lone request never sits out the batch window. Rows with
early exit off run model.onnx in one call. 'auto' rows take their thresholds from the load
controller (app.controller) when their stage runs. A row whose request deadline (deadline_ms)
has passed before its next stage starts is answered from the block it reached; one that reached
none yet fails its request with DeadlineExpired (503).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from app.controller import LoadController
from app.metrics import Metrics
from app.runtime import ModelRuntime

log = logging.getLogger(__name__)

Scheduling = Literal["stage", "batch"]

LEAD = 0.002  # seconds before a running call's expected end that the next batch is taken,
LEAD_SHARE = 0.5  # plus this share of the call's expected time
OVERLAP_MEMORY = 0.1  # seconds after calls last overlapped that new ones still share the cores
SMOOTHING = 0.2  # weight of the newest sample in the batcher's running averages of call times


class QueueFull(Exception):
    """The queue bound would be passed: answer 429 with Retry-After."""


class ShuttingDown(Exception):
    """The batcher no longer accepts work: answer 503 with Retry-After."""


class DeadlineExpired(Exception):
    """The request's deadline passed before any of its rows reached a block: answer 503."""


@dataclass(eq=False)
class Job:
    """One request's rows and, as they arrive, their results. When every row has exited (or the
    job failed) it resolves `future`, or, on app.hotpath's route, calls `notify(job)`: a plain
    callback costs no Future and no task wake-up per request."""

    x: np.ndarray  # (n, C, H, W) float32
    thresholds: np.ndarray | None  # (L-1,) per-block exit thresholds (inf = never); None = off
    return_blocks: bool
    future: asyncio.Future | None = None
    notify: Callable[[Job], None] | None = None
    adaptive: bool = False  # 'auto': the load controller's current point decides the thresholds
    deadline: float | None = None  # time.monotonic() by which rows must start their next block
    enqueued: float = field(default_factory=time.monotonic)
    arrived: float | None = None  # when the request arrived (before admission); None: enqueued
    probs: np.ndarray | None = None  # (n, num_classes): the exit block's probabilities
    exit_block: np.ndarray | None = None  # (n,) 1-based
    operating_point: np.ndarray | None = None  # (n,) index of the point that answered; -1 none
    deadline_missed: np.ndarray | None = None  # (n,) answered early because the deadline passed
    blocks: list[list[dict[str, Any]]] | None = None  # per row, every block that ran
    remaining: int = 0
    abandoned: bool = False  # the caller gave up (timeout): skip rows not started yet
    error: BaseException | None = None  # why the job failed
    done: bool = False  # answered, failed or given up: nothing more happens to it
    timer: asyncio.TimerHandle | None = None  # app.service's request deadline

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        self.remaining = n
        self.exit_block = np.zeros(n, dtype=np.int64)
        self.operating_point = np.empty(n, dtype=np.int64)
        self.operating_point.fill(-1)  # np.full's Python wrapper costs more than the array
        self.deadline_missed = np.zeros(n, dtype=bool)
        if self.return_blocks:
            self.blocks = [[] for _ in range(n)]

    def finish(self, error: BaseException | None = None) -> None:
        """Resolve the job once: its rows are all answered, or it failed with `error`."""
        if self.done or (self.future is not None and self.future.done()):
            return
        self.done = True
        self.error = error
        if self.future is not None:
            if error is None:
                self.future.set_result(self)
            else:
                self.future.set_exception(error)
        elif self.notify is not None:
            self.notify(self)

    @property
    def settled(self) -> bool:
        """Nothing more to do for it: resolved, or its waiter was cancelled."""
        return self.done or (self.future is not None and self.future.done())


@dataclass(eq=False)
class Segment:
    """Rows waiting for one stage, in request order: rows of one job are contiguous.

    Survivors of a stage keep pointing into the stage's output (`source` + `index`) instead of
    being copied out of it: when the next stage's batch joins several segments, their rows are
    gathered once, straight into its input (a copy on leaving the stage and another on joining
    was the stage-level scheduler's extra cost against run-to-the-end)."""

    jobs: list[Job]  # per row: its request
    rows: np.ndarray  # per row: its position in the request
    source: Any  # the stage's input rows: images for stage 1, then the last stage's features
    probs: np.ndarray | None  # (n, num_classes) the last block's output; None before block 1
    entered: float = field(default_factory=time.monotonic)  # joined this stage's queue
    index: np.ndarray | None = None  # which rows of `source` (a host array) are this segment's;
    #                                  None: its first `size` rows (a device value may hold more)

    @property
    def size(self) -> int:
        return len(self.rows)

    def _with(self, keep: slice | np.ndarray, index: np.ndarray | None, source: Any) -> Segment:
        jobs = self.jobs[keep] if isinstance(keep, slice) else \
            [j for j, k in zip(self.jobs, keep, strict=True) if k]
        return Segment(jobs, self.rows[keep], source,
                       None if self.probs is None else self.probs[keep], self.entered, index)

    def select(self, keep: slice | np.ndarray, to_host) -> Segment:
        """The rows `keep` picks (a slice or a boolean mask), without copying features."""
        if self.index is not None:
            return self._with(keep, self.index[keep], self.source)
        if isinstance(keep, slice):  # a view of host rows, or of the device value's copy
            return self._with(keep, None, to_host(self.source, self.size)[keep])
        return self._with(keep, np.flatnonzero(keep), to_host(self.source, self.size))


def stage_input(segments: list[Segment], to_host) -> Any:
    """The segments' rows as one array (their features gathered in one copy); a lone segment
    of whole rows passes through as it is (a device value stays on the device)."""
    first = segments[0]
    if len(segments) == 1 and first.index is None:
        return first.source
    if len(segments) == 1:
        return np.take(first.source, first.index, axis=0)
    sources = [s.source if s.index is not None else to_host(s.source, s.size) for s in segments]
    out = np.empty((sum(s.size for s in segments), *sources[0].shape[1:]), sources[0].dtype)
    start = 0
    for seg, source in zip(segments, sources, strict=True):
        stop = start + seg.size
        if seg.index is None:
            out[start:stop] = source[:seg.size]
        else:
            np.take(source, seg.index, axis=0, out=out[start:stop])
        start = stop
    return out


def running_average(old: float | None, new: float) -> float:
    """`new` folded into the running average `old`; None (no sample yet): `new` starts it."""
    return new if old is None else old + SMOOTHING * (new - old)


def on_thread_clock(fn, *args) -> tuple[Any, float, float]:
    """fn(*args), the wall seconds it took and the CPU seconds the calling thread spent in it
    (the inference thread's own work, without the time it waited for the core while the event
    loop held it). Both are measured where fn runs: a call queued behind another does not count
    its wait."""
    started, cpu = time.perf_counter(), time.thread_time()
    out = fn(*args)
    return out, time.perf_counter() - started, time.thread_time() - cpu


def job_runs(jobs: list[Job]) -> list[tuple[Job, int, int]]:
    """(job, start, stop) of each run of consecutive rows of one request."""
    runs, start = [], 0
    for job, group in itertools.groupby(jobs):
        n = sum(1 for _ in group)
        runs.append((job, start, start + n))
        start += n
    return runs


class ThreadCall(NamedTuple):
    """An inference thread's last call: when it began, its rows (0 for a stage call, whose
    end the scheduler awaits rather than predicts) and whether it has ended."""

    started: float
    rows: int
    ended: bool = False


class Batcher:
    """Per-stage queues + a scheduler task + one inference thread, for one ModelRuntime."""

    def __init__(self, runtime: ModelRuntime, metrics: Metrics, max_batch_size: int = 64,
                 max_wait_ms: float = 2.0, queue_bound: int = 4096,
                 scheduling: Scheduling = "batch", controller: LoadController | None = None,
                 inline_below_ms: float = 0.0, concurrent_calls: int = 1):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1 (e.g. 64), got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more (e.g. 2.0), got {max_wait_ms}")
        if queue_bound < 1:
            raise ValueError(f"queue_bound must be at least 1 (e.g. 4096), got {queue_bound}")
        if concurrent_calls < 1:
            raise ValueError(f"concurrent_calls must be at least 1, got {concurrent_calls}")
        if scheduling not in ("stage", "batch"):
            raise ValueError(f"scheduling must be 'stage' or 'batch', got {scheduling!r}")
        self.runtime = runtime
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue_bound = queue_bound
        self.scheduling = scheduling
        self.controller = controller
        # model calls whose recent CPU time is under this run on the event loop (0: never)
        self.inline_below = inline_below_ms / 1000.0
        self._call_cpu: dict[int, float] = {}  # smoothed CPU seconds of one call, by stage
        self.num_blocks = runtime.manifest.num_blocks
        self._queues: list[list[Segment]] = [[] for _ in range(self.num_blocks)]
        self._queued = [0] * self.num_blocks  # rows per stage queue
        self._in_flight = 0  # accepted rows not answered yet
        self._stage_seconds = 0.0  # recent duration of one stage call (smoothed)
        self._arrived = asyncio.Event()
        self._closing = False
        self._last_rows = 0
        self._task: asyncio.Task | None = None
        self.concurrent_calls = concurrent_calls
        self._executor = ThreadPoolExecutor(max_workers=concurrent_calls,
                                            thread_name_prefix="hff-infer")
        self._ahead: set[asyncio.Task] = set()  # whole-graph calls handed to the threads
        self._running: dict[int, ThreadCall] = {}  # inference thread -> its last call
        self._row_seconds = 0.0  # recent wall seconds per row of a whole-graph call
        self._overlapped = -math.inf  # when a whole-graph call last started beside others
        self.accepted_requests = 0
        self.answered_requests = 0
        # queue gauges read when /metrics is scraped: set on every change they cost a lock (and
        # a labels() lookup) per request
        metrics.in_flight.set_function(lambda: self._in_flight)
        metrics.queue_depth.set_function(lambda: self.queued_rows)
        for stage in range(self.num_blocks):
            metrics.stage_queue_depth.labels(stage=str(stage + 1)).set_function(
                lambda stage=stage: self._queued[stage])
        self._publish_point()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._schedule_forever(), name="hff-batcher")

    async def stop(self) -> None:
        """Refuse new work, answer everything accepted, then stop the scheduler and thread."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
        log.info("batcher stopped: %d requests accepted, %d answered", self.accepted_requests,
                 self.answered_requests)

    def close(self) -> None:
        """Stop accepting work now (SIGTERM); stop() still drains what was accepted."""
        self._closing = True

    @property
    def queued_rows(self) -> int:
        return sum(self._queued)

    # --- submission ------------------------------------------------------------------------

    def submit(self, x: np.ndarray, thresholds: np.ndarray | None, return_blocks: bool,
               adaptive: bool = False, deadline: float | None = None,
               arrived: float | None = None, notify: Callable[[Job], None] | None = None) -> Job:
        """Queue a request's rows; when every row has exited the job calls `notify`, or, without
        one, resolves its future."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        n = x.shape[0]
        queued = self.queued_rows
        if queued + n > self.queue_bound:
            raise QueueFull(f"the queue is full ({queued} of {self.queue_bound} instances "
                            "waiting)")
        job = Job(x=x, thresholds=thresholds, return_blocks=return_blocks, adaptive=adaptive,
                  deadline=deadline, arrived=arrived, notify=notify,
                  future=None if notify is not None else asyncio.get_running_loop().create_future())
        self._push(0, Segment([job] * n, np.arange(n), x, None, job.enqueued))
        self._in_flight += n
        self.accepted_requests += 1
        self._arrived.set()
        return job

    def abandon(self, job: Job) -> None:
        """The caller stopped waiting (timeout or disconnect): drop its rows not yet started."""
        job.abandoned = True

    # --- queues ----------------------------------------------------------------------------

    def _push(self, stage: int, segment: Segment) -> None:
        self._queues[stage].append(segment)
        self._queued[stage] += segment.size

    def _host(self, features: Any, rows: int) -> np.ndarray:
        return features if isinstance(features, np.ndarray) else self.runtime.to_host(features, rows)

    def _stage_call(self, stage: int, batch: list[Segment], rows: int) -> Any:
        """On the inference thread: gather the batch's input, then run the stage on it."""
        return self.runtime.run_stage(stage, stage_input(batch, self._host), rows)

    def _take(self, stage: int, limit: int) -> list[Segment]:
        """Up to `limit` rows from the head of a stage's queue, in order; a segment larger than
        what is left is split (its first rows go now)."""
        queue, taken, now = self._queues[stage], [], time.monotonic()
        while queue and limit > 0:
            seg = queue[0]
            if seg.size <= limit:
                queue.pop(0)
                piece = seg
            else:
                piece = seg.select(slice(None, limit), self._host)
                queue[0] = seg.select(slice(limit, None), self._host)
            self._queued[stage] -= piece.size
            limit -= piece.size
            if stage == 0:
                self.metrics.queue_wait.observe(now - piece.entered)
            piece = self._screen(stage, piece, now)
            if piece is not None:
                taken.append(piece)
        return taken

    def _screen(self, stage: int, seg: Segment, now: float) -> Segment | None:
        """Drop the rows of abandoned requests; answer (or refuse) those past their deadline."""
        if all(not job.abandoned and not job.settled
               and (job.deadline is None or now <= job.deadline) for job in seg.jobs):
            return seg  # the usual case, without an array per segment
        keep = np.ones(seg.size, dtype=bool)
        for job, lo, hi in job_runs(seg.jobs):
            if job.abandoned or job.settled:
                keep[lo:hi] = False
                self._release(job, hi - lo)
            elif job.deadline is not None and now > job.deadline:
                keep[lo:hi] = False
                if seg.probs is None:  # no block reached: the request cannot be answered
                    self.metrics.deadline_misses.labels(outcome="refused").inc(hi - lo)
                    job.abandoned = True
                    job.finish(DeadlineExpired(
                        "the request's deadline (deadline_ms) passed before its instances "
                        "reached the first block"))
                    self._release(job, hi - lo)
                else:  # answered by the block it reached
                    self.metrics.deadline_misses.labels(outcome="answered").inc(hi - lo)
                    job.deadline_missed[seg.rows[lo:hi]] = True
                    self._deliver(job, seg.rows[lo:hi], seg.probs[lo:hi], stage, -1)
        if keep.all():
            return seg
        if not keep.any():
            return None
        return seg.select(keep, self._host)

    # --- scheduling ------------------------------------------------------------------------

    def _pick(self, now: float) -> int | None:
        """The stage to run next (module docstring), None when every queue is empty."""
        busy = [k for k in range(self.num_blocks) if self._queued[k]]
        if not busy:
            return None
        if self.scheduling == "batch" or len(busy) == 1:
            return busy[-1]
        full = [k for k in busy if self._queued[k] >= self.max_batch_size]
        if not full:
            return busy[-1]
        patience = self.max_wait + self._stage_seconds * self.num_blocks
        overdue = [k for k in busy if k > full[-1]
                   and now - self._queues[k][0].entered > patience]
        return overdue[-1] if overdue else full[-1]

    def _oldest_age(self, now: float) -> float:
        """How long the oldest queued row's request has been waiting, admission included."""
        ages = [now - (q[0].jobs[0].arrived or q[0].jobs[0].enqueued) for q in self._queues if q]
        return max(ages, default=0.0)

    def _steer(self) -> None:
        """Let the load controller look at the queues (it may move the operating point)."""
        if self.controller is None or not self.controller.enabled:
            return
        now = time.monotonic()
        before = self.controller.index
        if self.controller.update(now, self.queued_rows, self._oldest_age(now)) != before:
            log.info("operating point %d -> %d (expected accuracy %.4f)", before,
                     self.controller.index, self.controller.point.expected_accuracy or 0.0)
            self._publish_point()

    def _publish_point(self) -> None:
        if self.controller is None:
            return
        self.metrics.operating_point.set(self.controller.index)
        accuracy = self.controller.point.expected_accuracy
        self.metrics.operating_point_accuracy.set(math.nan if accuracy is None else accuracy)

    async def _wait_for_work(self) -> bool:
        """Wait until rows arrive; False once closing with nothing left. Looks at the load
        while idle too, so the controller can move back up when traffic stops."""
        while not any(self._queued):
            if self._closing:
                return False
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), 0.25)
            except TimeoutError:
                self._steer()
        return True

    async def _fill_stage_one(self, batch: list[Segment], limit: int) -> list[Segment]:
        """Stage 1 with a partial batch (of at most `limit` rows) and nothing else to do: wait
        for more, under load only."""
        rows = sum(s.size for s in batch)
        if not batch or rows >= limit or self.max_wait <= 0 or self._closing \
                or (rows <= 1 and self._last_rows <= 1) or any(self._queued[1:]):
            return batch
        deadline = min(s.entered for s in batch) + self.max_wait
        while rows < limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not self._queued[0]:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            more = self._take(0, limit - rows)
            batch += more
            rows += sum(s.size for s in more)
        return batch

    async def _schedule_forever(self) -> None:
        while await self._wait_for_work():
            calls = self.concurrent_calls
            if len(self._ahead) > calls:  # every thread busy and the next call waiting
                await asyncio.wait(self._ahead, return_when=asyncio.FIRST_COMPLETED)
                continue
            if len(self._ahead) == calls:  # take the next batch half a call before one ends
                # (at once when one has ended and the loop has not yet heard); calls of 30 ms
                # vary by a few ms: 2 ms ahead, 4 in 10 ended before the next batch was taken
                # and the thread waited 5-7 ms for a loop busy answering and reading requests
                ends = [call.started + self._row_seconds * call.rows * (1.0 - LEAD_SHARE) - LEAD
                        if not call.ended else -math.inf for call in list(self._running.values())]
                wait = min(ends, default=0.0) - time.monotonic()
                if wait > 0:
                    await asyncio.wait(self._ahead, timeout=wait)
                    continue
            self._steer()
            stage = self._pick(time.monotonic())
            if stage is None:
                continue
            limit = self.max_batch_size
            idle = stage == 0 and self._thread_free() and self._goes_ahead(self._queues[0][:1])
            if idle:
                # a thread is idle: part of a batch now, and the next taken while it runs; a
                # full one (or a wait for it) left the model idle while every client's next
                # request came in (one batch of 64 at 64 connections, not batches in turn)
                limit = max(1, self.max_batch_size // (calls + 1))
            batch = self._take(stage, limit)
            # a thread idle beside a running call takes the rows there are: waiting for a
            # fuller batch left its core idle while the rows came in one by one
            if stage == 0 and not (idle and self._ahead):
                batch = await self._fill_stage_one(batch, limit)
            if not batch:
                continue
            rows = sum(s.size for s in batch)
            if stage == 0:
                self._last_rows = rows
            self.metrics.batch_size.observe(rows)
            if stage == 0 and self._goes_ahead(batch):
                task = asyncio.create_task(self._run_or_fail(stage, batch, rows, ahead=True,
                                                             shared=self._beside_others()))
                self._ahead.add(task)
                task.add_done_callback(self._ahead.discard)
                continue
            if self._ahead:  # a stage call goes after the calls handed over already
                await asyncio.wait(self._ahead)
            await self._run_or_fail(stage, batch, rows)
        if self._ahead:
            await asyncio.wait(self._ahead)

    def _thread_free(self) -> bool:
        """Is an inference thread without a call now? Also when its call has ended and the
        loop has not yet answered its rows (its task is still in `_ahead`)."""
        return len(self._ahead) < self.concurrent_calls or any(
            call.ended for call in list(self._running.values()))

    def _beside_others(self) -> bool:
        """Will the next whole-graph call run beside others (and so on its share of the
        cores)? Yes while calls are in flight, and for a moment after: under steady load the
        calls in flight drop to none between two batches now and then, and a call on every
        core that then overlaps the next one (threads + 1 on the cores) held both up. A lone
        request at light load runs on every core."""
        now = time.monotonic()
        if self._ahead and self.concurrent_calls > 1:
            self._overlapped = now
        return now - self._overlapped < OVERLAP_MEMORY

    def _goes_ahead(self, segments: list[Segment]) -> bool:
        """Stage 1's `segments` are one model.onnx call on the inference thread: it may be
        queued there behind the call running now (module docstring)."""
        if not segments or self._call_cpu.get(-1, 0.0) < self.inline_below:
            return False
        return not self.runtime.has_stages or all(s.jobs[0].thresholds is None for s in segments)

    async def _run_or_fail(self, stage: int, batch: list[Segment], rows: int,
                           ahead: bool = False, shared: bool = False) -> None:
        try:
            await self._run(stage, batch, ahead, shared)
        except Exception as e:  # a bug or a broken graph: fail these requests, keep serving
            log.exception("stage %d on %d rows failed", stage + 1, rows)
            for seg in batch:
                for job, lo, hi in job_runs(seg.jobs):
                    job.finish(e)
                    job.abandoned = True  # its rows in other queues are dropped
                    self._release(job, hi - lo)

    # --- running a stage -------------------------------------------------------------------

    async def _run(self, stage: int, batch: list[Segment], ahead: bool = False,
                   shared: bool = False) -> None:
        """Run a batch and deliver what it answers; `ahead`: a whole-graph call handed to the
        inference threads (never on the loop, which may be running another); `shared`: it
        runs beside other calls, on its share of the cores."""
        if stage == 0:
            off = [s for s in batch if s.jobs[0].thresholds is None or not self.runtime.has_stages]
            if off:
                batch = [s for s in batch if s not in off]
                x = stage_input(off, self._host)
                n = len(x)
                per_block, seconds, cpu = await self._call(-1, self.runtime.run_full, x, shared,
                                                           on_thread=ahead, rows=n)
                # busy seconds of the model: a call beside others had a share of the cores
                self._ran(seconds / self.concurrent_calls if shared else seconds, cpu)
                per_row = seconds / n
                self._row_seconds = running_average(self._row_seconds or None, per_row)
                self._answer_full(off, per_block)
            if not batch:
                return
        rows = sum(s.size for s in batch)
        out, seconds, cpu = await self._call(stage, self._stage_call, stage, batch, rows)
        self._stage_seconds = running_average(self._stage_seconds, seconds)
        self._ran(seconds, cpu)
        self._after_stage(stage, batch, out)

    async def _call(self, key: int, fn, *args, on_thread: bool = False, rows: int = 0
                    ) -> tuple[Any, float, float]:
        """fn(*args) (stage `key`, -1: the whole graph), its wall and CPU seconds: on the event loop
        when its recent calls took less CPU than `inline_below`, else on the inference thread.
        For a small model the hand-off to the thread and the GIL's way back to the loop cost
        more than running the call where the batch already is (README, "Request path")."""
        recent = self._call_cpu.get(key, 0.0)
        if recent < self.inline_below and not on_thread:
            out, seconds, cpu = on_thread_clock(fn, *args)
            await asyncio.sleep(0)  # let the loop read what arrived meanwhile before the next pick
        else:
            out, seconds, cpu = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._on_thread, rows, fn, *args)
        self._call_cpu[key] = running_average(self._call_cpu.get(key), cpu)
        return out, seconds, cpu

    def _on_thread(self, rows: int, fn, *args) -> tuple[Any, float, float]:
        """On an inference thread: note when the call began and on how many rows of a
        whole-graph call (the scheduler takes the next batch ahead of such a call's expected
        end; 0 for a stage call), then run it."""
        me = threading.get_ident()
        call = self._running[me] = ThreadCall(time.monotonic(), rows)
        try:
            return on_thread_clock(fn, *args)
        finally:
            self._running[me] = call._replace(ended=True)  # a thread free for the next batch now

    def _ran(self, seconds: float, cpu_seconds: float) -> None:
        if self.controller is not None:
            self.controller.ran(seconds, cpu_seconds)

    def _answer_full(self, segments: list[Segment], per_block: list[np.ndarray]) -> None:
        stacked = np.stack(per_block, axis=1)  # (rows, L, num_classes)
        start = 0
        for seg in segments:
            for job, lo, hi in job_runs(seg.jobs):
                probs = stacked[start + lo:start + hi]
                if job.blocks is not None:
                    for r, p in zip(seg.rows[lo:hi], probs, strict=True):
                        job.blocks[r] = [{"block": k + 1, "probabilities": p[k], "threshold": None}
                                         for k in range(self.num_blocks)]
                self._deliver(job, seg.rows[lo:hi], probs[:, -1], self.num_blocks, -1)
            start += seg.size
        self.metrics.exits.labels(block=str(self.num_blocks)).inc(start)

    def _after_stage(self, stage: int, batch: list[Segment], out) -> None:
        """Answer the rows that exit at this block; queue the others for the next stage."""
        jobs = [j for s in batch for j in s.jobs]
        rows = np.concatenate([s.rows for s in batch])
        probs = out.probs  # (n, num_classes)
        last = stage == self.num_blocks - 1
        point = self.controller.index if self.controller is not None else 0
        runs = job_runs(jobs)
        if last:
            thresholds = np.full(len(rows), math.nan)
            exits = np.ones(len(rows), dtype=bool)
        else:
            adaptive_t = self.controller.thresholds[stage] if self.controller is not None else None
            thresholds = np.empty(len(rows))
            for job, lo, hi in runs:
                thresholds[lo:hi] = adaptive_t if job.adaptive and adaptive_t is not None \
                    else job.thresholds[stage]
            exits = probs.max(axis=1) >= thresholds
        leaves = exits.tolist()
        for job, lo, hi in runs:
            if job.blocks is not None:
                for i in range(lo, hi):
                    t = thresholds[i]
                    job.blocks[rows[i]].append({"block": stage + 1, "probabilities": probs[i],
                                                "threshold": float(t) if math.isfinite(t) else None})
            if hi - lo == 1:  # a one-row run (most requests): slices, no index arrays
                if leaves[lo]:
                    self._deliver(job, rows[lo:hi], probs[lo:hi], stage + 1,
                                  point if job.adaptive else -1)
                continue
            leaving = np.flatnonzero(exits[lo:hi]) + lo
            if len(leaving):
                self._deliver(job, rows[leaving], probs[leaving], stage + 1,
                              point if job.adaptive else -1)
        if exits.any():
            self.metrics.exits.labels(block=str(stage + 1)).inc(int(exits.sum()))
        if last or exits.all():
            return
        keep = ~exits
        kept = [j for j, k in zip(jobs, keep, strict=True) if k]
        if isinstance(out.features, np.ndarray) and 2 * len(kept) >= len(rows):
            # most rows go on: point into the output and gather them with the next stage's input
            # (fewer would pin a whole output for a few rows: copy those out now)
            self._push(stage + 1, Segment(kept, rows[keep], out.features, probs[keep],
                                          index=np.flatnonzero(keep)))
        else:
            self._push(stage + 1, Segment(kept, rows[keep],
                                          self.runtime.select_rows(out.features, keep, len(rows)),
                                          probs[keep]))

    # --- delivery (event loop) -------------------------------------------------------------

    def _deliver(self, job: Job, idx: np.ndarray, probs: np.ndarray, block: int,
                 point: int) -> None:
        if job.probs is None and len(job.exit_block) == 1:  # a one-row request
            job.probs = np.array(probs, dtype=np.float32)
            job.exit_block[0] = block
            job.operating_point[0] = point
        else:
            if job.probs is None:
                job.probs = np.zeros((job.x.shape[0], probs.shape[1]), dtype=np.float32)
            job.probs[idx] = probs
            job.exit_block[idx] = block
            job.operating_point[idx] = point
        if self.controller is not None:
            self.controller.answered(len(idx))
        self._release(job, len(idx))

    def _release(self, job: Job, rows: int) -> None:
        job.remaining -= rows
        self._in_flight -= rows
        if job.remaining == 0:
            self.answered_requests += 1
            job.finish()
