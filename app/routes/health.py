"""Liveness and readiness: /healthz, /readyz and the KServe v2 health routes (never need a key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import RepositoryDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(repository: RepositoryDep) -> dict[str, str] | JSONResponse:
    """Every loaded model is warmed up and the server is not shutting down (503 otherwise)."""
    if not repository.ready:
        raise repository.not_ready_error()
    return {"status": "ready"}


@router.get("/v2/health/live")
async def v2_live() -> dict[str, bool]:
    """KServe v2 liveness."""
    return {"live": True}


@router.get("/v2/health/ready", response_model=None)
async def v2_ready(repository: RepositoryDep) -> dict[str, bool] | JSONResponse:
    """KServe v2 readiness (503 while warming up or shutting down)."""
    if not repository.ready:
        error = repository.not_ready_error()
        return JSONResponse({"ready": False, "error": error.message}, status_code=error.status,
                            headers=error.headers)
    return {"ready": True}
