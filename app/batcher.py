"""Dynamic batcher with per-sample early exit (docs/architecture.md, "The batcher and early exit").

Requests are queued as row ranges. The collector takes what is queued (up to max_batch_size);
it waits for more only while the service is under load (the batch is not a lone row and the last
one was not either) and only until the oldest queued row has waited max_wait, so a lone request
never sits out the batch window. One worker thread runs the batch stage by stage: after each stage
the rows whose confidence reaches their threshold are answered at once and the rest are compacted
and go on. Rows with early exit off run model.onnx in one call.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.metrics import Metrics
from app.runtime import ModelRuntime

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue bound would be passed: answer 429 with Retry-After."""


class ShuttingDown(Exception):
    """The batcher no longer accepts work: answer 503 with Retry-After."""


@dataclass(eq=False)
class Job:
    """One request's rows and, as they arrive, their results."""

    x: np.ndarray  # (n, C, H, W) float32
    thresholds: np.ndarray | None  # (L-1,) per-block exit thresholds (inf = never); None = off
    return_blocks: bool
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    probs: np.ndarray | None = None  # (n, num_classes): the exit block's probabilities
    exit_block: np.ndarray | None = None  # (n,) 1-based
    blocks: list[list[dict[str, Any]]] | None = None  # per row, every block that ran
    remaining: int = 0
    abandoned: bool = False  # the caller gave up (timeout): skip rows not started yet

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        self.remaining = n
        self.exit_block = np.zeros(n, dtype=np.int64)
        if self.return_blocks:
            self.blocks = [[] for _ in range(n)]


@dataclass
class Chunk:
    job: Job
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


