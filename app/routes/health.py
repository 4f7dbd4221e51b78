"""Liveness and readiness: /healthz, /readyz and the KServe v2 health routes (never need a key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import PeersDep, RepositoryDep
from app.errors import ClientError
from app.peers import WorkerPeers
from app.repository import ModelRepository

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(repository: RepositoryDep, peers: PeersDep) -> dict[str, str] | JSONResponse:
    """Every loaded model is warmed up and the server is not shutting down, in every worker
    process (503 otherwise)."""
    error = await not_ready(repository, peers)
    if error is not None:
        raise error
    return {"status": "ready"}


@router.get("/v2/health/live")
async def v2_live() -> dict[str, bool]:
    """KServe v2 liveness."""
    return {"live": True}


@router.get("/v2/health/ready", response_model=None)
async def v2_ready(repository: RepositoryDep, peers: PeersDep) -> dict[str, bool] | JSONResponse:
    """KServe v2 readiness (503 while warming up or shutting down)."""
    error = await not_ready(repository, peers)
    if error is not None:
        return JSONResponse({"ready": False, "error": error.message}, status_code=error.status,
                            headers=error.headers)
    return {"ready": True}


async def not_ready(repository: ModelRepository, peers: WorkerPeers | None) -> ClientError | None:
    """The 503 a readiness probe gets, or None when this process and every other worker is ready."""
    if not repository.ready:
        return repository.not_ready_error()
    reason = None if peers is None else await peers.not_ready()
    return None if reason is None else repository.not_ready_error(reason)
