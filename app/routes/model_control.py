"""Model control as Triton has it: the repository index, load and unload (API key guarded)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.deps import ApiKey, PeersDep, RepositoryDep
from app.schemas import ErrorResponse

router = APIRouter(prefix="/v2/repository", tags=["model-control"], dependencies=[ApiKey])
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 422)}


class IndexRequest(BaseModel):
    """Triton's index request body (optional)."""

    model_config = ConfigDict(extra="forbid")
    ready: bool = Field(False, description="only the versions that are ready")


@router.post("/index", responses=_ERRORS)
async def index(repository: RepositoryDep, body: IndexRequest | None = None
                ) -> list[dict[str, str]]:
    """Every version directory of every model: name, version, state (READY, LOADING or
    UNAVAILABLE) and, when not ready, the reason."""
    rows = await repository.index()
    return [r for r in rows if r["state"] == "READY"] if body and body.ready else rows


# {model}, not {name}: any model of the repository, not only the served ones (app/openapi.py
# lists those as {name}'s values)
@router.post("/models/{model}/load", responses=_ERRORS)
async def load(model: str, repository: RepositoryDep, peers: PeersDep) -> dict[str, Any]:
    """Load the newest complete version of a model that loads (or switch to it, when an older
    one serves); 400 with the reasons when none does. Answers once it serves (in every worker
    process): the version serving, and the newer versions refused (one line each: why)."""
    service, refused = await repository.load(model)
    if peers is not None:
        await peers.control("load", model)
    answer: dict[str, Any] = {"name": service.name, "version": service.version}
    if refused:
        answer["refused"] = refused
    return answer


@router.post("/models/{model}/unload", responses=_ERRORS)
async def unload(model: str, repository: RepositoryDep, peers: PeersDep) -> dict[str, str]:
    """Stop serving a model: new requests get 404 at once; the ones it accepted are answered
    before this returns (in every worker process). The poller leaves it unloaded until it is
    loaded again."""
    await repository.unload(model)
    if peers is not None:
        await peers.control("unload", model)
    return {"name": model, "state": "UNAVAILABLE"}
