"""The served model: runtime + batcher + readiness, and the request -> prediction path."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np

from app.admission import MIN_ROW_BYTES, Admission, Ticket
from app.batcher import Batcher, DeadlineExpired, Job, QueueFull, ShuttingDown
from app.controller import LoadController
from app.decoding import BINARY_HEADER, InputSpec
from app.errors import ClientError
from app.metrics import ModelMetrics
from app.runtime import ModelRuntime
from app.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bodies up to this size without images are parsed on the event loop: a thread hop costs more
# than parsing them. Larger ones, and every image, go to the decode threads.
INLINE_DECODE_BYTES = 64 * 1024
DEFAULT_INLINE_CALL_MS = 1.0  # HFF_INLINE_CALL_MS unset, in one process


class RequestTimeout(ClientError):
    def __init__(self, seconds: float):
        super().__init__(504, f"the request was not answered within {seconds:g}s "
                              "(HFF_REQUEST_TIMEOUT_S)")


def deadline_error(e: DeadlineExpired) -> ClientError:
    """The 503 for a request whose deadline_ms passed before any of its rows reached a block."""
    return ClientError(503, f"{e}: the server is overloaded; retry later or allow a longer "
                            "deadline_ms", {"Retry-After": "1"})


class Service:
    """One loaded model version and everything a route needs to run it; app.repository's
    ModelRepository holds the loaded ones and finds the one a request names.

    Every request path that runs a model (the /predict and KServe infer routes, FastAPI's and the
    hot ones in app/middleware.py, on uvicorn or Granian) goes through the same three calls, which carry the protections:
    `admit(headers)` before reading the body (admission control, the request deadline),
    `decode(fn, ...)` to parse the body and decode images (off the event loop when large), and
    `infer(x, mode, ticket)` (the batcher, bounded by the deadline). Timeouts on headers, body
    and shutdown, and client disconnects, are handled below the routes (app.protocol, app.guard).
    Admission and the decode threads are the server's, shared by every model.
    """

    def __init__(self, settings: Settings, runtime: ModelRuntime, metrics: ModelMetrics,
                 admission: Admission, decode_pool: ThreadPoolExecutor, name: str, version: str):
        self.settings = settings
        self.runtime = runtime
        self.metrics = metrics
        self.manifest = runtime.manifest
        self.name = name  # the repository's model directory, or the manifest's name
        self.version = version  # the repository's version directory, or the manifest's version
        self.spec = InputSpec(self.manifest.input.shape, self.manifest.input.range,
                              self.manifest.input.resize)
        self.batcher: Batcher | None = None
        self.points = self.manifest.operating_points
        self.controller = LoadController(self.points, settings.LATENCY_TARGET_MS,
                                         settings.MIN_ACCURACY)
        self.warmed = False
        self.closed: str | None = None  # why this version takes no new requests
        self.admission = admission
        self.decode_pool = decode_pool
        # requests that chose this version and have not ended: a retired version is stopped
        # only once they are answered
        self.active = 0
        self._idle = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self.warmed and self.closed is None and self.batcher is not None

    def not_ready_reason(self) -> str:
        return self.closed if self.closed is not None else "the model is still warming up"

    def not_ready_error(self) -> ClientError:
        """The 503 every route answers while warming up or shutting down."""
        return ClientError(503, f"not ready: {self.not_ready_reason()}", {"Retry-After": "1"})

    # --- lifecycle (app.repository) ----------------------------------------------------------

    def start(self) -> None:
        """Warmed up (runtime.warm_up, off the loop): start taking requests."""
        batcher = Batcher(self.runtime, self.metrics, max_batch_size=self.settings.MAX_BATCH_SIZE,
                          max_wait_ms=self.settings.MAX_BATCH_WAIT_MS,
                          queue_bound=self.settings.QUEUE_BOUND,
                          scheduling=self.settings.SCHEDULING, controller=self.controller,
                          inline_below_ms=self.inline_below_ms(),
                          concurrent_calls=self.runtime.concurrent_calls)
        batcher.start()
        self.batcher = batcher
        self.warmed = True

    def inline_below_ms(self) -> float:
        """Model calls whose recent CPU time is under this run on the event loop (CPU only).
        HFF_INLINE_CALL_MS when set; else 1 ms (a small model's calls cost less than the hand-off
        to the inference thread), and every call in one of several workers with one onnxruntime
        thread each: the other workers keep the other cores busy while this one's loop waits
        for its call, and the loop and the inference thread no longer take turns on the cores
        and the GIL (cifar-cnn with two workers: 86-95% of the same-batch ceiling in seven runs,
        one process 81-89%; docs/request-path.md, "Twelfth round, continued")."""
        if self.runtime.device != "cpu":
            return 0.0
        if self.settings.INLINE_CALL_MS is not None:
            return self.settings.INLINE_CALL_MS
        if self.settings.WORKERS > 1 and self.runtime.threads == 1:
            return math.inf
        return DEFAULT_INLINE_CALL_MS

    def close(self, reason: str) -> None:
        """Take no new work (SIGTERM); what was accepted is still answered."""
        self.closed = self.closed or reason
        if self.batcher is not None:
            self.batcher.close()

    async def drain(self, reason: str) -> None:
        """Retire this version: wait for the requests that chose it, then stop its batcher (which
        answers everything it accepted) and drop its metric series."""
        while self.active:
            self._idle.clear()
            await self._idle.wait()
        self.close(reason)
        if self.batcher is not None:
            await self.batcher.stop()
        self.metrics.remove()
        log.info("model %s version %s stopped, every request it took answered (%s)", self.name,
                 self.version, reason)

    # --- early exit --------------------------------------------------------------------------

    def thresholds_for(self, mode: str | float | None) -> tuple[np.ndarray | None, bool]:
        """(per-block exit thresholds (L-1,), adaptive) for a parsed mode (app.early_exit; None:
        the server's default); inf = never exit there; None = early exit off. 'auto' is adaptive:
        the load controller's current operating point decides (the calibrated one, without a
        latency target); 'off' and an explicit threshold never change."""
        if mode is None:
            mode = self.settings.EARLY_EXIT
        if mode == "off" or not self.runtime.has_stages or self.manifest.num_blocks == 1:
            return None, False
        if mode == "auto":
            return self.controller.thresholds, True
        return np.full(self.manifest.num_blocks - 1, float(mode), dtype=np.float64), False

    # --- running -----------------------------------------------------------------------------

    @asynccontextmanager
    async def admit(self, headers: Mapping[str, str]) -> AsyncIterator[Ticket]:
        """Room for one request, reserved before its body is read (429 when none comes in
        time), held until the request ends; the ticket carries the request's deadline."""
        if not self.ready:
            raise self.not_ready_error()
        # counted before the first await: the lookup that chose this version and this line run
        # in one step of the loop, so a version switch never stops a version a request chose
        self.active += 1
        try:
            length, row_bytes = self._reservation(headers)
            ticket = await self.admission.acquire(length, self.settings.MAX_BODY_BYTES,
                                                  self._deadline(), row_bytes)
            try:
                yield ticket
            finally:
                self.admission.release(ticket)
        finally:
            self._ended()

    def try_admit(self, headers: Mapping[str, str]) -> Ticket | None:
        """`admit` without waiting (app.hotpath): the ticket when there is room now, else None
        and nothing held (Busy, 429, when HFF_QUEUE_WAIT_S is 0: no line to wait in);
        `release(ticket)` when the request ends."""
        if not self.ready:
            raise self.not_ready_error()
        length, row_bytes = self._reservation(headers)
        ticket = self.admission.try_acquire(length, self.settings.MAX_BODY_BYTES,
                                            self._deadline(), row_bytes)
        if ticket is not None:
            self.active += 1
        return ticket

    def release(self, ticket: Ticket) -> None:
        """A request admitted by `try_admit` has ended."""
        self.admission.release(ticket)
        self._ended()

    def _reservation(self, headers: Mapping[str, str]) -> tuple[int | None, int]:
        """(Content-Length, the fewest bytes one row of this body can take)."""
        raw = headers.get("content-length")
        length = int(raw) if raw is not None and raw.isdigit() else None
        # a binary tensor body holds whole FP32 rows: a 12 KB 3x32x32 image is one row, not
        # the 192 the any-encoding minimum would reserve (which let ~20 such requests in at once)
        row_bytes = self.spec.binary_row_bytes if BINARY_HEADER in headers else MIN_ROW_BYTES
        return length, row_bytes

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.REQUEST_TIMEOUT_S

    def _ended(self) -> None:
        self.active -= 1
        if not self.active:
            self._idle.set()

    async def decode(self, ticket: Ticket, heavy: bool, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) (parse a body, decode images): inline when light, else on the decode
        threads, and bounded by the request's deadline either way."""
        if not heavy:
            return fn(*args)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(ticket.deadline):
                return await loop.run_in_executor(self.decode_pool, fn, *args)
        except TimeoutError:
            raise RequestTimeout(self.settings.REQUEST_TIMEOUT_S) from None

    def submit(self, x: np.ndarray, mode: str | float | None, ticket: Ticket,
               return_blocks: bool = False, deadline_ms: float | None = None,
               notify: Callable[[Job], None] | None = None) -> Job:
        """Queue (N, C, H, W) rows; the job resolves (or calls `notify`) when every row has
        exited, or fails at the request's deadline. `deadline_ms` counts from the request's
        arrival: a row still waiting for a block after it is answered from the block it
        reached, or the request fails with DeadlineExpired if it reached none. The caller
        cancels `job.timer` once it is done with the job."""
        if not self.ready or self.batcher is None:
            raise self.not_ready_error()
        self.admission.settle(ticket, x.shape[0])
        thresholds, adaptive = self.thresholds_for(mode)
        deadline = None if deadline_ms is None else ticket.started + deadline_ms / 1000.0
        try:
            job = self.batcher.submit(x, thresholds, return_blocks, adaptive, deadline,
                                      arrived=ticket.started, notify=notify)
        except QueueFull as e:
            raise ClientError(429, f"{e}; retry later", {"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise ClientError(503, str(e), {"Retry-After": "5"}) from None
        # one timer, not asyncio.timeout + shield (their bookkeeping was 5% of a small request);
        # the batcher skips a job that is done, whether answered, failed or given up
        job.timer = asyncio.get_running_loop().call_at(ticket.deadline, self._expire, job)
        return job

    async def infer(self, x: np.ndarray, mode: str | float | None, ticket: Ticket,
                    return_blocks: bool = False, deadline_ms: float | None = None) -> Job:
        """`submit`, then wait until every row has exited (or the deadline)."""
        job = self.submit(x, mode, ticket, return_blocks, deadline_ms)
        assert job.future is not None and job.timer is not None
        try:
            return await job.future
        except DeadlineExpired as e:
            raise deadline_error(e) from None
        except asyncio.CancelledError:  # the client left, or the shutdown timeout cut it
            self.abandon(job)
            raise
        finally:
            job.timer.cancel()

    def abandon(self, job: Job) -> None:
        """Nobody waits for the job any more: drop its rows not started yet."""
        if self.batcher is not None:
            self.batcher.abandon(job)

    def _expire(self, job: Job) -> None:
        """The request's deadline (HFF_REQUEST_TIMEOUT_S) passed before its rows were answered."""
        if not job.settled:
            self.abandon(job)
            job.finish(RequestTimeout(self.settings.REQUEST_TIMEOUT_S))

    def predictions(self, job: Job, top_k: int) -> list[dict[str, Any]]:
        """The response's predictions, in instance order."""
        names = self.manifest.class_names
        k = min(top_k, len(names))
        assert job.probs is not None and job.exit_block is not None
        assert job.operating_point is not None and job.deadline_missed is not None
        if k == 1:  # argmax picks the first of tied maxima, as the stable sort below does
            order = job.probs.argmax(axis=1)[:, None]  # (N, 1)
        else:
            order = np.argsort(-job.probs, axis=1, kind="stable")[:, :k]  # (N, k)
        # Python floats and ints once per array: cheaper than a numpy scalar per value
        probs, exits = job.probs.tolist(), job.exit_block.tolist()
        points, missed = job.operating_point.tolist(), job.deadline_missed.tolist()
        out = []
        for i, (p, top) in enumerate(zip(probs, order.tolist(), strict=True)):
            label = top[0]
            pred: dict[str, Any] = {
                "label": label,
                "class_name": names[label],
                "confidence": p[label],
                "exit_block": exits[i],
                "operating_point": self.point_ref(points[i]),
                "deadline_missed": missed[i],
                "top_k": [{"label": j, "class_name": names[j], "probability": p[j]} for j in top],
            }
            if job.blocks is not None:
                pred["blocks"] = [{"block": b["block"], "probabilities": b["probabilities"].tolist(),
                                   "threshold": b["threshold"]} for b in job.blocks[i]]
            out.append(pred)
        return out

    def point_ref(self, index: int) -> dict[str, Any] | None:
        """What a prediction says about the operating point that answered it (None: early exit
        off, an explicit threshold, or a row answered early for its deadline)."""
        if index < 0:
            return None
        return {"index": index, "expected_accuracy": self.points[index].expected_accuracy}

    def model_ref(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}