class Batcher:
    """Queue + collector task + one inference thread, for one ModelRuntime."""

    def __init__(self, runtime: ModelRuntime, metrics: Metrics, max_batch_size: int = 64,
                 max_wait_ms: float = 2.0, queue_bound: int = 4096):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1 (e.g. 64), got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more (e.g. 2.0), got {max_wait_ms}")
        if queue_bound < 1:
            raise ValueError(f"queue_bound must be at least 1 (e.g. 4096), got {queue_bound}")
        self.runtime = runtime
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue_bound = queue_bound
        self.num_blocks = runtime.manifest.num_blocks
        self._queue: collections.deque[Chunk] = collections.deque()
        self._queued_rows = 0
        self._in_flight = 0  # accepted rows not answered yet
        self._arrived = asyncio.Event()
        self._closing = False
        self._last_rows = 0
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hff-infer")
        self.accepted_requests = 0
        self.answered_requests = 0

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._collect_forever(), name="hff-batcher")

    async def stop(self) -> None:
        """Refuse new work, answer everything accepted, then stop the collector and thread."""
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

    # --- submission ------------------------------------------------------------------------

    def submit(self, x: np.ndarray, thresholds: np.ndarray | None, return_blocks: bool) -> Job:
        """Queue a request's rows; its future resolves when every row has exited."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        n = x.shape[0]
        if self._queued_rows + n > self.queue_bound:
            raise QueueFull(f"the queue is full ({self._queued_rows} of {self.queue_bound} "
                            "instances waiting)")
        job = Job(x=x, thresholds=thresholds, return_blocks=return_blocks,
                  future=asyncio.get_running_loop().create_future())
        self._queue.append(Chunk(job, 0, n))
        self._queued_rows += n
        self._in_flight += n
        self.accepted_requests += 1
        self.metrics.queue_depth.set(self._queued_rows)
        self.metrics.in_flight.set(self._in_flight)
        self._arrived.set()
        return job

    def abandon(self, job: Job) -> None:
        """The caller stopped waiting (timeout or disconnect): drop its rows not yet started."""
        job.abandoned = True

    # --- collection ------------------------------------------------------------------------

    def _take(self, limit: int) -> list[Chunk]:
        taken: list[Chunk] = []
        now = time.monotonic()
        while self._queue and limit > 0:
            chunk = self._queue[0]
            if chunk.job.abandoned:
                self._queue.popleft()
                self._queued_rows -= chunk.rows
                self._release(chunk.job, chunk.rows)
                continue
            if chunk.rows <= limit:
                self._queue.popleft()
                piece = chunk
            else:  # split the request: its first rows go now, the rest stay queued
                piece = Chunk(chunk.job, chunk.lo, chunk.lo + limit)
                chunk.lo += limit
            taken.append(piece)
            limit -= piece.rows
            self._queued_rows -= piece.rows
            self.metrics.queue_wait.observe(now - piece.job.enqueued)
        self.metrics.queue_depth.set(self._queued_rows)
        return taken

    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            batch = self._take(self.max_batch_size)
            rows = sum(c.rows for c in batch)
            # Wait for more only under load: a lone request goes at once.
            if batch and rows < self.max_batch_size and self.max_wait > 0 and \
                    (rows > 1 or self._last_rows > 1) and not self._closing:
                deadline = min(c.job.enqueued for c in batch) + self.max_wait
                while rows < self.max_batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    if not self._queue:
                        self._arrived.clear()
                        try:
                            await asyncio.wait_for(self._arrived.wait(), remaining)
                        except TimeoutError:
                            break
                    more = self._take(self.max_batch_size - rows)
                    batch += more
                    rows += sum(c.rows for c in more)
            if not batch:
                continue
            self._last_rows = rows
            self.metrics.batch_size.observe(rows)
            try:
                await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as e:  # a bug or a broken graph: fail these requests, keep serving
                log.exception("batch of %d rows failed", rows)
                for chunk in batch:
                    if not chunk.job.future.done():
                        chunk.job.future.set_exception(e)

    # --- inference (worker thread) ---------------------------------------------------------

    def _run_batch(self, batch: list[Chunk]) -> None:
        off = [c for c in batch if c.job.thresholds is None]
        staged = [c for c in batch if c.job.thresholds is not None]
        if staged and not self.runtime.has_stages:  # no stage graphs: early exit cannot happen
            off, staged = off + staged, []
        if off:
            self._run_full(off)
        if staged:
            self._run_staged(staged)

    def _post(self, deliveries: list[tuple[Job, np.ndarray, np.ndarray, int, list | None]]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, deliveries)

    def _run_full(self, chunks: list[Chunk]) -> None:
        x = np.concatenate([c.job.x[c.lo:c.hi] for c in chunks])  # (rows, C, H, W)
        per_block = self.runtime.run_full(x)  # L x (rows, num_classes)
        stacked = np.stack(per_block, axis=1)  # (rows, L, num_classes)
        deliveries, start = [], 0
        for c in chunks:
            probs = stacked[start:start + c.rows]
            blocks = None
            if c.job.return_blocks:
                blocks = [[{"block": k + 1, "probabilities": p[k], "threshold": None}
                           for k in range(self.num_blocks)] for p in probs]
            deliveries.append((c.job, np.arange(c.lo, c.hi), probs[:, -1], self.num_blocks, blocks))
            start += c.rows
        self.metrics.exits.labels(block=str(self.num_blocks)).inc(len(x))
        self._post(deliveries)

    def _run_staged(self, chunks: list[Chunk]) -> None:
        x = np.concatenate([c.job.x[c.lo:c.hi] for c in chunks])  # (rows, C, H, W)
        owner = np.concatenate([np.full(c.rows, i) for i, c in enumerate(chunks)])  # chunk index
        row_in_job = np.concatenate([np.arange(c.lo, c.hi) for c in chunks])
        thresholds = np.concatenate(  # (rows, L-1)
            [np.broadcast_to(c.job.thresholds, (c.rows, self.num_blocks - 1)) for c in chunks])
        history: dict[int, list[dict[str, Any]]] = {  # batch row -> blocks run (return_blocks)
            r: [] for r in range(len(x)) if chunks[owner[r]].job.return_blocks}
        alive = np.arange(len(x))  # batch rows still undecided
        features: Any = x
        for k in range(self.num_blocks):
            out = self.runtime.run_stage(k, features, len(alive))
            probs = out.probs  # (alive, num_classes)
            last = k == self.num_blocks - 1
            if last:
                exits = np.ones(len(alive), dtype=bool)
            else:
                exits = probs.max(axis=1) >= thresholds[alive, k]
            if history:
                for i, r in enumerate(alive):
                    if r in history:
                        t = None if last or not math.isfinite(thresholds[r, k]) else float(
                            thresholds[r, k])
                        history[r].append({"block": k + 1, "probabilities": probs[i], "threshold": t})
            if exits.any():
                self.metrics.exits.labels(block=str(k + 1)).inc(int(exits.sum()))
                self._post(self._group(chunks, owner, row_in_job, alive[exits], probs[exits], k + 1,
                                       history))
            if last or exits.all():
                break
            keep = ~exits
            features = self.runtime.select_rows(out.features, keep, len(alive))
            alive = alive[keep]

    @staticmethod
    def _group(chunks: list[Chunk], owner: np.ndarray, row_in_job: np.ndarray, rows: np.ndarray,
               probs: np.ndarray, block: int, history: dict[int, list[dict[str, Any]]]):
        """Exited batch rows grouped by request, as deliveries for the event loop."""
        deliveries = []
        owners = owner[rows]
        for i in np.unique(owners):
            sel = owners == i
            job = chunks[i].job
            blocks = [history[r] for r in rows[sel]] if job.return_blocks else None
            deliveries.append((job, row_in_job[rows[sel]], probs[sel], block, blocks))
        return deliveries

    # --- delivery (event loop) -------------------------------------------------------------

    def _deliver(self, deliveries: list[tuple[Job, np.ndarray, np.ndarray, int, list | None]]) -> None:
        for job, idx, probs, block, blocks in deliveries:
            if job.probs is None:
                job.probs = np.zeros((job.x.shape[0], probs.shape[1]), dtype=np.float32)
            job.probs[idx] = probs
            job.exit_block[idx] = block
            if blocks is not None and job.blocks is not None:
                for i, b in zip(idx, blocks, strict=True):
                    job.blocks[i] = b
            self._release(job, len(idx))

    def _release(self, job: Job, rows: int) -> None:
        job.remaining -= rows
        self._in_flight -= rows
        self.metrics.in_flight.set(self._in_flight)
        if job.remaining == 0:
            self.answered_requests += 1
            if not job.future.done():
                job.future.set_result(job)
