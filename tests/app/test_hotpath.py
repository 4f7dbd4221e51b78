"""The hot path inside the HTTP protocol (app.hotpath) against the ASGI app, over raw sockets.

A query string sends the same request through the ASGI app (app.hotpath leaves requests with one
to it, and the app ignores it), so every request below is sent both ways and the two responses
must be the same bytes, apart from the Date header.
"""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import numpy as np
import pytest

from tests.app.conftest import API_KEY, limited_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hot_server(digits_model_dir, tmp_path_factory):
    with limited_server(digits_model_dir,
                        tmp_path_factory.mktemp("hotpath") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def model_name(hot_server) -> str:
    r = httpx.get(hot_server.url + "/v1/models", headers={"X-API-Key": API_KEY})
    return r.json()["models"][0]["name"]


def request(path: str, body: bytes, content_type: str = "application/json",
            key: str | None = API_KEY, extra: dict[str, str] | None = None) -> bytes:
    headers = {"Host": "test", "Content-Type": content_type, "Content-Length": str(len(body))}
    if key is not None:
        headers["X-API-Key"] = key
    headers.update(extra or {})
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body


def read_responses(s: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """`count` responses from a keep-alive connection: (head without its Date line, body)."""
    buf, out = b"", []
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"connection closed after {len(out)} of {count} responses"
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?im)^content-length: (\d+)", head).group(1))
        while len(rest) < length:
            chunk = s.recv(65536)
            assert chunk, "connection closed inside a body"
            rest += chunk
        out.append((re.sub(rb"(?im)^date: [^\r]*\r\n", b"", head + b"\r\n"), rest[:length]))
        buf = rest[length:]
    return out


def send(url: str, raw: bytes, count: int = 1) -> list[tuple[bytes, bytes]]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(raw)
        return read_responses(s, count)


def via_asgi(path: str) -> str:
    return path + ("&" if "?" in path else "?") + "via=asgi"


def instance(digits_test_split, i: int = 0) -> list:
    return digits_test_split[0][i, 0].tolist()  # (8, 8)


def cases(digits_test_split, name: str) -> list[tuple[str, bytes]]:
    """(what, raw request without its path line's query) for the hot routes, good and bad."""
    x0, x1 = instance(digits_test_split, 0), instance(digits_test_split, 1)
    one = json.dumps({"instances": [x0]}).encode()
    tensor = np.asarray([[x0]], dtype="<f4")
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": tensor.nbytes}}]}).encode()
    binary = {"Inference-Header-Content-Length": str(len(header))}
    infer = f"/v2/models/{name}/infer"
    return [
        ("/predict", request("/predict", one)),
        ("/predict, two instances and every option", request("/predict", json.dumps(
            {"instances": [x0, x1], "top_k": 3, "early_exit": "off", "return_blocks": True,
             "deadline_ms": 5000}).encode())),
        ("/predict, a threshold", request("/predict", json.dumps(
            {"instances": [x1], "early_exit": 0.5}).encode())),
        ("/predict, Connection: close", request("/predict", one, extra={"Connection": "close"})),
        ("/predict, a charset", request("/predict", one, "application/json; charset=utf-8")),
        ("named", request(f"/v1/models/{name}:predict", one)),
        ("KServe JSON", request(infer, json.dumps({"id": "a", "inputs": [
            {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
             "data": np.ravel(x0).tolist()}], "parameters": {"early_exit": "off"}}).encode())),
        ("KServe binary", request(infer, header + tensor.tobytes(), "application/octet-stream",
                                  extra=binary)),
        # refusals
        ("no key", request("/predict", one, key=None)),
        ("wrong key", request("/predict", one, key="nope")),
        ("unknown model", request("/v1/models/nope:predict", one)),
        ("unknown version", request(f"/v1/models/{name}/versions/0:predict", one)),
        ("not JSON", request("/predict", b"{nope")),
        ("no instances", request("/predict", b"{}")),
        ("a number for an instance", request("/predict", b'{"instances": [1]}')),
        ("wrong shape", request("/predict", b'{"instances": [[[0.5, 0.5]]]}')),
        ("NaN", request("/predict", json.dumps({"instances": [[[float("nan")] * 8] * 8]}).encode())),
        ("out of range", request("/predict", json.dumps({"instances": [[[7.0] * 8] * 8]}).encode())),
        ("too many", request("/predict", json.dumps({"instances": [x0] * 65}).encode())),
        ("unknown option", request("/predict", json.dumps({"instances": [x0], "k": 1}).encode())),
        ("bad option", request("/predict", json.dumps({"instances": [x0], "top_k": 0}).encode())),
        ("deadline too short", request("/predict", json.dumps(
            {"instances": [x0], "deadline_ms": 1}).encode())),
        ("KServe, wrong datatype", request(infer, json.dumps({"inputs": [
            {"name": "input", "shape": [1, 1, 8, 8], "datatype": "INT8",
             "data": [0] * 64}]}).encode())),
        ("KServe, text/plain", request(infer, b"{}", "text/plain")),
        ("KServe, header length past the body", request(
            infer, header, "application/octet-stream",
            extra={"Inference-Header-Content-Length": "9999"})),
    ]


def test_the_hot_path_answers_byte_for_byte_as_the_asgi_app(hot_server, digits_test_split,
                                                             model_name):
    before = httpx.get(hot_server.url + "/metrics").text
    statuses = []
    for what, raw in cases(digits_test_split, model_name):
        line, _, rest = raw.partition(b"\r\n")
        method, path, version = line.split(b" ")
        asgi = b" ".join((method, via_asgi(path.decode()).encode(), version)) + b"\r\n" + rest
        [(hot_head, hot_body)] = send(hot_server.url, raw)
        [(asgi_head, asgi_body)] = send(hot_server.url, asgi)
        assert (hot_head, hot_body) == (asgi_head, asgi_body), what
        statuses.append(int(hot_head.split(b" ")[1]))
        if what.startswith("KServe binary"):
            assert hot_head.startswith(b"HTTP/1.1 200"), hot_body
    # the good requests succeed, every refusal is a 4xx with words
    assert statuses[:8] == [200] * 8, statuses
    assert all(400 <= s < 500 for s in statuses[8:]), statuses
    # counted under the route template, once per request each way
    after = httpx.get(hot_server.url + "/metrics").text
    assert predict_200s(after) - predict_200s(before) == 2 * 5


def predict_200s(metrics: str) -> float:
    found = re.search(r'hff_requests_total\{route="/predict",status="200"\} (\S+)', metrics)
    return float(found.group(1)) if found else 0.0


def test_pipelined_requests_are_answered_in_order_on_one_connection(hot_server, digits_test_split,
                                                                    model_name):
    bodies = [json.dumps({"instances": [instance(digits_test_split, i)]}).encode()
              for i in range(6)]
    health = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    batch = [request("/predict", bodies[0]), health, request("/predict", bodies[1]),
             request("/predict", b'{"instances": [1]}'), request(via_asgi("/predict"), bodies[2]),
             request(f"/v1/models/{model_name}:predict", bodies[3]),
             request("/predict", bodies[4])]
    alone = [send(hot_server.url, raw)[0] for raw in batch]
    host, port = hot_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"".join(batch))  # all at once: the server reads several requests in one go
        together = read_responses(s, len(batch))
        # the connection is still usable afterwards
        s.sendall(request("/predict", bodies[5]))
        [(head, _)] = read_responses(s, 1)
    assert together == alone
    assert head.startswith(b"HTTP/1.1 200")


