"""The FastAPI app (`create_app`) and the `hff-serve` command line (`main`)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from app import __version__
from app.accept import EagerListener
from app.errors import ClientError, install_error_handlers
from app.guard import RequestGuard
from app.hotpath import HotPathProtocol, HotRoutes
from app.metrics import Metrics
from app.middleware import ServiceMiddleware
from app.openapi import install_openapi
from app.peers import WorkerPeers
from app.repository import ModelRepository
from app.routes import health, kserve, metrics, model_control, models, predict
from app.settings import Settings
from contract.cli import OneLineParser
from contract.model_dir import ModelDirError
from contract.pydantic_errors import describe_errors

log = logging.getLogger("app")
PROG = "hff-serve"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Warm up in the background (live at once, ready after warm-up); drain the batchers at exit."""
    repository: ModelRepository = app.state.repository
    peers: WorkerPeers | None = app.state.peers
    tune_gc()
    if peers is not None:
        await peers.start()
    repository.start()
    try:
        yield
    finally:
        await repository.stop()
        if peers is not None:
            await peers.stop()


def tune_gc() -> None:
    """At start-up: the objects alive now (modules, the app) leave the collector's
    generations for good (gc.freeze), and young collections run every 100,000 allocations
    instead of 700. Every request allocates dicts, coroutines and futures, so the default
    thresholds ran a collection every few requests, and a full one now and then that stalled
    every connection (docs/request-path.md, run 4: p99 at 64 connections 122 -> 45 ms).
    Cyclic garbage still gets collected, in fewer, larger passes."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


class ServiceApp(FastAPI):
    """FastAPI with two layers outside all of its own (Starlette's error middleware included):
    outermost app.guard's RequestGuard (metrics, body deadline, disconnects, the shutdown cut:
    it sees every status), then app/middleware.py's (body limit, the hot routes, which pass
    through nothing else)."""

    def build_middleware_stack(self):  # type: ignore[no-untyped-def]
        repository: ModelRepository = self.state.repository
        return RequestGuard(ServiceMiddleware(super().build_middleware_stack(), repository),
                            metrics=repository.metrics,
                            body_timeout=repository.settings.BODY_TIMEOUT_S)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.root_path:
            # What Starlette's entry does, inline (one coroutine less per request), without
            # FastAPI's OpenTelemetry probe: it asks OpenTelemetry for its providers, which reads
            # environment variables, on every request (3% of the samples under load), and this
            # app configures no telemetry
            scope["app"] = self
            if self.middleware_stack is None:
                self.middleware_stack = self.build_middleware_stack()
            await self.middleware_stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service for `settings` (default: from HFF_* environment variables)."""
    settings = settings or Settings()
    repository = ModelRepository(settings, Metrics())
    # redirect_slashes off: Starlette builds those redirects from the client's Host header
    app = ServiceApp(title="HFF serve", version=__version__, lifespan=lifespan,
                     redirect_slashes=False,
                     description="Hyperspherical Forward-Forward inference with dynamic batching "
                                 "and per-sample early exit.")
    app.state.repository = repository
    app.state.peers = None  # the other worker processes (app.workers sets it)
    install_error_handlers(app)
    for module in (predict, kserve, health, models, model_control, metrics):
        app.include_router(module.router)
    install_openapi(app, repository, settings.MAX_INSTANCES)
    if importlib.util.find_spec("app.demo") is not None:  # the demo page, when it is installed
        from app import demo

        app.include_router(demo.router)
    return app


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: not ready at once, no new work, then uvicorn's graceful shutdown."""

    def __init__(self, config: uvicorn.Config, repository: ModelRepository):
        super().__init__(config)
        self.repository = repository

    async def startup(self, sockets=None) -> None:  # type: ignore[override]
        await super().startup(sockets)
        if not self.started:
            return
        # every pending connection accepted each loop turn, not uvloop's one (app/accept.py)
        config, loop = self.config, asyncio.get_running_loop()
        protocol = partial(config.http_protocol_class, config=config,
                           server_state=self.server_state, app_state=self.lifespan.state,
                           _loop=loop)
        self.servers = [listener for server in self.servers
                        for listener in EagerListener.take_over(server, protocol)]

    def handle_exit(self, sig, frame) -> None:  # type: ignore[override]
        refusal = ClientError(503, "the server is shutting down", {"Retry-After": "5"})
        with suppress(RuntimeError):  # a signal handler: touch the line from the loop, not here
            asyncio.get_running_loop().call_soon_threadsafe(
                self.repository.admission.refuse_waiting, refusal)
        self.repository.close()
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured:
            # uvicorn re-raises captured signals after shutdown; a drained SIGTERM exits 0 instead
            captured.remove(sig)


