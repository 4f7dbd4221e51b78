"""The FastAPI app (`create_app`) and the `hff-serve` command line (`main`)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from app import __version__
from app.batcher import Batcher
from app.errors import install_error_handlers
from app.metrics import Metrics
from app.middleware import BodyLimitMiddleware, MetricsMiddleware
from app.openapi import install_openapi
from app.routes import health, kserve, metrics, models, predict
from app.runtime import ModelRuntime
from app.service import Service
from app.settings import Settings
from contract.cli import OneLineParser
from contract.model_dir import ModelDirError
from contract.pydantic_errors import describe_errors

log = logging.getLogger("app")
PROG = "hff-serve"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Warm up in the background (live at once, ready after warm-up); drain the batcher at exit."""
    service: Service = app.state.service

    async def warm_up() -> None:
        await asyncio.to_thread(service.runtime.warm_up)
        batcher = Batcher(service.runtime, service.metrics,
                          max_batch_size=service.settings.MAX_BATCH_SIZE,
                          max_wait_ms=service.settings.MAX_BATCH_WAIT_MS,
                          queue_bound=service.settings.QUEUE_BOUND)
        batcher.start()
        service.batcher = batcher
        service.warmed = True
        log.info("ready: serving %s on %s", service.manifest.name, service.runtime.device)

    task = asyncio.create_task(warm_up(), name="hff-warm-up")
    try:
        yield
    finally:
        service.draining = True
        if not task.done():
            task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        if service.batcher is not None:
            await service.batcher.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service for `settings` (default: from HFF_* environment variables)."""
    settings = settings or Settings()
    runtime = ModelRuntime(settings.MODEL_DIR, device=settings.DEVICE, threads=settings.THREADS,
                           max_batch_size=settings.MAX_BATCH_SIZE)
    metrics_ = Metrics()
    app = FastAPI(title="HFF serve", version=__version__, lifespan=lifespan,
                  description="Hyperspherical Forward-Forward inference with dynamic batching "
                              "and per-sample early exit.")
    app.state.service = Service(settings, runtime, metrics_)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.MAX_BODY_BYTES)
    app.add_middleware(MetricsMiddleware, metrics=metrics_)  # outermost: sees every status
    for module in (predict, kserve, health, models, metrics):
        app.include_router(module.router)
    install_openapi(app, runtime.manifest, settings.MAX_INSTANCES)
    if importlib.util.find_spec("app.demo") is not None:  # the demo page, when it is installed
        from app import demo

        app.include_router(demo.router)
    return app


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: not ready at once, no new work, then uvicorn's graceful shutdown."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:  # type: ignore[override]
        self.service.draining = True
        if self.service.batcher is not None:
            self.service.batcher.close()
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured:
            # uvicorn re-raises captured signals after shutdown; a drained SIGTERM exits 0 instead
            captured.remove(sig)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Serve an exported HFF model dir over HTTP. Every "
                      "setting also comes from HFF_* environment variables (README: settings).")
    p.add_argument("--model-dir", default=None, help="model dir written by hff-export "
                   "(HFF_MODEL_DIR, default models/digits)")
    p.add_argument("--host", default=None, help="address to listen on (HFF_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (HFF_PORT, default 8000)")
    return p


def load_settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in (("MODEL_DIR", args.model_dir), ("HOST", args.host),
                                   ("PORT", args.port)) if v is not None}
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args)
        logging.basicConfig(level=settings.LOG_LEVEL.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = create_app(settings)
    except ValidationError as e:
        message = describe_errors(e, name=lambda field: f"HFF_{field.upper()}")
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except ModelDirError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=settings.HOST, port=settings.PORT,
                            log_level=settings.LOG_LEVEL, access_log=False,
                            timeout_graceful_shutdown=None)
    server = DrainingServer(config, app.state.service)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