def test_a_body_that_arrives_in_pieces_is_answered_the_same(hot_server, digits_test_split):
    raw = request("/predict", json.dumps({"instances": [instance(digits_test_split)]}).encode())
    [expected] = send(hot_server.url, raw)
    host, port = hot_server.url.removeprefix("http://").split(":")
    cut = raw.index(b"\r\n\r\n") + 10
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(raw[:cut])
        time.sleep(0.2)  # the server has read the headers and part of the body by now
        s.sendall(raw[cut:])
        assert read_responses(s, 1) == [expected]


def test_connection_close_closes_after_the_answer(hot_server, digits_test_split):
    raw = request("/predict", json.dumps({"instances": [instance(digits_test_split)]}).encode(),
                  extra={"Connection": "close"})
    host, port = hot_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(raw)
        [(head, _)] = read_responses(s, 1)
        assert b"connection: close" in head.lower()
        assert s.recv(1) == b""  # closed by the server


def test_with_no_queue_wait_a_full_queue_is_refused_at_once(digits_model_dir, digits_test_split,
                                                           tmp_path):
    """HFF_QUEUE_WAIT_S 0 and room for one row: concurrent requests past it get a 429 with
    Retry-After and words naming the settings, the others their answers; no 5xx, and the
    connections stay open for the next request. (That the hot path refuses them itself rather
    than handing them to the ASGI route: test_admission's try_acquire test.)"""
    from concurrent.futures import ThreadPoolExecutor

    raw = request("/predict", json.dumps({"instances": [instance(digits_test_split)]}).encode())
    with limited_server(digits_model_dir, tmp_path / "server.log", queue_bound=1,
                        queue_wait_s=0) as srv:
        def client(_: int) -> list[tuple[bytes, bytes]]:
            return send(srv.url, raw * 8, count=8)  # pipelined on one keep-alive connection

        with ThreadPoolExecutor(16) as pool:
            answers = [a for batch in pool.map(client, range(16)) for a in batch]
    statuses = [int(head.split()[1]) for head, _ in answers]
    assert set(statuses) == {200, 429}, statuses
    refused = [(head, body) for (head, body), s in zip(answers, statuses, strict=True) if s == 429]
    head, body = refused[0]
    assert b"retry-after: 1" in head.lower()
    assert "HFF_QUEUE_WAIT_S" in json.loads(body)["error"]
