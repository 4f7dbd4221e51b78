"""The outermost ASGI layer: request metrics, the body deadline, clients that go away, and
requests cut at shutdown.

Every request path is protected by this layer whatever route or server runs it: a new request
path (a leaner handler, another ASGI server) only has to stay inside `create_app`'s middleware
stack, read the body through the `receive` it is given, and let cancellation propagate.

- Body deadline: the whole body must arrive within `body_timeout` seconds of the first read, or
  the request is answered 408 and the connection closed (nginx's client_body_timeout, as a total).
- A client that disconnects is a 499 (nginx's code for it) in the metrics and one log line; once
  its body is read, its handler is cancelled so no more work is done for it (the service drops
  its queued rows).
- A request still open when the server's graceful-shutdown timeout cuts it (uvicorn cancels the
  task) is answered 408 if its body had not arrived, else 503, and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ClientError, error_body, respond
from app.metrics import Metrics

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"
CONNECTION = "hff.connection"  # the scope["extensions"] entry app.protocol adds
_NONE: dict[str, Any] = {}


class WatchedConnection(Protocol):
    """What app.protocol's connection offers the guard (scope["extensions"][CONNECTION])."""

    request_complete: bool  # the current request's body has all arrived
    on_lost: Callable[[], None] | None  # called once if the connection closes


class BodyTimeout(ClientError):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request body did not arrive within {seconds:g}s "
                              "(HFF_BODY_TIMEOUT_S)", {"Connection": "close"})


@dataclass
class _Exchange:
    status: int = 500
    started: bool = False  # response headers sent
    complete: bool = False  # response body sent
    body_done: bool = False  # the app has read the whole request body
    disconnected: bool = False  # the client left before its answer was sent


class RequestGuard:
    """Wraps the app: see the module docstring."""

    def __init__(self, app: ASGIApp, metrics: Metrics, body_timeout: float):
        self.app = app
        self.metrics = metrics
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        ex = _Exchange()
        task = asyncio.current_task()
        # app.protocol's connection, when the server is hff-serve's uvicorn: it says whether the
        # body is all in memory (no deadline to keep) and calls back when the client leaves (no
        # watcher task); on any other server the guard waits on `receive` for both
        conn: WatchedConnection | None = scope.get("extensions", _NONE).get(CONNECTION)
        deadline: float | None = None
        watcher: asyncio.Task | None = None

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.status, ex.started = message["status"], True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ex.complete = True
            await send(message)

        def client_left() -> None:
            if not ex.complete:
                ex.disconnected = True
                if task is not None:
                    task.cancel()  # stop the handler: nobody will read its answer

        async def watch_disconnect() -> None:
            """After the body: the next message is http.disconnect, when the client leaves or
            once the response is complete."""
            if (await receive())["type"] == "http.disconnect":
                client_left()

        async def receiving() -> Message:
            nonlocal deadline, watcher
            if ex.body_done or ex.disconnected:
                return {"type": "http.disconnect"} if ex.disconnected else await receive()
            if conn is not None and conn.request_complete:
                message = await receive()  # the body is in memory: nothing to wait for
            else:
                loop = asyncio.get_running_loop()
                deadline = deadline or loop.time() + self.body_timeout
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.disconnect":
                ex.disconnected = not ex.complete  # Starlette raises ClientDisconnect: a 499
            elif not message.get("more_body", False):
                ex.body_done = True
                if conn is not None:
                    conn.on_lost = client_left
                else:
                    watcher = asyncio.create_task(watch_disconnect())
            return message

        try:
            await self.app(scope, receiving, sending)
        except asyncio.CancelledError:
            if task is not None and ex.disconnected:
                task.uncancel()  # our own cancel: the client left
            else:
                await self._cut(scope, ex, send)  # the server's shutdown timeout cut it
        finally:
            if watcher is not None:
                watcher.cancel()
            if conn is not None and conn.on_lost is client_left:
                conn.on_lost = None
        if ex.disconnected:
            ex.status = CLIENT_CLOSED
            log.info("client went away: %s %s after %.2fs, %s (499)", scope["method"],
                     scope["path"], time.perf_counter() - start,
                     "before its body arrived" if not ex.body_done else "before its answer")
        route = scope.get("route")
        # Route templates, never raw paths: unknown paths must not grow the label set.
        label = getattr(route, "path", None) or "unmatched"
        self.observe(label, ex.status, time.perf_counter() - start)

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one request (also app/rsgi.py's hot routes, which do not pass through here)."""
        self.metrics.observe_request(route, status, seconds)

    @staticmethod
    async def _cut(scope: Scope, ex: _Exchange, send: Send) -> None:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # handled here: the request ends with the answer below
        log.warning("cut at shutdown (HFF_SHUTDOWN_TIMEOUT_S): %s %s %s", scope["method"],
                    scope["path"], "before its body arrived" if not ex.body_done else "unanswered")
        if ex.started:
            return
        status, text = ((408, "the server is shutting down and the request body had not arrived")
                        if not ex.body_done else
                        (503, "the server shut down before this request was answered"))
        ex.status, ex.started, ex.complete = status, True, True
        await respond(send, status, error_body(text), {"Connection": "close", "Retry-After": "5"})
