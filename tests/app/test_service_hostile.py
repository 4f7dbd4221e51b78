"""Clients that misbehave on purpose (issue 17), against a real server over raw sockets.

Every wait below is bounded by the server's own (short) settings times a generous factor: the
tests check that the server ends the exchange, not how fast.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.app.conftest import ServerProcess, png_bytes

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


@pytest.fixture(scope="module")
def default_server(digits_model_dir, tmp_path_factory):
    """Every setting at its default: for the tests that are not about client timeouts (a short
    body timeout would cut their large uploads on a busy machine)."""
    srv = ServerProcess(digits_model_dir, tmp_path_factory.mktemp("hostile") / "server.log",
                        threads=1)
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


def test_image_decoding_does_not_stall_health_checks(default_server):
    """Row 2: big images are decoded off the event loop, so /healthz answers while they are."""
    big = base64.b64encode(png_bytes("RGBA", (4096, 4096))).decode()
    body = {"instances": [{"b64": big}] * 12}
    timings: dict[str, float] = {}

    def predict() -> None:
        t0 = time.perf_counter()
        r = httpx.post(default_server.url + "/predict", json=body, timeout=120)
        timings["predict"] = time.perf_counter() - t0
        timings["status"] = r.status_code

    thread = threading.Thread(target=predict)
    thread.start()
    time.sleep(0.5)  # the upload is done and decoding has begun
    t0 = time.perf_counter()
    assert httpx.get(default_server.url + "/healthz", timeout=120).status_code == 200
    health = time.perf_counter() - t0
    thread.join()
    assert timings["status"] == 200
    assert health < 0.2 * timings["predict"], (health, timings)


def test_huge_json_bodies_are_refused_without_parsing_them(default_server):
    """Row 7: 16 concurrent 16.6 MB JSON bodies of numbers: all refused with a 4xx, and the
    server's peak memory does not grow by the half GB that parsing them would take."""
    body = b'{"instances": [' + b"0.1, " * 3_300_000 + b"0.1]}"
    peak_before = peak_rss_mb(default_server.proc.pid)

    def send(_: int) -> int:
        return httpx.post(default_server.url + "/predict", content=body, timeout=120,
                          headers={"content-type": "application/json"}).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(send, range(16)))
    assert all(s in (413, 429) for s in statuses), statuses
    assert 413 in statuses
    assert peak_rss_mb(default_server.proc.pid) - peak_before < 250


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


def test_error_bodies_quote_only_an_excerpt_of_the_input(default_server):
    """Row 9: a 15 MB form field is not echoed back in the 422."""
    r = httpx.post(default_server.url + "/predict", timeout=120,
                   files=[("file", ("a.png", png_bytes("L", (8, 8)), "image/png"))],
                   data={"top_k": "7" * 15_000_000 + "x"})
    assert r.status_code == 422 and "top_k" in r.json()["error"]
    assert len(r.content) < 1000


def test_goodput_holds_when_offered_more_than_capacity(default_server, digits_test_split):
    """Row 3: 256-instance requests, early exit off, from clients that never back off: twice as
    many clients as the queue holds get (nearly) the goodput of a few, no 5xx, no 429 storm."""
    x = np.take(digits_test_split[0], range(256), axis=0, mode="wrap")
    body = json.dumps({"instances": x.round(4).tolist(), "early_exit": "off"}).encode()

    def run(clients: int, seconds: float) -> dict[int, int]:
        statuses: list[int] = []  # list.append is atomic under the GIL
        stop = time.monotonic() + seconds

        def client() -> None:
            host, port = default_server.url.removeprefix("http://").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            while time.monotonic() < stop:
                conn.request("POST", "/predict", body, {"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                if time.monotonic() < stop:
                    statuses.append(r.status)
            conn.close()

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {s: statuses.count(s) for s in set(statuses)}

    run(8, 1.0)  # warm-up
    few = run(8, 4.0)  # the queue (4096 rows = 16 requests) never fills
    many = run(32, 4.0)
    assert set(few) == {200} and all(s < 500 for s in many), (few, many)
    assert many.get(200, 0) >= 0.6 * few[200], (few, many)
