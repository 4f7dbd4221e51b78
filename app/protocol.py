"""uvicorn's httptools protocol with the two limits it lacks: a header deadline and a header size.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`), but a connection that never
sends a request, or sends its headers a byte at a time, is never closed, and httptools takes
headers of any size (a 64 MB header value was accepted). Here every request's line and headers
must arrive within `header_timeout` seconds of the connection opening or of its first byte (else
408 and close) and fit in `max_header_bytes` (else 431 and close), as nginx's
`client_header_timeout` and `large_client_header_buffers` do. Body and request timeouts are the
ASGI layer's (app.guard), so any server running the app keeps them. It is app.http's
protocol underneath, so each response still goes out in one socket write.

It also tells app.guard, through scope["extensions"]["hff.connection"], whether a request's body
has all arrived and when its connection closes, so the guard needs no deadline timer for a body
already in memory and no task per request to notice a client that leaves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from app.guard import CONNECTION
from app.http import CoalescingHttpToolsProtocol

log = logging.getLogger(__name__)

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class GuardedHttpToolsProtocol(CoalescingHttpToolsProtocol):
    """app.http's protocol + header deadline + header size limit (pass the two as keywords)."""

    def __init__(self, *args, header_timeout: float, max_header_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        # True from the connection's start or a request's first byte until its headers are parsed
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._headers_due = 0.0  # loop.time() by which the current request's headers must arrive
        # what app.guard reads through scope["extensions"][CONNECTION] (its WatchedConnection)
        self.request_complete = False
        self.on_lost: Callable[[], None] | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_due = self.loop.time() + self.header_timeout
        self._arm_header_timer()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()  # app.guard: the client left while its request was being answered

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._awaiting_headers and not self.transport.is_closing():
            self._header_bytes += len(data)  # headers still incomplete after this chunk
            if self._header_bytes > self.max_header_bytes:
                self._refuse(431, f"request line and headers over {self.max_header_bytes} bytes "
                                  "(HFF_MAX_HEADER_BYTES)")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {CONNECTION: self}
        self._request_begins()

    def on_headers_complete(self) -> None:
        self._headers_arrived()
        super().on_headers_complete()

    def _request_begins(self) -> None:
        self.request_complete = False
        self._awaiting_headers = True
        self._header_bytes = 0
        self._headers_due = self.loop.time() + self.header_timeout
        if self._header_timer is None:
            self._arm_header_timer()

    def _headers_arrived(self) -> None:
        # the timer stays armed: when it fires it looks again at the request then in progress
        # (one timer per connection per header timeout, not one per request)
        self._awaiting_headers = False

    def on_message_complete(self) -> None:
        self.request_complete = True
        super().on_message_complete()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(
            max(0.0, self._headers_due - self.loop.time()), self._header_deadline)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers or self.transport.is_closing():
            return
        if self.loop.time() < self._headers_due:  # a later request's headers: its own deadline
            self._arm_header_timer()
            return
        if self._header_bytes == 0:
            self.transport.close()  # nothing of a request arrived: just close, as nginx does
            log.info("closed a connection from %s: no request within %gs (HFF_HEADER_TIMEOUT_S)",
                     _peer(self.client), self.header_timeout)
            return
        self._refuse(408, f"the request headers did not arrive within {self.header_timeout:g}s "
                          "(HFF_HEADER_TIMEOUT_S)")

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with a JSON error and close: the connection cannot carry on."""
        log.info("refused a request from %s with %d: %s", _peer(self.client), status, message)
        self._cancel_header_timer()
        body = b'{"error": "' + message.encode() + b'"}'
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, _REASONS[status], len(body), body))
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"
