"""The served model: runtime + batcher + readiness, and the request -> prediction path."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import numpy as np

from app.batcher import Batcher, Job, QueueFull, ShuttingDown
from app.decoding import InputSpec
from app.errors import ClientError
from app.metrics import Metrics
from app.runtime import ModelRuntime
from app.settings import Settings

log = logging.getLogger(__name__)


class Service:
    """Everything a route needs; lives on `app.state.service`."""

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

    @property
    def ready(self) -> bool:
        return self.warmed and not self.draining and self.batcher is not None

    def not_ready_reason(self) -> str:
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

    async def infer(self, x: np.ndarray, mode: str | float | None,
                    return_blocks: bool = False) -> Job:
        """Queue (N, C, H, W) rows and wait until every one has exited (or the timeout)."""
        if not self.ready or self.batcher is None:
            raise ClientError(503, f"not ready: {self.not_ready_reason()}", {"Retry-After": "1"})
        try:
            job = self.batcher.submit(x, self.thresholds_for(mode), return_blocks)
        except QueueFull as e:
            raise ClientError(429, f"{e}; retry later", {"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise ClientError(503, str(e), {"Retry-After": "5"}) from None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future),
                                          self.settings.REQUEST_TIMEOUT_S)
        except TimeoutError:
            self.batcher.abandon(job)
            raise ClientError(504, f"the request was not answered within "
                                   f"{self.settings.REQUEST_TIMEOUT_S:g}s (HFF_REQUEST_TIMEOUT_S)") from None
        except asyncio.CancelledError:
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
