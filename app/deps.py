"""Route dependencies: the service, and the API-key check for prediction and model routes."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from app.errors import ClientError
from app.service import Service


# Both are `async def` although they never await: FastAPI runs a plain `def` dependency in its
# thread pool, a thread hop per request that costs more than the check itself.
async def get_service(request: Request) -> Service:
    return request.app.state.service


async def require_api_key(request: Request) -> None:
    """401 unless the configured key comes as `X-API-Key` or `Authorization: Bearer <key>`."""
    key = request.app.state.service.settings.API_KEY
    if key is None:
        return
    supplied = request.headers.get("x-api-key", "").strip()
    auth = request.headers.get("authorization", "")
    if not supplied and auth.lower().startswith("bearer "):  # an empty X-API-Key is no key
        supplied = auth[7:].strip()
    challenge = {"WWW-Authenticate": "Bearer"}
    if not supplied:
        raise ClientError(401, "this server needs an API key: send it as X-API-Key or "
                               "Authorization: Bearer <key>", challenge)
    if not secrets.compare_digest(supplied.encode(), key.get_secret_value().encode()):
        raise ClientError(401, "the API key is not valid", challenge)


ServiceDep = Annotated[Service, Depends(get_service)]
ApiKey = Depends(require_api_key)
