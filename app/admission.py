"""Admission control: how much work the server takes on, decided before a request's body is read.

A request reserves rows (instances) and body bytes before its body is read: its Content-Length
gives the bytes, and an upper bound on its rows (no instance can be encoded in fewer than
`MIN_ROW_BYTES` bytes; at most `max_instances`). Once the body is parsed the reservation is
settled to the real row count, and it is released when the request ends. Requests that do not
fit wait in arrival order, their bodies unread (uvicorn stops reading a socket whose request is
not being read), for at most `max_wait_s`, then get 429 with Retry-After. So the work accepted is
bounded in rows (`HFF_QUEUE_BOUND`) and bytes (`HFF_QUEUE_BYTES`), a refusal costs no parsing,
and a client that keeps sending more than the server can do waits instead of spinning on 429s:
the batcher stays busy with the requests it has, and goodput holds at capacity.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass, field

from app.errors import ClientError
from app.metrics import Metrics

# The fewest bytes one instance can take in any accepted encoding: a tiny PNG in base64 inside
# {"b64": ...} (about 100 bytes), a multipart part, or 2 bytes per number ("0,") of a JSON array.
MIN_ROW_BYTES = 64


class Busy(ClientError):
    def __init__(self, message: str):
        super().__init__(429, message, {"Retry-After": "1"})


@dataclass(eq=False)
class Ticket:
    """One request's share of the admitted work."""

    rows: int
    nbytes: int
    deadline: float  # loop.time() by which the request must be answered (HFF_REQUEST_TIMEOUT_S)
    admitted: bool = False
    started: float = field(default_factory=time.monotonic)  # when the request asked for room


class Admission:
    """Admitted rows and bytes against their bounds, and the FIFO of requests waiting for room."""

    def __init__(self, max_rows: int, max_bytes: int, max_wait_s: float, max_instances: int,
                 metrics: Metrics):
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_wait_s = max_wait_s
        self.max_instances = max_instances
        self.metrics = metrics
        self.rows = 0
        self.nbytes = 0
        self._waiting: collections.deque[tuple[Ticket, asyncio.Future]] = collections.deque()
        # read when /metrics is scraped: a gauge set on every change cost a lock per request
        metrics.admitted_rows.set_function(lambda: self.rows)
        metrics.admitted_bytes.set_function(lambda: self.nbytes)
        metrics.waiting_requests.set_function(lambda: len(self._waiting))

    def estimate_rows(self, content_length: int | None, min_row_bytes: int = MIN_ROW_BYTES) -> int:
        """The most instances a body of this size can hold (max_instances when unknown)."""
        if content_length is None:
            return self.max_instances
        return max(1, min(self.max_instances, math.ceil(content_length / min_row_bytes)))

    def _fits(self, ticket: Ticket) -> bool:
        if self.rows == 0 and self.nbytes == 0:
            return True  # the first request always fits, even one bigger than the bounds
        return (self.rows + ticket.rows <= self.max_rows
                and self.nbytes + ticket.nbytes <= self.max_bytes)

    def _take(self, ticket: Ticket) -> None:
        ticket.admitted = True
        self.rows += ticket.rows
        self.nbytes += ticket.nbytes

    def _ticket(self, content_length: int | None, body_limit: int, deadline: float,
                min_row_bytes: int) -> Ticket:
        return Ticket(self.estimate_rows(content_length, min_row_bytes),
                      body_limit if content_length is None else content_length, deadline)

    def _take_now(self, ticket: Ticket) -> bool:
        """Take the room at once if nobody waits for it and it fits."""
        if not self._waiting and self._fits(ticket):
            self._take(ticket)
            return True
        return False

    def try_acquire(self, content_length: int | None, body_limit: int, deadline: float,
                    min_row_bytes: int = MIN_ROW_BYTES) -> Ticket | None:
        """`acquire` without waiting: the ticket when there is room now and nobody waits for
        it, else None and nothing reserved (app.hotpath then hands the request to the ASGI
        route, which waits in line). With no wait allowed (`max_wait_s` 0) there is no line:
        Busy (429) at once, so the hot path refuses without the ASGI route, whose cost per
        refusal (hundreds of microseconds) took a server past capacity below its capacity."""
        ticket = self._ticket(content_length, body_limit, deadline, min_row_bytes)
        if self._take_now(ticket):
            return ticket
        if self.max_wait_s <= 0:
            raise self._busy()
        return None

    async def acquire(self, content_length: int | None, body_limit: int, deadline: float,
                      min_row_bytes: int = MIN_ROW_BYTES) -> Ticket:
        """Reserve room for a request, waiting in line for it; 429 when none comes in time."""
        ticket = self._ticket(content_length, body_limit, deadline, min_row_bytes)
        if self._take_now(ticket):
            return ticket
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        entry = (ticket, future)
        self._waiting.append(entry)
        try:
            wait = min(self.max_wait_s, deadline - loop.time())
            await asyncio.wait_for(future, max(0.0, wait))
        except TimeoutError:
            if not ticket.admitted:
                raise self._busy() from None
        except BaseException:  # cancelled (the client left) or refused at shutdown
            self.release(ticket)  # in case room was given to it a moment before
            raise
        finally:
            if entry in self._waiting:
                self._waiting.remove(entry)
                self._wake()  # the line moved: the next one may fit now
        return ticket

    def _busy(self) -> Busy:
        return Busy(f"the server is busy: {self.rows} instances and {self.nbytes >> 20} MB of "
                    f"requests ahead, and no room came within {self.max_wait_s:g}s "
                    "(HFF_QUEUE_BOUND, HFF_QUEUE_BYTES, HFF_QUEUE_WAIT_S); retry later")

    def settle(self, ticket: Ticket, rows: int) -> None:
        """The body is parsed: hold the request's real row count instead of the estimate."""
        self.rows += rows - ticket.rows
        ticket.rows = rows
        self._wake()

    def release(self, ticket: Ticket) -> None:
        if not ticket.admitted:
            return
        ticket.admitted = False
        self.rows -= ticket.rows
        self.nbytes -= ticket.nbytes
        self._wake()

    def refuse_waiting(self, error: ClientError) -> None:
        """Shutdown: everyone still in line gets `error` now."""
        while self._waiting:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def _wake(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            ticket, future = self._waiting.popleft()
            if future.done():  # gave up (timeout) a moment ago
                continue
            self._take(ticket)
            future.set_result(None)
