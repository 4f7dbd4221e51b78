"""Connections opened at once (app.accept): all accepted in one loop turn, all answered.

uvloop's own server accepts one connection a loop turn, so the last of many connections opened
together waited hundreds of busy turns before their first request was read (docs/request-path.md,
"Connections opened at once"). The listener must take every queued connection when its socket is
readable, and the server built on it must still answer each connection and drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket

import numpy as np
import pytest
import uvicorn

from app.accept import EagerListener
from app.main import DrainingServer
from tests.app.conftest import ServerProcess

QUEUED = 100


def test_every_queued_connection_is_accepted_in_one_turn():
    async def go() -> tuple[int, int]:
        made: list[asyncio.Protocol] = []

        class Recorder(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.append(self)
                transport.close()

        listening = socket.create_server(("127.0.0.1", 0), backlog=QUEUED * 2)
        port = listening.getsockname()[1]
        # the kernel completes these handshakes: they wait in the accept queue, not yet accepted
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(QUEUED)]
        listener = EagerListener(asyncio.get_running_loop(), listening, Recorder)
        listener._accept()  # one readable event
        accepted = len(listener._handshakes)
        await listener.wait_closed()
        listener.close()
        for c in clients:
            c.close()
        return accepted, len(made)

    accepted, made = asyncio.run(go())
    assert accepted == QUEUED  # uvloop's server: 1
    assert made == QUEUED


@pytest.mark.slow
def test_connections_opened_together_are_each_answered_and_drained(digits_model_dir, tmp_path):
    srv = ServerProcess(digits_model_dir, tmp_path / "server.log")
    try:
        body = json.dumps({"instances": [np.zeros((1, 8, 8)).tolist()]})
        conns = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
                 for _ in range(QUEUED)]
        for c in conns:  # every connection opened and its request sent before any answer is read
            c.request("POST", "/predict", body, {"content-type": "application/json"})
        statuses = []
        for c in conns:
            r = c.getresponse()
            statuses.append(r.status)
            assert "predictions" in json.loads(r.read())
            c.close()
        assert statuses == [200] * QUEUED
    finally:
        code = srv.stop()
    assert code == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


def test_the_uvicorn_internals_the_listener_takes_over_are_still_there():
    """DrainingServer.startup (app/main.py) replaces uvicorn's `servers` with EagerListeners,
    building the protocol as uvicorn does; a uvicorn release that renames those internals must
    fail here, not quietly serve with one accept a turn."""

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    async def go() -> tuple[list[object], bytes]:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="error")
        config.load()
        server = DrainingServer(config, repository=None)  # type: ignore[arg-type]
        server.lifespan = config.lifespan_class(config)  # as uvicorn's Server._serve does
        await server.startup()
        assert server.started
        listeners = list(server.servers)
        port = listeners[0].sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        await server.shutdown()
        return listeners, answer

    listeners, answer = asyncio.run(go())
    assert listeners and all(isinstance(s, EagerListener) for s in listeners)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
