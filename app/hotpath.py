"""The hot routes answered inside the HTTP protocol: no ASGI scope, task or future per request.

At ten thousand small requests a second, the ASGI machinery between the socket and the service
(uvicorn's RequestResponseCycle with its task per request, the scope and message dicts, the
receive/send coroutines, the guard and middleware layers) cost more than the service's own work
(README, "Request path"). Here POST /predict with a JSON body, /v1/models/<m>[/versions/<v>]:predict
and KServe v2 infer (JSON or binary), /v2/models/<m>[/versions/<v>]/infer, are answered from
httptools' callbacks: the request is recognised when its headers are parsed; once its body is
complete it is checked (API key, the model it names, admission), decoded, and handed to the
model's batcher with a plain callback; when the batch holding it has run, the callback writes the
whole response to the socket in one write.

Everything else goes to the ASGI app exactly as before: other routes and methods, query strings,
percent-escapes, Expect: 100-continue, bodies without a Content-Length (chunked) or over the
limit, the concurrency limit reached, a body that does not arrive in the same read as its headers
(so app.guard's body deadline applies), a request that would wait for admission, and bodies that
are decoded on the decode threads (images, large bodies). Such a request is handed over with what
was read of it, so it behaves as if the hot path did not exist. Both paths call the same
functions for the API key, the model lookup, admission, decoding, inference and the response body,
so their answers are byte for byte the same (tests/app/test_hotpath.py).

Pipelining: a connection has at most one request in flight; requests that arrive behind it wait,
hot or not, in uvicorn's pipeline queue with reading paused, and are answered in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from app.admission import Ticket
from app.batcher import DeadlineExpired, Job
from app.deps import check_api_key
from app.errors import ClientError, error_body
from app.guard import CLIENT_CLOSED, CONNECTION
from app.middleware import RouteTemplate, hot_route
from app.protocol import GuardedHttpToolsProtocol
from app.repository import ModelRepository
from app.routes import kserve, predict
from app.service import INLINE_DECODE_BYTES, Service, deadline_error

log = logging.getLogger(__name__)

JSON_HEAD = b"content-type: application/json\r\ncontent-length: %d\r\n"


class Decoded(NamedTuple):
    """A hot request's body, decoded: what Service.submit takes, and what its answer needs."""

    x: Any  # (N, C, H, W) float32
    early_exit: str | float | None
    return_blocks: bool
    deadline_ms: float | None
    context: Any  # the parsed request, for the response


class Route(NamedTuple):
    """One kind of hot request, by the functions its ASGI route calls."""

    heavy: Callable[[Mapping[str, str], bytes], bool]  # decoded on the decode threads
    decode: Callable[[Service, Mapping[str, str], bytes], Decoded]
    answer: Callable[[Service, Job, Any], dict[str, Any]]  # the 200 body


def _predict_decode(service: Service, headers: Mapping[str, str], body: bytes) -> Decoded:
    options, x = predict.decode_json(body, service)
    return Decoded(x, options.early_exit, options.return_blocks, options.deadline_ms, options)


def _infer_heavy(headers: Mapping[str, str], body: bytes) -> bool:
    if len(body) <= INLINE_DECODE_BYTES:
        return False  # its JSON header cannot be longer
    try:
        header, _ = kserve.split_body(headers, body)
    except ClientError:
        return False  # refused once admitted, as on the ASGI route
    return len(header) > INLINE_DECODE_BYTES


def _infer_decode(service: Service, headers: Mapping[str, str], body: bytes) -> Decoded:
    header, binary = kserve.split_body(headers, body)
    options, x = kserve.decode_infer(header, binary, service)
    return Decoded(x, options.early_exit, False, options.deadline_ms, options)


# app.middleware's hot handlers -> the same steps, without awaiting
ROUTES: dict[Any, Route] = {
    predict.predict_json: Route(lambda headers, body: predict.is_heavy(body), _predict_decode,
                                predict.response),
    kserve.infer_json: Route(_infer_heavy, _infer_decode,
                             lambda service, job, options: kserve.infer_response(options, job, service)),
}


