"""Clients that misbehave on purpose (issue 17), against a real server over raw sockets.

Every wait below is bounded by the server's own (short) settings times a generous factor: the
tests check that the server ends the exchange, not how fast.
"""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest

from tests.app.conftest import ServerProcess

pytestmark = pytest.mark.slow

SHORT = {"header_timeout_s": 1, "body_timeout_s": 1, "keep_alive_timeout_s": 1}


@pytest.fixture(scope="module")
def strict_server(digits_model_dir, tmp_path_factory):
    """Short client timeouts, everything else at its default."""
    srv = ServerProcess(digits_model_dir, tmp_path_factory.mktemp("hostile") / "server.log",
                        threads=1, **SHORT)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    return s


def read_until_closed(s: socket.socket, limit_s: float) -> bytes:
    """Everything the server sends until it closes the connection (fails after limit_s)."""
    s.settimeout(limit_s)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open for {limit_s}s; "
                                 f"sent {data[:200]!r}") from None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def status_of(response: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.1 (\d{3})", response)
    return int(m[1]) if m else None


def metric_sum(url: str, status: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(
        rf'^hff_requests_total{{[^}}]*status="{status}"[^}}]*}} (\S+)$', text, re.M))


def predict_head(length: int) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            f"content-length: {length}\r\n\r\n").encode()


def test_slow_headers_idle_and_slow_bodies_are_closed(strict_server):
    """Row 6: connections that send headers a byte at a time, nothing at all, or a body a byte
    at a time are all closed by the server; no request reaches a handler half-received."""
    slow_headers = [connect(strict_server.url) for _ in range(20)]
    idle = [connect(strict_server.url) for _ in range(10)]
    slow_bodies = [connect(strict_server.url) for _ in range(10)]
    for s in slow_bodies:
        s.sendall(predict_head(1000) + b"{")
    head = predict_head(10)
    closed_at: dict[int, bytes] = {}
    for i in range(len(head)):  # a byte every 0.1 s: the headers would take > 8 s
        for k, s in enumerate(slow_headers + slow_bodies):
            if k in closed_at:
                continue
            try:
                s.sendall(head[i:i + 1] if k < len(slow_headers) else b" ")
            except (BrokenPipeError, ConnectionResetError):
                closed_at[k] = b""
        time.sleep(0.1)
        if len(closed_at) == len(slow_headers) + len(slow_bodies):
            break
    answers = [read_until_closed(s, 10) for s in slow_headers + slow_bodies + idle]
    for s in slow_headers + slow_bodies + idle:
        s.close()
    headers, bodies, idles = answers[:20], answers[20:30], answers[30:]
    assert all(status_of(a) in (408, None) for a in headers), headers
    assert all(status_of(a) == 408 and b"HFF_BODY_TIMEOUT_S" in a for a in bodies), bodies
    assert all(a == b"" for a in idles), idles
    assert httpx.get(strict_server.url + "/healthz").status_code == 200


def test_oversized_headers_are_refused_with_431(strict_server):
    """Row 6: a huge header value is refused once it passes the limit, not read to the end."""
    s = connect(strict_server.url)
    s.sendall(b"GET /healthz HTTP/1.1\r\nhost: t\r\nx-big: ")
    sent = 0
    try:
        for _ in range(64):  # up to 64 MB, a MB at a time: the server closes long before
            s.sendall(b"a" * (1 << 20))
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = read_until_closed(s, 10)
    s.close()
    assert sent < 64
    assert answer == b"" or status_of(answer) == 431, answer[:200]
    ok = httpx.get(strict_server.url + "/healthz", headers={"x-fine": "a" * 8000})
    assert ok.status_code == 200


def test_a_client_that_goes_away_is_a_499_not_a_500(strict_server):
    """Row 4: clients that send part of a body and close are counted as 499, with no traceback."""
    before_499 = metric_sum(strict_server.url, "499")
    before_500 = metric_sum(strict_server.url, "500")
    for _ in range(100):
        s = connect(strict_server.url)
        s.sendall(predict_head(100) + b"{")
        s.close()
    deadline = time.monotonic() + 30
    while metric_sum(strict_server.url, "499") < before_499 + 100 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric_sum(strict_server.url, "499") == before_499 + 100
    assert metric_sum(strict_server.url, "500") == before_500
    log = strict_server.log()
    assert "Traceback" not in log and "ClientDisconnect" not in log
    assert log.count("client went away") >= 100


def test_sigterm_with_a_stalled_body_exits_within_the_shutdown_timeout(digits_model_dir, tmp_path):
    """Row 1: a request whose body never finishes cannot hold the server past
    HFF_SHUTDOWN_TIMEOUT_S; the batcher drains and the process exits 0."""
    srv = ServerProcess(digits_model_dir, tmp_path / "server.log", threads=1,
                        body_timeout_s=600, shutdown_timeout_s=2)
    s = connect(srv.url)
    s.sendall(predict_head(1000) + b"{")
    time.sleep(0.5)  # the request is being read
    srv.terminate()
    answer = read_until_closed(s, 30)
    s.close()
    code = srv.stop(signal_first=False)
    log = srv.log()
    assert code == 0, log
    assert status_of(answer) == 408, answer
    assert "cut at shutdown" in log and "batcher stopped" in log, log
    assert "Traceback" not in log, log