def serve_granian(settings: Settings) -> int:
    """Serve on Granian's RSGI interface (app/rsgi.py) in one worker process, which builds the
    app from HFF_* variables: the command line's settings are passed on that way."""
    try:
        from granian import Granian
        from granian.http import HTTP1Settings
    except ImportError:
        print(f"{PROG}: error: HFF_SERVER=granian needs the granian extra "
              "(pip install 'hff-serve[granian]')", file=sys.stderr)
        return 2
    os.environ.update(HFF_MODEL_DIR=str(settings.MODEL_DIR.resolve()), HFF_HOST=settings.HOST,
                      HFF_PORT=str(settings.PORT))
    if settings.MODEL_REPOSITORY is not None:
        os.environ["HFF_MODEL_REPOSITORY"] = str(settings.MODEL_REPOSITORY.resolve())
    server = Granian("app.rsgi:create_rsgi_app", factory=True, interface="rsgi",
                     address=settings.HOST, port=settings.PORT, workers=1, runtime_mode="st",
                     loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
                     log_level=settings.LOG_LEVEL, log_access=False,
                     # the header deadline of app.protocol, in Granian's terms (app/rsgi.py says
                     # which of uvicorn's other limits Granian does not get)
                     http1_settings=HTTP1Settings(
                         header_read_timeout=max(1, round(settings.HEADER_TIMEOUT_S * 1000))))
    server.serve()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Serve an exported HFF model dir, or a repository "
                      "of them, over HTTP. Every setting also comes from HFF_* environment "
                      "variables (README: settings).")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model-dir", default=None, help="model dir written by hff-export "
                        "(HFF_MODEL_DIR, default models/digits)")
    source.add_argument("--model-repository", default=None, help="model repository, "
                        "<model>/<version>/ model dirs (HFF_MODEL_REPOSITORY; README: model "
                        "repository)")
    p.add_argument("--host", default=None, help="address to listen on (HFF_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (HFF_PORT, default 8000)")
    p.add_argument("--workers", type=int, default=None, help="worker processes serving the port "
                   "(HFF_WORKERS, default 1; README: several worker processes)")
    return p


def load_settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in (("MODEL_DIR", args.model_dir), ("HOST", args.host),
                                   ("PORT", args.port), ("WORKERS", args.workers),
                                   ("MODEL_REPOSITORY", args.model_repository)) if v is not None}
    if args.model_dir is not None:
        overrides["MODEL_REPOSITORY"] = ""  # --model-dir wins over HFF_MODEL_REPOSITORY
    return Settings(**overrides)


def configure_logging(settings: Settings, worker: int | None = None) -> None:
    who = "" if worker is None else f" [worker {worker}]"
    logging.basicConfig(level=settings.LOG_LEVEL.upper(),
                        format=f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s")


def server_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn with every client-controlled wait bounded (README: operations), writing each
    response in one socket write (app.http), and answering the hot routes inside its protocol
    (app.hotpath, on top of app.protocol's limits)."""
    protocol = partial(HotPathProtocol, header_timeout=settings.HEADER_TIMEOUT_S,
                       max_header_bytes=settings.MAX_HEADER_BYTES,
                       hot=HotRoutes(app.state.repository))
    return uvicorn.Config(app, host=settings.HOST, port=settings.PORT, http=protocol,
                          proxy_headers=False,  # nothing here reads the client's address
                          log_level=settings.LOG_LEVEL, access_log=False,
                          timeout_keep_alive=settings.KEEP_ALIVE_TIMEOUT_S,
                          timeout_graceful_shutdown=settings.SHUTDOWN_TIMEOUT_S,
                          limit_concurrency=settings.MAX_CONNECTIONS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args)
        configure_logging(settings)
        app = create_app(settings)
    except ValidationError as e:
        message = describe_errors(e, name=lambda field: f"HFF_{field.upper()}")
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except ModelDirError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if settings.SERVER == "granian":
        return serve_granian(settings)
    if settings.WORKERS > 1:
        from app.workers import supervise

        del app  # it was built to check the model dir; each worker builds its own
        gc.collect()
        return supervise(settings)
    return run_server(app, settings)


def run_server(app: FastAPI, settings: Settings, sockets: list | None = None) -> int:
    """Serve `app` with uvicorn until SIGTERM (on `sockets` when given: app.workers); the exit
    status."""
    repository: ModelRepository = app.state.repository
    server = DrainingServer(server_config(app, settings), repository)
    repository.on_failure = lambda: setattr(server, "should_exit", True)
    server.run(sockets=sockets)
    return 0 if server.started and repository.failure is None else 1


if __name__ == "__main__":
    sys.exit(main())
