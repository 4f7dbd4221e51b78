"""GET /metrics in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import PeersDep, RepositoryDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(repository: RepositoryDep, peers: PeersDep) -> Response:
    """Prometheus metrics (names in the README); with several worker processes, every worker's,
    labelled `worker`."""
    text = (generate_latest(repository.metrics.registry) if peers is None
            else await peers.metrics())
    return Response(text, media_type=CONTENT_TYPE_LATEST)
