"""Connections opened at once (app.accept): all accepted in one loop turn, all answered.

uvloop's own server accepts one connection a loop turn, so the last of many connections opened
together waited hundreds of busy turns before their first request was read (README, request
path). The listener must take every queued connection when its socket is readable, and the
server built on it must still answer each connection and drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket

import numpy as np
import pytest

from app.accept import EagerListener
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
