"""The one ASGI layer in front of FastAPI: the body limit, the request metrics, and the hot routes.

POST /predict with a JSON body and POST /v2/models/{name}/infer are answered here, without
FastAPI's per-request routing, dependency solving and response classes: at a few thousand small
requests a second those were most of one request's cost (README, "Request path"). They call the
same functions as the FastAPI routes (auth in app/deps.py, decoding and the response body in
app/routes/), so behaviour and errors are one implementation; FastAPI still routes everything
else and documents all routes in /docs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.decoding import media_type
from app.deps import check_api_key
from app.errors import ClientError
from app.routes.kserve import infer_json
from app.routes.predict import is_json, predict_json
from app.service import Service

log = logging.getLogger(__name__)

JSON_HEADERS = [(b"content-type", b"application/json")]
V2_MODELS, INFER = "/v2/models/", "/infer"
# (service, model name from the path, headers, body) -> the response body
HotHandler = Callable[[Service, str, dict[str, str], bytes], Awaitable[dict[str, Any]]]


class BodyTooLarge(ClientError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes (HFF_MAX_BODY_BYTES)")


class ClientGone(Exception):
    """The client closed the connection before its request body arrived."""


def error_body(message: str) -> bytes:
    """The one error format, {"error": "..."} (app/errors.py answers FastAPI's the same way)."""
    return orjson.dumps({"error": message})


class ServiceMiddleware:
    """Body limit and metrics for every request; the hot routes served directly."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app = app
        self.service = service
        self.max_bytes = service.settings.MAX_BODY_BYTES
        self.metrics = service.metrics
        # labelled children looked up once: .labels() costs a lock and a dict build per call
        self._counters: dict[tuple[str, int], Any] = {}
        self._latencies: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # lower-case names (ASGI guarantees it); the first of repeated headers wins, as in Starlette
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}
        status = 500
        route = "unmatched"
        try:
            declared = headers.get("content-length")
            if declared is not None and (problem := self.length_problem(declared)) is not None:
                status = problem.status
                await respond(send, status, error_body(problem.message))
                return
            hot = hot_route(scope["method"], scope["path"], headers)
            if hot is not None:
                route, handler, name = hot
                status = await self._serve_hot(handler, name, headers, receive, send)
                return
            sent: list[int] = []

            async def sending(message: Message) -> None:
                if message["type"] == "http.response.start":
                    sent.append(message["status"])
                await send(message)

            try:
                await self.app(scope, self._limited(receive), sending)
            finally:
                status = sent[0] if sent else 500
                # Route templates, never raw paths: unknown paths must not grow the label set.
                route = getattr(scope.get("route"), "path", None) or "unmatched"
        finally:
            self.observe(route, status, time.perf_counter() - start)

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

    async def _serve_hot(self, handler: HotHandler, name: str, headers: dict[str, str],
                         receive: Receive, send: Send) -> int:
        answer = await self.answer(handler, name, headers, lambda: self._read_body(receive))
        if answer is None:
            return 499  # nginx's "client closed request": nobody to answer
        status, out, extra = answer
        await respond(send, status, out, extra)
        return status

    async def answer(self, handler: HotHandler, name: str, headers: dict[str, str],
                     read_body: Callable[[], Awaitable[bytes]]
                     ) -> tuple[int, bytes, dict[str, str] | None] | None:
        """A hot route's (status, JSON body, extra headers), whatever the server interface;
        None when the client went away before its body arrived."""
        try:
            check_api_key(self.service, headers)
            body = await read_body()
            return 200, orjson.dumps(await handler(self.service, name, headers, body)), None
        except ClientError as e:
            return e.status, error_body(e.message), e.headers
        except ClientGone:
            return None
        except Exception:
            log.exception("unexpected error on a hot route")
            return 500, error_body("internal server error (logged on the server)"), None

    def observe(self, route: str, status: int, seconds: float) -> None:
        counter = self._counters.get((route, status))
        if counter is None:
            counter = self._counters[route, status] = self.metrics.requests.labels(
                route=route, status=str(status))
        latency = self._latencies.get(route)
        if latency is None:
            latency = self._latencies[route] = self.metrics.latency.labels(route=route)
        counter.inc()
        latency.observe(seconds)


async def respond(send: Send, status: int, body: bytes,
                  extra: dict[str, str] | None = None) -> None:
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if extra:
        headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _predict(service: Service, name: str, headers: dict[str, str],
                   body: bytes) -> dict[str, Any]:
    return await predict_json(service, body)


def hot_route(method: str, path: str,
              headers: dict[str, str]) -> tuple[str, HotHandler, str] | None:
    """(route template, handler, model name) for a request the hot path answers, else None."""
    if method != "POST":
        return None
    if path == "/predict":
        return ("/predict", _predict, "") if is_json(media_type(headers)) else None
    if path.startswith(V2_MODELS) and path.endswith(INFER):
        name = path[len(V2_MODELS):-len(INFER)]
        if name and "/" not in name:
            return "/v2/models/{name}/infer", infer_json, name
    return None
