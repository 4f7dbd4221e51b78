"""The model repository: the loaded version of each model, found by name for every request, and
its loading, unloading and hot reload.

The layout is Triton's: `<repository>/<model>/<version>/`, each version a model dir as hff-export
writes it, the version a number. One version of each model serves at a time, the newest that
loads. A version directory without manifest.json is an export still being written (hff-export
renames a finished one into place, and writes manifest.json last) and is never loaded. A single
HFF_MODEL_DIR is a repository of one model with one version (its manifest's version).

A switch to a new version is atomic for the requests: the new version is loaded and warmed up
beside the old one, then one dict assignment makes it the one new requests find; requests that
chose the old version (app.service.Service.admit counts them) are answered by it, and only then
is its batcher stopped (`Service.drain`). A version that fails to load or warm up is refused
with a log line that names the problem, and the version already serving keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.admission import Admission
from app.errors import ClientError, excerpt
from app.metrics import Metrics
from app.runtime import ModelRuntime
from app.service import Service
from app.settings import Settings
from contract.model_dir import MANIFEST_FILE, ModelDirError, load_manifest

log = logging.getLogger(__name__)

VERSION_NAME = re.compile(r"[0-9]{1,18}")  # a version directory's name


@dataclass(frozen=True)
class VersionDir:
    """One version directory of a model."""

    model: str
    version: str  # the directory name (a repository) or the manifest's version (one model dir)
    number: int  # the order of versions: the newest is the largest
    path: Path

    @property
    def complete(self) -> bool:
        return (self.path / MANIFEST_FILE).is_file()


def scan(root: Path) -> dict[str, list[VersionDir]]:
    """Every model of a repository and its version directories, oldest first (complete or not:
    the index lists both). Hidden entries and non-numeric names are not versions."""
    found: dict[str, list[VersionDir]] = {}
    for model in sorted(root.iterdir()):
        if model.name.startswith(".") or not model.is_dir():
            continue
        versions = [VersionDir(model.name, d.name, int(d.name), d) for d in model.iterdir()
                    if VERSION_NAME.fullmatch(d.name) and d.is_dir()]
        found[model.name] = sorted(versions, key=lambda v: v.number)
    return found


Fingerprint = tuple[tuple[str, int, int], ...] | None


def fingerprint(path: Path) -> Fingerprint:
    """(name, size, mtime) of a version directory's files: a refused version is tried again
    when they change (a copy that wrote manifest.json before its graphs, then finished)."""
    try:
        return tuple(sorted((f.name, st.st_size, st.st_mtime_ns) for f in path.iterdir()
                            if f.is_file() for st in (f.stat(),)))
    except OSError:
        return None


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class ModelRepository:
    """The loaded model versions (`models`: name -> Service), the server-wide parts they share
    (admission, decode threads, metrics), readiness, and model control; on `app.state.repository`."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.root = settings.MODEL_REPOSITORY  # None: the one model dir settings.MODEL_DIR
        self.admission = Admission(settings.QUEUE_BOUND, settings.QUEUE_BYTES,
                                   settings.QUEUE_WAIT_S, settings.MAX_INSTANCES, metrics)
        # Its own threads: never the loop's default executor, never the inference thread.
        self.decode_pool = ThreadPoolExecutor(settings.DECODE_THREADS,
                                              thread_name_prefix="hff-decode")
        self.models: dict[str, Service] = {}  # the version of each model that requests find
        self.default: str | None = None  # the model plain /predict answers from (the first)
        self.started = False  # the models found at start have been loaded (or refused)
        self.draining = False
        self.failure: str | None = None  # why nothing can be served (hff-serve then exits)
        self.on_failure: Callable[[], None] | None = None  # hff-serve: stop the server
        # (model, version) -> (why, its files when it was tried): tried again once they change
        self.refused: dict[tuple[str, str], tuple[str, Fingerprint]] = {}
        self.unloaded: set[str] = set()  # unloaded by request: the poller leaves them alone
        self._lock = asyncio.Lock()  # one load, unload or poll at a time
        self._tasks: set[asyncio.Task] = set()  # start-up, poller, versions draining
        self._single: VersionDir | None = None
        if self.root is None:
            manifest = load_manifest(settings.MODEL_DIR)
            self._single = VersionDir(manifest.name, manifest.version, 0, settings.MODEL_DIR)
            # opened now, so a model dir that does not load stops hff-serve at once (exit 2)
            self._insert(self._open(self._single))
        elif not scan(self.root) and settings.POLL_S is None:
            raise ModelDirError(f"the model repository {self.root} holds no model (its layout: "
                                "<model>/<version>/ model dirs; or set HFF_POLL_S to wait for one)")

    # --- the request path ----------------------------------------------------------------------

    def find(self, name: str | None, version: str | None = None) -> Service:
        """The loaded version a request names (name None: the default model; version None: the
        one serving), or a 404 that says what is served."""
        service = self.models.get(name if name is not None else self.default)  # type: ignore[arg-type]
        if service is None:
            raise self._not_found(name)
        if version is not None and version != service.version:
            raise ClientError(404, f"version {excerpt(version)} of model {excerpt(service.name)} "
                                   f"is not loaded (version {service.version} is)")
        return service

    def _not_found(self, name: str | None) -> ClientError:
        if not self.started and self.failure is None and not self.draining:
            return ClientError(503, "not ready: the models are still warming up",
                               {"Retry-After": "1"})
        served = ", ".join(repr(n) for n in sorted(self.models)) or "no model"
        if name is None:
            return ClientError(404, "no model is loaded (load one with POST "
                                    "/v2/repository/models/<name>/load)")
        return ClientError(404, f"unknown model {excerpt(name)} (this server serves {served})")

    @property
    def ready(self) -> bool:
        return (self.started and not self.draining and self.failure is None and bool(self.models)
                and all(s.ready for s in self.models.values()))

    def not_ready_reason(self) -> str:
        if self.failure is not None:
            return self.failure
        if self.draining:
            return "the server is shutting down"
        warming = [s for s in self.models.values() if not s.ready]
        if not self.started or warming:
            return "the model is still warming up"
        return "no model is loaded"

    def not_ready_error(self, reason: str | None = None) -> ClientError:
        """The 503 /readyz and /v2/health/ready answer while warming up, failed or shutting down
        (`reason`: why, when not this process's own reason: another worker's)."""
        return ClientError(503, f"not ready: {reason or self.not_ready_reason()}",
                           {"Retry-After": "1"})

    def fail(self, reason: str) -> None:
        """Nothing can be served: say why once, stay not-ready, and stop the server."""
        log.error("%s", reason)
        self.failure = reason
        if self.on_failure is not None:
            self.on_failure()

    # --- lifecycle (app.main's lifespan and SIGTERM) -------------------------------------------

    def start(self) -> None:
        """Warm up the models in the background (live at once, ready after), then poll."""
        self._spawn(self._start(), "hff-start")

    async def _start(self) -> None:
        if self._single is not None:
            service = self.models[self._single.model]
            try:
                await asyncio.to_thread(service.runtime.warm_up)
            except Exception as e:  # never live-but-never-ready: one line, then the server exits
                self.fail(f"warm-up failed, not serving {self._single.path}: {first_line(e)}")
                return
            service.start()
            log.info("ready: serving %s on %s", service.name, service.runtime.device)
            if self.settings.POLL_S is not None:
                log.warning("HFF_POLL_S is set, but one model dir is not polled: serve a model "
                            "repository (HFF_MODEL_REPOSITORY) for hot reload")
        else:
            assert self.root is not None
            found = await asyncio.to_thread(scan, self.root)
            async with self._lock:
                for name, versions in found.items():
                    await self._refresh(name, versions, retry=True)
            if not self.models and self.settings.POLL_S is None:
                self.fail(f"no model in the repository {self.root} could be loaded (the log "
                          "above says why)")
                return
            log.info("ready: serving %s", ", ".join(f"{n} version {s.version}"
                                                    for n, s in self.models.items()) or "no model")
        self.started = True
        if self.root is not None and self.settings.POLL_S is not None:
            self._spawn(self._poll_forever(self.settings.POLL_S), "hff-poll")

    def close(self) -> None:
        """SIGTERM: not ready at once, no new work; accepted work is still answered."""
        self.draining = True
        for service in self.models.values():
            service.close("the server is shutting down")

    async def stop(self) -> None:
        """Drain every batcher (the lifespan's end)."""
        self.draining = True
        for task in list(self._tasks):
            if task.get_name() in ("hff-start", "hff-poll"):
                task.cancel()
        with suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for service in list(self.models.values()):
            service.close("the server is shutting down")
            if service.batcher is not None:
                await service.batcher.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- loading -------------------------------------------------------------------------------

    def _open(self, v: VersionDir) -> Service:
        """A version's runtime (its graphs checked against the manifest), not warmed up yet."""
        s = self.settings
        runtime = ModelRuntime(v.path, device=s.DEVICE, threads=s.THREADS,
                               max_batch_size=s.MAX_BATCH_SIZE,
                               concurrent_calls=s.CONCURRENT_CALLS)
        if self.root is not None and runtime.manifest.name != v.model:
            log.info("model %s version %s: its manifest names it %r; the repository's directory "
                     "name is the name it is served by", v.model, v.version, runtime.manifest.name)
        return Service(s, runtime, self.metrics.for_model(v.model, v.version), self.admission,
                       self.decode_pool, name=v.model, version=v.version)

    def _open_and_warm(self, v: VersionDir) -> Service:
        service = self._open(v)
        try:
            service.runtime.warm_up()
        except BaseException:
            service.metrics.remove()  # a refused version leaves no series behind
            raise
        return service

    def _insert(self, service: Service) -> None:
        self.models[service.name] = service
        self.default = min(self.models)

    def _versions(self, name: str) -> list[VersionDir]:
        if self._single is not None:
            return [self._single] if name == self._single.model else []
        assert self.root is not None
        return scan(self.root).get(name, [])  # never a path built from the request

    async def _refresh(self, name: str, versions: list[VersionDir], retry: bool) -> list[str]:
        """Serve the newest complete version of `name` that loads, if it is newer than the one
        serving (caller holds the lock). `retry`: try versions refused before again (an explicit
        load), else only when their files changed (the poller: one log line per broken version,
        not one per poll). Returns what was refused, one line each."""
        problems = []
        for v in sorted((v for v in versions if v.complete), key=lambda v: -v.number):
            current = self.models.get(name)
            if current is not None and self._number(current) >= v.number:
                break  # what serves is this version or newer
            key = (name, v.version)
            files = await asyncio.to_thread(fingerprint, v.path)
            if not retry and key in self.refused and self.refused[key][1] == files:
                continue
            keeps = (f"version {current.version} keeps serving" if current is not None
                     else "no version of it is serving")
            try:
                started = asyncio.get_running_loop().time()
                service = await asyncio.to_thread(self._open_and_warm, v)
            except Exception as e:  # a broken export: refuse it, say why in one line
                reason = first_line(e)
                self.refused[key] = (reason, files)
                problems.append(f"version {v.version}: {reason}")
                log.error("refused model %s version %s (%s): %s; %s", name, v.version, v.path,
                          reason, keeps)
                continue
            self.refused.pop(key, None)
            service.start()
            self._insert(service)  # the switch: new requests find the new version from now on
            seconds = asyncio.get_running_loop().time() - started
            if current is None:
                log.info("model %s version %s serving (loaded and warmed up in %.2fs)", name,
                         v.version, seconds)
            else:
                log.info("model %s version %s serving (loaded and warmed up in %.2fs); version "
                         "%s drains", name, v.version, seconds, current.version)
                self._spawn(current.drain(f"model {name} version {current.version} was replaced "
                                          f"by version {v.version}"), "hff-drain")
            break
        return problems

    def _number(self, service: Service) -> int:
        return int(service.version) if self._single is None else 0

    async def _poll_forever(self, seconds: float) -> None:
        assert self.root is not None
        while True:
            await asyncio.sleep(seconds)
            try:
                found = await asyncio.to_thread(scan, self.root)
                async with self._lock:
                    for name, versions in found.items():
                        if name not in self.unloaded and not self.draining:
                            await self._refresh(name, versions, retry=False)
            except OSError as e:  # the repository's volume went away for a moment: next poll
                log.warning("polling the model repository %s failed: %s", self.root, e)

    # --- model control (app/routes/repository.py) ----------------------------------------------

    async def index(self) -> list[dict[str, str]]:
        """Every version directory with its state, as Triton's repository index has it."""
        found = ({self._single.model: [self._single]} if self._single is not None
                 else await asyncio.to_thread(scan, self.root))  # type: ignore[arg-type]
        rows = []
        for name, versions in found.items():
            current = self.models.get(name)
            for v in versions:
                state, reason = "UNAVAILABLE", "not loaded"
                if current is not None and current.version == v.version:
                    state, reason = ("READY", "") if current.ready else ("LOADING", "warming up")
                elif not v.complete:
                    reason = f"incomplete: no {MANIFEST_FILE} yet"
                elif (name, v.version) in self.refused:
                    reason = f"refused: {self.refused[name, v.version][0]}"
                elif current is not None:
                    reason = f"version {current.version} serves"
                elif name in self.unloaded:
                    reason = "unloaded"
                rows.append({"name": name, "version": v.version, "state": state,
                             "reason": reason})
        return rows

    async def load(self, name: str) -> tuple[Service, list[str]]:
        """Load (or reload to the newest version of) a model of the repository; 400 with the
        reasons when no version of it loads."""
        async with self._lock:
            versions = await asyncio.to_thread(self._versions, name)
            if not versions:
                where = self.root if self.root is not None else self.settings.MODEL_DIR
                raise ClientError(404, f"no model named {excerpt(name)} in {where}")
            if not any(v.complete for v in versions):
                raise ClientError(400, f"model {excerpt(name)} has no complete version (a "
                                       f"version directory gets {MANIFEST_FILE} last)")
            self.unloaded.discard(name)
            problems = await self._refresh(name, versions, retry=True)
            service = self.models.get(name)
            if service is None:
                raise ClientError(400, f"model {excerpt(name)} did not load: "
                                       f"{'; '.join(problems)}")
            return service, problems

    async def unload(self, name: str) -> None:
        """Stop serving a model: 404 for new requests at once; what it accepted is answered."""
        async with self._lock:
            service = self.models.pop(name, None)
            if service is None:
                raise self._not_found(name)
            self.default = min(self.models) if self.models else None
            self.unloaded.add(name)
            log.info("model %s version %s unloaded; draining", name, service.version)
        await service.drain(f"model {name} was unloaded")
