"""ASGI middleware: the request body limit (metrics and timeouts: app.guard)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ClientError, error_response


class BodyTooLarge(ClientError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes (HFF_MAX_BODY_BYTES)")


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: at once from Content-Length, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await error_response(400, "Content-Length is not a number")(scope, receive, send)
                return
            if declared > self.max_bytes:
                await error_response(413, str(BodyTooLarge(self.max_bytes)))(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)
