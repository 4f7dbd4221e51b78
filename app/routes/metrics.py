"""GET /metrics in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import RepositoryDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(repository: RepositoryDep) -> Response:
    """Prometheus metrics (names in the README)."""
    return Response(generate_latest(repository.metrics.registry), media_type=CONTENT_TYPE_LATEST)
