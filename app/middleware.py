"""The ASGI layer inside app.guard's: the body limit, and the hot routes.

POST /predict and /v1/models/{name}:predict with a JSON body and POST
/v2/models/{name}[/versions/{version}]/infer are answered here, without
FastAPI's per-request routing, dependency solving and response classes: at a few thousand small
requests a second those were most of one request's cost (README, "Request path"). They call the
same functions as the FastAPI routes (auth in app/deps.py; admission, decoding, inference and
the response body in app/routes/), so behaviour and errors are one implementation; FastAPI still
routes everything else and documents all routes in /docs. app.guard's RequestGuard sits outside
this layer (app.main.ServiceApp), so the hot routes keep its metrics, body deadline, disconnect
handling and shutdown cut; they read the body through the guard's `receive`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.decoding import media_type
from app.deps import check_api_key
from app.errors import ClientError, error_body, respond
from app.repository import ModelRepository
from app.routes.kserve import infer_json
from app.routes.predict import is_json, predict_json
from app.service import Service

log = logging.getLogger(__name__)

V2_MODELS, INFER, VERSIONS = "/v2/models/", "/infer", "/versions/"
V1_MODELS, PREDICT_VERB = "/v1/models/", ":predict"
BodyReader = Callable[[], Awaitable[bytes]]
# (the model version the path names, headers, body reader) -> the response body; the handler
# reads the body only once its request is admitted (Service.admit)
HotHandler = Callable[[Service, dict[str, str], BodyReader], Awaitable[dict[str, Any]]]


class BodyTooLarge(ClientError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes (HFF_MAX_BODY_BYTES)")


class ClientGone(Exception):
    """The client closed the connection before its request body arrived."""


class RouteTemplate(NamedTuple):
    """What app.guard reads from scope["route"] (as from a FastAPI route): the metrics label."""

    path: str


PREDICT, INFER_ROUTE = RouteTemplate("/predict"), RouteTemplate("/v2/models/{name}/infer")
NAMED_PREDICT = RouteTemplate("/v1/models/{name}:predict")
VERSION_PREDICT = RouteTemplate("/v1/models/{name}/versions/{version}:predict")
VERSION_INFER = RouteTemplate("/v2/models/{name}/versions/{version}/infer")


class ServiceMiddleware:
    """Body limit for every request; the hot routes served directly."""

    def __init__(self, app: ASGIApp, repository: ModelRepository):
        self.app = app
        self.repository = repository
        self.max_bytes = repository.settings.MAX_BODY_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # lower-case names (ASGI guarantees it); the first of repeated headers wins, as in Starlette
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}
        declared = headers.get("content-length")
        if declared is not None and (problem := self.length_problem(declared)) is not None:
            await respond(send, problem.status, error_body(problem.message))
            return
        hot = hot_route(scope["method"], scope["path"], headers)
        if hot is None:
            await self.app(scope, self._limited(receive), send)
            return
        route, handler, name, version = hot
        scope["route"] = route  # app.guard labels the request by this template
        answer = await self.answer(handler, name, version, headers,
                                   lambda: self._read_body(receive))
        if answer is not None:  # else the client left; app.guard counts the 499
            status, out, extra = answer
            await respond(send, status, out, extra)

    def length_problem(self, declared: str) -> ClientError | None:
        try:
            length = int(declared)
        except ValueError:
            return ClientError(400, "Content-Length is not a number")
        return BodyTooLarge(self.max_bytes) if length > self.max_bytes else None

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that raises BodyTooLarge (a 413 through FastAPI's handler) past the limit."""
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        return limited

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            if not message.get("more_body", False):
                return b"".join((*chunks, chunk)) if chunks else chunk
            chunks.append(chunk)

    async def answer(self, handler: HotHandler, name: str | None, version: str | None,
                     headers: dict[str, str],
                     read_body: BodyReader) -> tuple[int, bytes, dict[str, str] | None] | None:
        """A hot route's (status, JSON body, extra headers), whatever the server interface;
        None when the client went away before its body arrived."""
        try:
            check_api_key(self.repository, headers)
            service = self.repository.find(name, version)  # the model version it names
            return 200, orjson.dumps(await handler(service, headers, read_body)), None
        except ClientError as e:
            return e.status, error_body(e.message), e.headers
        except ClientGone:
            return None
        except Exception:
            log.exception("unexpected error on a hot route")
            return 500, error_body("internal server error (logged on the server)"), None


def hot_route(method: str, path: str, headers: dict[str, str]
              ) -> tuple[RouteTemplate, HotHandler, str | None, str | None] | None:
    """(route template, handler, model name, version) for a request the hot path answers, else
    None; name None: the default model, version None: the one serving."""
    if method != "POST":
        return None
    if path == "/predict":
        return (PREDICT, predict_json, None, None) if is_json(media_type(headers)) else None
    if path.startswith(V2_MODELS) and path.endswith(INFER):
        return _named(path[len(V2_MODELS):-len(INFER)], INFER_ROUTE, VERSION_INFER, infer_json)
    if path.startswith(V1_MODELS) and path.endswith(PREDICT_VERB) and is_json(media_type(headers)):
        return _named(path[len(V1_MODELS):-len(PREDICT_VERB)], NAMED_PREDICT, VERSION_PREDICT,
                      predict_json)
    return None


def _named(rest: str, route: RouteTemplate, versioned: RouteTemplate, handler: HotHandler
           ) -> tuple[RouteTemplate, HotHandler, str | None, str | None] | None:
    """`name` or `name/versions/v` from a path's middle part."""
    name, sep, version = rest.partition(VERSIONS)
    if not name or "/" in name or (sep and (not version or "/" in version)):
        return None
    return (versioned, handler, name, version) if sep else (route, handler, name, None)