class HotRoutes:
    """What the hot path of every connection shares: the repository, the body limit, metrics."""

    def __init__(self, repository: ModelRepository):
        self.repository = repository
        self.max_bytes = repository.settings.MAX_BODY_BYTES
        self._defaults: list[tuple[bytes, bytes]] | None = None
        self._default_head = b""

    def default_head(self, defaults: list[tuple[bytes, bytes]]) -> bytes:
        """uvicorn's default headers (date, server) as bytes; the list changes once a second."""
        if defaults is not self._defaults:
            self._defaults = defaults
            self._default_head = b"".join(b"%s: %s\r\n" % pair for pair in defaults)
        return self._default_head


class Exchange:
    """One request on the hot path, from its headers to its answer."""

    __slots__ = ("route", "template", "name", "version", "url", "raw_headers", "headers",
                 "http_version", "keep_alive", "started", "chunks", "service", "ticket", "job",
                 "context")

    def __init__(self, route: Route, template: RouteTemplate, name: str | None,
                 version: str | None, url: bytes, raw_headers: list[tuple[bytes, bytes]],
                 headers: dict[str, str], http_version: str, keep_alive: bool):
        self.route, self.template, self.name, self.version = route, template, name, version
        self.url, self.raw_headers, self.headers = url, raw_headers, headers
        self.http_version, self.keep_alive = http_version, keep_alive
        self.started = time.perf_counter()
        self.chunks: list[bytes] = []
        self.service: Service | None = None
        self.ticket: Ticket | None = None
        self.job: Job | None = None
        self.context: Any = None

    def body(self) -> bytes:
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)


