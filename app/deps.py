"""Route dependencies: the model repository, the model a route names, and the API-key check for
prediction, model and model-control routes."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request

from app.errors import ClientError
from app.peers import WorkerPeers
from app.repository import ModelRepository
from app.service import Service


# All are `async def` although they never await: FastAPI runs a plain `def` dependency in its
# thread pool, a thread hop per request that costs more than the check itself.
async def get_repository(request: Request) -> ModelRepository:
    return request.app.state.repository


async def get_peers(request: Request) -> WorkerPeers | None:
    """The other worker processes of this hff-serve (HFF_WORKERS > 1), else None."""
    return request.app.state.peers


async def get_default_service(request: Request) -> Service:
    """The default model (plain /predict): the only one, or the first by name."""
    return request.app.state.repository.find(None)


async def get_service(request: Request, name: str) -> Service:
    """The serving version of the model named in the path."""
    return request.app.state.repository.find(name)


async def get_service_version(request: Request, name: str, version: str) -> Service:
    """The model version named in the path (404 unless it is the one serving)."""
    return request.app.state.repository.find(name, version)


async def require_api_key(request: Request) -> None:
    """401 unless the configured key comes as `X-API-Key` or `Authorization: Bearer <key>`."""
    check_api_key(request.app.state.repository, request.headers)


def check_api_key(server: ModelRepository | Service, headers: Mapping[str, str]) -> None:
    """The API-key check itself, for the dependency and for the hot routes (app/middleware.py);
    `headers` maps lower-case names to values."""
    key = server.settings.API_KEY
    if key is None:
        return
    supplied = headers.get("x-api-key", "").strip()
    auth = headers.get("authorization", "")
    if not supplied and auth.lower().startswith("bearer "):  # an empty X-API-Key is no key
        supplied = auth[7:].strip()
    challenge = {"WWW-Authenticate": "Bearer"}
    if not supplied:
        raise ClientError(401, "this server needs an API key: send it as X-API-Key or "
                               "Authorization: Bearer <key>", challenge)
    if not secrets.compare_digest(supplied.encode(), key.get_secret_value().encode()):
        raise ClientError(401, "the API key is not valid", challenge)


RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
PeersDep = Annotated[WorkerPeers | None, Depends(get_peers)]
ServiceDep = Annotated[Service, Depends(get_default_service)]
NamedServiceDep = Annotated[Service, Depends(get_service)]
VersionedServiceDep = Annotated[Service, Depends(get_service_version)]
ApiKey = Depends(require_api_key)
