"""What the worker processes of one hff-serve (HFF_WORKERS > 1) ask each other.

Each worker serves the port on its own (SO_REUSEPORT: app.workers) and batches its own requests;
a scrape, a readiness probe or a model-control call reaches one of them, chosen by the kernel.
So that the answer is the service's and not one process's, every worker also listens on a Unix
socket in the supervisor's private run directory, and the one that got the request asks the
others:
- /metrics: every worker's series, each labelled `worker="<n>"` (sum them without(worker));
- /readyz and /v2/health/ready: ready only when every worker is (a warming worker shares the
  port, and would answer the requests it is handed with 503);
- model load and unload: done in every worker, so each serves the same version.

The protocol is one JSON line asking ({"op": ...}), the answer read to the end of the stream.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from app.errors import ClientError
from app.repository import ModelRepository

log = logging.getLogger(__name__)

ASK_TIMEOUT_S = 2.0  # metrics and readiness: a worker that does not answer in this is left out
CONTROL_TIMEOUT_S = 600.0  # a model load warms the model up; an unload drains its requests


def socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.sock"


class WorkerPeers:
    """This worker's control socket, and its questions to the other workers."""

    def __init__(self, run_dir: Path, index: int, count: int, repository: ModelRepository):
        self.run_dir = run_dir
        self.index = index
        self.count = count
        self.repository = repository
        self._server: asyncio.AbstractServer | None = None

    @property
    def others(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]

    def own_metrics(self) -> bytes:
        return generate_latest(self.repository.metrics.registry)

    # --- answering the others ------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._handle, path=str(socket_path(self.run_dir, self.index)))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = orjson.loads(await reader.readline())
            writer.write(await self._answer(request))
            await writer.drain()
        except Exception:  # a peer that went away mid-answer, or a bug: never kills this worker
            log.exception("answering worker control request failed")
        finally:
            writer.close()

    async def _answer(self, request: dict[str, Any]) -> bytes:
        op = request.get("op")
        repository = self.repository
        if op == "metrics":
            return self.own_metrics()
        if op == "ready":
            ready = repository.ready
            return orjson.dumps({"ready": ready,
                                 "reason": None if ready else repository.not_ready_reason()})
        if op in ("load", "unload"):
            model = str(request.get("model"))
            try:
                if op == "load":
                    service, _ = await repository.load(model)
                    return orjson.dumps({"status": 200, "version": service.version})
                await repository.unload(model)
                return orjson.dumps({"status": 200})
            except ClientError as e:
                return orjson.dumps({"status": e.status, "message": e.message})
        return orjson.dumps({"status": 400, "message": f"unknown op {op!r}"})

    # --- asking them ---------------------------------------------------------------------------

    async def _ask(self, index: int, request: dict[str, Any], timeout: float) -> bytes | None:
        """Worker `index`'s answer, or None when it is not up (yet, or any more) or too slow."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(
                    str(socket_path(self.run_dir, index)))
                try:
                    writer.write(orjson.dumps(request) + b"\n")
                    return await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError) as e:
            log.debug("worker %d did not answer %s: %s", index, request.get("op"), e)
            return None

    async def _ask_others(self, request: dict[str, Any], timeout: float) -> dict[int, bytes | None]:
        answers = await asyncio.gather(*(self._ask(i, request, timeout) for i in self.others))
        return dict(zip(self.others, answers, strict=True))

    async def metrics(self) -> bytes:
        """Every worker's metrics in one exposition, each series labelled with its worker."""
        texts = {self.index: self.own_metrics()}
        texts.update({i: t for i, t in (await self._ask_others({"op": "metrics"},
                                                                ASK_TIMEOUT_S)).items()
                      if t is not None})
        return merge_expositions(texts)

    async def not_ready(self) -> str | None:
        """Why some other worker is not ready, or None when all are (this one is asked apart)."""
        for i, answer in sorted((await self._ask_others({"op": "ready"}, ASK_TIMEOUT_S)).items()):
            if answer is None:
                return f"worker {i} of {self.count} is not up"
            state = orjson.loads(answer)
            if not state["ready"]:
                return f"worker {i} of {self.count}: {state['reason']}"
        return None

    async def control(self, op: str, model: str) -> None:
        """Do the model-control `op` this worker has just done in every other worker too; a
        worker that could not: its error, naming it (503 when it did not answer at all)."""
        answers = await self._ask_others({"op": op, "model": model}, CONTROL_TIMEOUT_S)
        for i, answer in sorted(answers.items()):
            if answer is None:
                raise ClientError(503, f"worker {i} of {self.count} did not answer the {op} of "
                                       f"model {model!r}; its state is unknown")
            result = orjson.loads(answer)
            if result["status"] != 200:
                raise ClientError(result["status"], f"worker {i} of {self.count}: "
                                                    f"{result['message']}")


class _Families(Collector):
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_expositions(texts: dict[int, bytes]) -> bytes:
    """The Prometheus texts of several workers as one, each sample labelled `worker`."""
    merged: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode()):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation,
                                                    family.type, family.unit)
            for s in family.samples:
                into.add_sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp,
                                s.exemplar)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)