class HotPathProtocol(GuardedHttpToolsProtocol):
    """app.protocol's connection (header limits, one write per response) + the hot routes."""

    def __init__(self, *args: Any, hot: HotRoutes, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.hot = hot
        self._reading: Exchange | None = None  # a hot request whose body is being read
        self._active: Exchange | None = None  # the hot request waiting for its batch
        self._idle_since: float | None = None  # loop.time() of the last answer, while idle

    # --- parsing (httptools' callbacks) --------------------------------------------------------

    def on_message_begin(self) -> None:
        # uvicorn's, less the scope: built only for the requests the ASGI app answers
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._request_begins()

    def on_headers_complete(self) -> None:
        self._headers_arrived()
        exchange = self._recognise()
        if exchange is not None:
            self._reading = exchange
            return
        self.scope = self._scope(self.headers)
        # uvicorn's own: the scope's path and method, the cycle, its task or the pipeline
        super(GuardedHttpToolsProtocol, self).on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._reading is not None:
            self._reading.chunks.append(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        exchange = self._reading
        if exchange is None:
            super().on_message_complete()
            return
        self._reading = None
        self.request_complete = True
        if self._busy():
            self.flow.pause_reading()  # as uvicorn does for a pipelined request
            self.pipeline.appendleft(exchange)  # type: ignore[arg-type]
        else:
            self._dispatch(exchange)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        exchange = self._reading
        if exchange is not None:
            # the body goes on in a later read: the ASGI route reads the rest, under app.guard's
            # body deadline
            self._reading = None
            if not self.transport.is_closing():
                self._to_asgi(exchange, more_body=True)

    def _recognise(self) -> Exchange | None:
        """The hot request these headers begin, or None for the ASGI app."""
        parser = self.parser
        if (self.expect_100_continue or self.access_log or parser.get_method() != b"POST"
                or parser.should_upgrade()):
            return None
        url = self.url
        if url[:1] != b"/" or b"?" in url or b"%" in url or not url.isascii():
            return None
        if self.limit_concurrency is not None and (
                len(self.connections) >= self.limit_concurrency
                or len(self.tasks) >= self.limit_concurrency):
            return None  # uvicorn's 503
        # lower-case names; the first of repeated headers wins, as in app.middleware
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(self.headers)}
        declared = headers.get("content-length")
        if (declared is None or "transfer-encoding" in headers or not declared.isdigit()
                or int(declared) > self.hot.max_bytes):
            return None
        found = hot_route("POST", url.decode("ascii"), headers)
        if found is None:
            return None
        template, handler, name, version = found
        http_version = parser.get_http_version()
        return Exchange(ROUTES[handler], template, name, version, url, self.headers, headers,
                        http_version, http_version != "1.0" and parser.should_keep_alive())

    # --- answering ------------------------------------------------------------------------------

    def _busy(self) -> bool:
        """A request of this connection is in flight or waiting: a new one queues behind it."""
        return (self._active is not None or bool(self.pipeline)
                or (self.cycle is not None and not self.cycle.response_complete))

    def _dispatch(self, ex: Exchange) -> None:
        """Check, admit, decode and queue a complete hot request (or answer or hand it over)."""
        try:
            repository = self.hot.repository
            check_api_key(repository, ex.headers)
            service = repository.find(ex.name, ex.version)
            body = ex.body()
            if ex.route.heavy(ex.headers, body):
                self._to_asgi(ex, more_body=False)  # decoded on the decode threads there
                return
            ticket = service.try_admit(ex.headers)
            if ticket is None:
                self._to_asgi(ex, more_body=False)  # waits in admission's line there
                return
            try:
                decoded = ex.route.decode(service, ex.headers, body)
                job = service.submit(decoded.x, decoded.early_exit, ticket,
                                     decoded.return_blocks, decoded.deadline_ms,
                                     notify=self._answered)
            except BaseException:
                service.release(ticket)
                raise
            ex.service, ex.ticket, ex.job, ex.context = service, ticket, job, decoded.context
            self._active = ex
        except ClientError as e:
            self._reply(ex, e.status, error_body(e.message), e.headers)
        except Exception:
            log.exception("unexpected error on a hot route")
            self._reply(ex, 500, error_body("internal server error (logged on the server)"))

    def _answered(self, job: Job) -> None:
        """The batcher's callback: every row of the active request's job has exited (or the
        job failed)."""
        try:
            self._answer(job)
        except Exception:  # a bug here must not fail the other requests of the batch
            log.exception("unexpected error answering a hot route")
            self.transport.close()

    def _answer(self, job: Job) -> None:
        ex = self._active
        if ex is None or ex.job is not job:
            return  # the client left; counted when it did
        self._active = None
        service, ticket = ex.service, ex.ticket
        assert service is not None and ticket is not None
        if job.timer is not None:
            job.timer.cancel()
        extra = None
        try:
            if job.error is not None:
                raise job.error
            status, body = 200, orjson.dumps(ex.route.answer(service, job, ex.context))
        except DeadlineExpired as e:
            problem = deadline_error(e)
            status, body, extra = problem.status, error_body(problem.message), problem.headers
        except ClientError as e:
            status, body, extra = e.status, error_body(e.message), e.headers
        except Exception:
            log.exception("unexpected error on a hot route")
            status, body = 500, error_body("internal server error (logged on the server)")
        finally:
            service.release(ticket)
        self._reply(ex, status, body, extra)

    def _reply(self, ex: Exchange, status: int, body: bytes,
               extra: dict[str, str] | None = None) -> None:
        """Write the whole response (the head uvicorn would write for app.errors.respond's
        headers) in one write, count it, and go on to the next request."""
        keep_alive, closing = ex.keep_alive, False
        head = [STATUS_LINE[status], self.hot.default_head(self.server_state.default_headers),
                JSON_HEAD % len(body)]
        if extra:
            for key, value in extra.items():
                name, raw = key.lower().encode(), value.encode()
                if name == b"connection" and b"close" in [t.strip().lower()
                                                          for t in raw.split(b",")]:
                    keep_alive, closing = False, True
                head.append(b"%s: %s\r\n" % (name, raw))
        if not keep_alive and not closing:
            head.append(b"connection: close\r\n")
        head += (b"\r\n", body)
        self.transport.write_now(b"".join(head))  # type: ignore[attr-defined]
        self.hot.repository.metrics.observe_request(ex.template.path, status,
                                                    time.perf_counter() - ex.started)
        self.server_state.total_requests += 1
        if not keep_alive:
            self.transport.close()
        elif not self.transport.is_closing():
            self._unset_keepalive_if_required()
            self.flow.resume_reading()
            self._next()

    def _next(self) -> None:
        """Start the next pipelined request, or arm the keep-alive timeout (uvicorn's
        on_response_complete, for both kinds of request)."""
        if self.pipeline:
            item = self.pipeline.pop()
            if isinstance(item, Exchange):
                self._dispatch(item)
            else:
                cycle, app = item
                super()._start_asgi_task(cycle, app)
        else:
            self._idle_since = self.loop.time()
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler)

    # uvicorn arms a keep-alive timer after every response and cancels it on every read; here
    # one timer per connection looks at how long it has been idle when it fires
    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_since is None or self.transport.is_closing():
            return
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(
                left, self.timeout_keep_alive_handler)
        else:
            self.transport.close()

    def on_response_complete(self) -> None:  # an ASGI request was answered
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        self._next()

    # --- the ASGI app ---------------------------------------------------------------------------

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # uvicorn starts a request at once when the connection's last cycle is complete; a hot
        # request may still be in flight or queued ahead of it
        if self._active is not None or self.pipeline:
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))
        else:
            super()._start_asgi_task(cycle, app)

    def _scope(self, raw_headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
        """The ASGI scope uvicorn's on_message_begin builds, with app.guard's connection."""
        return {
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": self.root_path,
            "headers": raw_headers,
            "state": self.app_state.copy(),
            "extensions": {CONNECTION: self},
        }

    def _to_asgi(self, ex: Exchange, more_body: bool) -> None:
        """Hand a hot request over to the ASGI app with what was read of its body: the cycle
        uvicorn's on_headers_complete would have made for it. A complete request (more_body
        False) is the connection's turn and starts at once; one still being read takes
        uvicorn's place for it (run now, or queued behind the one in flight)."""
        scope = self._scope(ex.raw_headers)
        scope.update(method="POST", path=self.root_path + ex.url.decode("ascii"),
                     raw_path=self.root_path.encode("ascii") + ex.url, query_string=b"")
        if ex.http_version != "1.1":
            scope["http_version"] = ex.http_version
        cycle = RequestResponseCycle(
            scope=scope, transport=self.transport, flow=self.flow,  # type: ignore[arg-type]
            logger=self.logger, access_logger=self.access_logger, access_log=self.access_log,
            default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
            expect_100_continue=False, keep_alive=ex.keep_alive,
            on_response=self.on_response_complete)
        cycle.body += ex.body()
        cycle.more_body = more_body
        if cycle.body or not more_body:
            cycle.message_event.set()
        if more_body:
            self.request_complete = False
            existing, self.cycle = self.cycle, cycle  # the rest of the body goes to it
            if existing is None or existing.response_complete:
                self._start_asgi_task(cycle, self.app)
            else:
                self.flow.pause_reading()
                self.pipeline.appendleft((cycle, self.app))
            return
        if self.cycle is None or self.cycle.response_complete:
            self.cycle = cycle  # uvicorn's shutdown and disconnect handling look at self.cycle
        super()._start_asgi_task(cycle, self.app)

    # --- connection events ----------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        ex, self._active, self._reading = self._active, None, None
        if ex is not None and ex.job is not None and ex.service is not None:
            ex.service.abandon(ex.job)
            if ex.job.timer is not None:
                ex.job.timer.cancel()
            assert ex.ticket is not None
            ex.service.release(ex.ticket)
            seconds = time.perf_counter() - ex.started
            log.info("client went away: POST %s after %.2fs, before its answer (499)",
                     ex.url.decode("ascii"), seconds)
            self.hot.repository.metrics.observe_request(ex.template.path, CLIENT_CLOSED, seconds)
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server is stopping: close once the request in flight is answered."""
        if self._active is not None:
            self._active.keep_alive = False
        else:
            super().shutdown()
