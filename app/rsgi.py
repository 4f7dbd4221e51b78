"""The app on Granian's RSGI interface (`HFF_SERVER=granian`, the `granian` extra).

Granian parses HTTP in Rust on its own thread; RSGI hands Python a request object and takes the
response in one call, without ASGI's message dicts. The hot routes are answered through the same
`ServiceMiddleware.answer` as on uvicorn (so admission, decode threads and the request deadline
are the same code), counted by the same `RequestGuard.observe`, with the guard's body deadline;
every other request is handed to the ASGI app, through the guard (so the body limit, metrics,
FastAPI's routes and error handlers are the same code on both servers).

Not on Granian (README, "Operations"): app.protocol's header size limit (Granian's own HTTP
buffer, about 400 KB, bounds headers instead) and uvicorn's keep-alive and graceful-shutdown
timeouts and connection limit; a client that leaves during inference on a hot route is not
noticed until its answer is written. The header deadline is Granian's own (HFF_HEADER_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import unquote

from granian.rsgi import ProtocolClosed

from app.guard import CLIENT_CLOSED, BodyTimeout, RequestGuard
from app.main import ServiceApp, configure_logging, create_app, lifespan
from app.middleware import BodyTooLarge, ClientGone, ServiceMiddleware, hot_route
from app.settings import Settings

JSON = "application/json"


class RSGIApp:
    """An RSGI application around the ASGI one; lifespan through Granian's init/del hooks."""

    def __init__(self, app: ServiceApp):
        self.app = app
        self.guard: RequestGuard = app.build_middleware_stack()
        app.middleware_stack = self.guard  # the ASGI path below goes through the same layers
        self.front: ServiceMiddleware = self.guard.app  # type: ignore[assignment]
        self.body_timeout = app.state.repository.settings.BODY_TIMEOUT_S
        self._lifespan: Any = None

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._lifespan = lifespan(self.app)
        loop.run_until_complete(self._lifespan.__aenter__())

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Granian has stopped accepting and answered what was open: drain the batcher and stop
        loop.run_until_complete(self._lifespan.__aexit__(None, None, None))

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":
            return  # no websockets here
        start = time.perf_counter()
        headers = dict(scope.headers.items())  # lower-case names
        declared = headers.get("content-length")
        hot = hot_route(scope.method, scope.path, headers)
        front = self.front
        if hot is None or (declared is not None and front.length_problem(declared) is not None):
            await self._asgi(scope, proto, headers)
            return
        route, handler, name, version = hot

        async def body() -> bytes:
            try:
                async with asyncio.timeout(self.body_timeout):
                    return await read_body(proto, front.max_bytes, declared)
            except TimeoutError:
                raise BodyTimeout(self.body_timeout) from None

        answer = await front.answer(handler, name, version, headers, body)
        if answer is None:
            status = CLIENT_CLOSED
        else:
            status, out_body, extra = answer
            out = [("content-type", JSON)]
            if extra:
                out += list(extra.items())
            proto.response_bytes(status, out, out_body)
        self.guard.observe(route.path, status, time.perf_counter() - start)

    async def _asgi(self, scope: Any, proto: Any, headers: dict[str, str]) -> None:
        """One request through the ASGI app, its response collected and sent in one piece."""
        try:
            body = await read_body(proto, self.front.max_bytes + 1, None, strict=False)
        except ClientGone:
            return
        client_host, _, client_port = scope.client.rpartition(":")
        server_host, _, server_port = scope.server.rpartition(":")
        asgi_scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": scope.http_version, "method": scope.method, "scheme": scope.scheme,
            "path": unquote(scope.path), "raw_path": scope.path.encode(),
            "query_string": scope.query_string.encode(), "root_path": "",
            "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in scope.headers.items()],
            "client": (client_host, int(client_port or 0)),
            "server": (server_host, int(server_port or 0)),
            "state": {},
        }
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                await asyncio.Event().wait()  # as a live connection: nothing more to read
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        status, out, chunks = 500, [], []

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, out
            if message["type"] == "http.response.start":
                status = message["status"]
                out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(asgi_scope, receive, send)
        proto.response_bytes(status, out, b"".join(chunks))


async def read_body(proto: Any, limit: int, declared: str | None, strict: bool = True) -> bytes:
    """The request body; past `limit` bytes BodyTooLarge (strict) or the first limit bytes."""
    try:
        if declared is not None:  # already checked against the limit
            return await proto()
        chunks, size = [], 0
        async for chunk in proto:
            size += len(chunk)
            chunks.append(chunk)
            if size > limit:
                if strict:
                    raise BodyTooLarge(limit)
                break
        return b"".join(chunks)
    except ProtocolClosed:
        raise ClientGone from None


def create_rsgi_app() -> RSGIApp:
    """Granian's factory: the app from HFF_* environment variables (set by `hff-serve`)."""
    settings = Settings()
    configure_logging(settings)  # this is a fresh worker process
    return RSGIApp(create_app(settings))
