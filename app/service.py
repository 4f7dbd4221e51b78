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

from app.admission import Admission, Ticket
from app.batcher import Batcher, Job, QueueFull, ShuttingDown
from app.decoding import InputSpec
from app.errors import ClientError
from app.metrics import Metrics
from app.runtime import ModelRuntime
from app.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bodies up to this size without images are parsed on the event loop: a thread hop costs more
# than parsing them. Larger ones, and every image, go to the decode threads.
INLINE_DECODE_BYTES = 64 * 1024


class RequestTimeout(ClientError):
    def __init__(self, seconds: float):
        super().__init__(504, f"the request was not answered within {seconds:g}s "
                              "(HFF_REQUEST_TIMEOUT_S)")


class Service:
    """Everything a route needs; lives on `app.state.service`.

    Every request path that runs a model (the /predict and KServe infer routes, and any faster
    path added later) goes through the same three calls, which carry the protections:
    `admit(headers)` before reading the body (admission control, the request deadline),
    `decode(fn, ...)` to parse the body and decode images (off the event loop when large), and
    `infer(x, mode, ticket)` (the batcher, bounded by the deadline). Timeouts on headers, body
    and shutdown, and client disconnects, are handled below the routes (app.protocol, app.guard).
    """

    def __init__(self, settings: Settings, runtime: ModelRuntime, metrics: Metrics):
        self.settings = settings
        self.runtime = runtime
        self.metrics = metrics
        self.manifest = runtime.manifest
        self.spec = InputSpec(self.manifest.input.shape, self.manifest.input.range,
                              self.manifest.input.resize)
        self.batcher: Batcher | None = None
        self.warmed = False
        self.draining = False
        self.failure: str | None = None  # why the model cannot be served (warm-up failed)
        self.on_failure: Callable[[], None] | None = None  # hff-serve: stop the server
        self.admission = Admission(settings.QUEUE_BOUND, settings.QUEUE_BYTES,
                                   settings.QUEUE_WAIT_S, settings.MAX_INSTANCES, metrics)
        # Its own threads: never the loop's default executor, never the inference thread.
        self.decode_pool = ThreadPoolExecutor(settings.DECODE_THREADS,
                                              thread_name_prefix="hff-decode")

    @property
    def ready(self) -> bool:
        return self.warmed and not self.draining and self.batcher is not None

    def fail(self, reason: str) -> None:
        """The model cannot be served: say why once, stay not-ready, and stop the server."""
        log.error("%s", reason)
        self.failure = reason
        if self.on_failure is not None:
            self.on_failure()

    def not_ready_reason(self) -> str:
        if self.failure is not None:
            return self.failure
        if self.draining:
            return "the server is shutting down"
        return "the model is still warming up"

    # --- early exit --------------------------------------------------------------------------

    def thresholds_for(self, mode: str | float | None) -> np.ndarray | None:
        """Per-block exit thresholds (L-1,) for a parsed mode (app.early_exit; None: the server's
        default); inf = never exit there; None = early exit off."""
        if mode is None:
            mode = self.settings.EARLY_EXIT
        if mode == "off" or not self.runtime.has_stages or self.manifest.num_blocks == 1:
            return None
        if mode == "auto":
            values = [math.inf if t is None else t for t in self.manifest.thresholds]
        else:
            values = [float(mode)] * (self.manifest.num_blocks - 1)
        return np.asarray(values, dtype=np.float64)

    # --- running -----------------------------------------------------------------------------

    @asynccontextmanager
    async def admit(self, headers: Mapping[str, str]) -> AsyncIterator[Ticket]:
        """Room for one request, reserved before its body is read (429 when none comes in
        time), held until the request ends; the ticket carries the request's deadline."""
        if not self.ready:
            raise ClientError(503, f"not ready: {self.not_ready_reason()}", {"Retry-After": "1"})
        raw = headers.get("content-length")
        length = int(raw) if raw is not None and raw.isdigit() else None
        loop = asyncio.get_running_loop()
        ticket = await self.admission.acquire(length, self.settings.MAX_BODY_BYTES,
                                              loop.time() + self.settings.REQUEST_TIMEOUT_S)
        try:
            yield ticket
        finally:
            self.admission.release(ticket)

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

    async def infer(self, x: np.ndarray, mode: str | float | None, ticket: Ticket,
                    return_blocks: bool = False) -> Job:
        """Queue (N, C, H, W) rows and wait until every one has exited (or the deadline)."""
        if not self.ready or self.batcher is None:
            raise ClientError(503, f"not ready: {self.not_ready_reason()}", {"Retry-After": "1"})
        self.admission.settle(ticket, x.shape[0])
        try:
            job = self.batcher.submit(x, self.thresholds_for(mode), return_blocks)
        except QueueFull as e:
            raise ClientError(429, f"{e}; retry later", {"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise ClientError(503, str(e), {"Retry-After": "5"}) from None
        try:
            async with asyncio.timeout_at(ticket.deadline):
                return await asyncio.shield(job.future)
        except TimeoutError:
            self.batcher.abandon(job)
            raise RequestTimeout(self.settings.REQUEST_TIMEOUT_S) from None
        except asyncio.CancelledError:  # the client left, or the shutdown timeout cut it
            self.batcher.abandon(job)
            raise

    def predictions(self, job: Job, top_k: int) -> list[dict[str, Any]]:
        """The response's predictions, in instance order."""
        names = self.manifest.class_names
        k = min(top_k, len(names))
        assert job.probs is not None and job.exit_block is not None
        order = np.argsort(-job.probs, axis=1, kind="stable")[:, :k]  # (N, k)
        out = []
        for i, (p, top) in enumerate(zip(job.probs, order, strict=True)):
            label = int(top[0])
            pred: dict[str, Any] = {
                "label": label,
                "class_name": names[label],
                "confidence": float(p[label]),
                "exit_block": int(job.exit_block[i]),
                "top_k": [{"label": int(j), "class_name": names[j], "probability": float(p[j])}
                          for j in top],
            }
            if job.blocks is not None:
                pred["blocks"] = [{"block": b["block"], "probabilities": b["probabilities"].tolist(),
                                   "threshold": b["threshold"]} for b in job.blocks[i]]
            out.append(pred)
        return out

    def model_ref(self) -> dict[str, str]:
        return {"name": self.manifest.name, "version": self.manifest.version}
