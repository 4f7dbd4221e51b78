"""Seeded random hostile requests against a real server, on every HTTP server it runs on.

The hand-written cases (test_service_hostile.py, test_hotpath.py) each pin one path. Here a
seeded generator mixes what they test one at a time (broken JSON and wrong shapes, KServe
binary headers whose lengths, shapes and datatypes disagree with the body, odd Content-Length
and Transfer-Encoding, wrong keys, images in every mode, other methods and paths) across the
hot path and the ASGI app, over kept-alive and fresh connections. The server must answer every
one with a status below 500, or close the connection, log no traceback, and still be ready
after. The seed fixes the sequence, so a failure reproduces.
"""

from __future__ import annotations

import base64
import collections
import json
import random
import socket

import httpx
import pytest

from tests.app.conftest import API_KEY, SERVERS, limited_server, png_bytes

pytestmark = pytest.mark.slow

REQUESTS = 400
KSERVE_SIZES = {"FP32": 4, "FP16": 2, "FP64": 8, "INT8": 1, "UINT8": 1, "INT32": 4, "BOOL": 1}


class HostileRequests:
    """Raw HTTP/1.1 requests for one model, each valid or broken in a random way."""

    def __init__(self, seed: int, name: str, shape: list[int]):
        self.rng = random.Random(seed)
        self.name, self.shape = name, shape

    def value(self, depth: int = 0):
        """Any JSON value, nested a few levels."""
        rng = self.rng
        if depth > 3 or rng.random() < 0.3:
            return rng.choice([0, 1, -1, 0.5, 1e308, 1e-320, 2**70, "x", "", None, True, [], {}])
        if rng.random() < 0.5:
            return [self.value(depth + 1) for _ in range(rng.randint(0, 4))]
        keys = ["instances", "inputs", "early_exit", "deadline_ms", "data", "shape", "datatype"]
        return {rng.choice(keys): self.value(depth + 1) for _ in range(rng.randint(0, 3))}

    def instance(self, shape: list[int] | None = None):
        c, h, w = shape or self.shape
        return [[[round(self.rng.random(), 3) for _ in range(w)] for _ in range(h)]
                for _ in range(c)]

    def predict(self) -> tuple[str, dict[str, str], bytes]:
        rng = self.rng
        body: dict = {"instances": [self.instance() for _ in range(rng.randint(0, 3))]}
        field = rng.choice(["instances", "early_exit", "deadline_ms", "return_blocks", "extra",
                            "shape", None, None])
        if field == "shape":
            c, h, w = self.shape
            body["instances"] = [self.instance([c, h + rng.choice([-1, 1]), w])]
        elif field is not None:
            body[field] = rng.choice([self.value(), "auto", "off", 0.5, 2.0, -1, 0, 1e12])
        raw = json.dumps(body).encode()
        damage = rng.random()
        if damage < 0.05:
            raw = raw.replace(b"0.", b"NaN", 1)
        elif damage < 0.1:
            raw = raw[:rng.randint(0, len(raw))]
        elif damage < 0.15:
            raw = rng.randbytes(rng.randint(1, 40)) + raw
        elif damage < 0.2:
            raw = b'{"instances": ' + b"[" * 500 + b"]" * 500 + b"}"
        path = rng.choice(["/predict", f"/v1/models/{self.name}:predict", "/predict?x=1",
                           "/predict/"])
        ctype = rng.choice(["application/json", "application/json; charset=utf-8", "text/plain",
                            None])
        return path, {"content-type": ctype} if ctype else {}, raw

    def kserve_binary(self) -> tuple[str, dict[str, str], bytes]:
        rng = self.rng
        datatype = rng.choice(["FP32", "FP32", "FP32", *KSERVE_SIZES, "BYTES", "BF16"])
        shape = [rng.choice([1, 1, 2, 0]), *self.shape]
        if rng.random() < 0.2:
            shape = [rng.choice([-1, 0, 1, 2**40]) for _ in range(rng.randint(0, 5))]
        count = 1
        for d in shape:
            count *= d if 0 <= d < 2**20 else 1
        data = rng.randbytes(count * KSERVE_SIZES.get(datatype, 4))
        if rng.random() < 0.2:
            data = data[:rng.randint(0, len(data))]
        size = len(data) if rng.random() < 0.8 else rng.choice([-1, len(data) + 7, 2**62, "5"])
        header: dict = {"inputs": [{"name": rng.choice(["input", "x"]), "shape": shape,
                                    "datatype": datatype,
                                    "parameters": {"binary_data_size": size}}]}
        if rng.random() < 0.2:
            header["parameters"] = {"early_exit": rng.choice(["off", "auto", 0.3, "bad", None])}
        if rng.random() < 0.1:
            header["inputs"] = self.value()
        raw = json.dumps(header).encode()
        length: int | str = len(raw)
        if rng.random() < 0.2:
            length = rng.choice([-1, 0, len(raw) - 1, len(raw) + 5, 10**30, "abc",
                                 len(raw) + len(data) + 1])
        version = rng.choice(["", "versions/1/", "versions/none/"])
        path = f"/v2/models/{rng.choice([self.name, 'nope'])}/{version}infer"
        return path, {"content-type": rng.choice(["application/octet-stream", "text/plain"]),
                      "inference-header-content-length": str(length)}, raw + data

    def kserve_json(self) -> tuple[str, dict[str, str], bytes]:
        rng = self.rng
        c, h, w = self.shape
        tensor = {"name": "input", "shape": [1, c, h, w], "datatype": "FP32",
                  "data": [rng.random() for _ in range(c * h * w)]}
        field = rng.choice(["data", "shape", "datatype", None])
        if field is not None:
            tensor[field] = rng.choice([self.value(), "BYTES", "INT64", [1, c, h, w + 1]])
        body = {"inputs": [tensor]} if rng.random() < 0.9 else self.value()
        return (f"/v2/models/{self.name}/infer", {"content-type": "application/json"},
                json.dumps(body).encode())

    def image_upload(self) -> tuple[str, dict[str, str], bytes]:
        rng = self.rng
        boundary = f"b{rng.randint(0, 999)}"
        image = rng.randbytes(rng.randint(0, 300))
        if rng.random() < 0.5:
            image = png_bytes(rng.choice(["L", "RGB", "RGBA", "1", "P", "I;16"]),
                              (rng.randint(1, 64), rng.randint(1, 64)))
        part = (f'--{boundary}\r\nContent-Disposition: form-data; name="{rng.choice(["file", "x"])}"; '
                f'filename="a.png"\r\nContent-Type: image/png\r\n\r\n').encode()
        body = part + image + f"\r\n--{boundary}--\r\n".encode()
        if rng.random() < 0.2:
            body = body[:rng.randint(0, len(body))]
        ctype = "multipart/form-data" + (f"; boundary={boundary}" if rng.random() < 0.9 else "")
        return "/predict", {"content-type": ctype}, body

    def b64_images(self) -> tuple[str, dict[str, str], bytes]:
        encoded = base64.b64encode(self.rng.randbytes(self.rng.randint(0, 200))).decode()
        return ("/predict", {"content-type": "application/json"},
                json.dumps({"instances": [{"b64": encoded}]}).encode())

    def request(self) -> bytes:
        """One request: a route's body, then a random method, key and framing."""
        rng = self.rng
        make = rng.choices([self.predict, self.kserve_binary, self.kserve_json, self.image_upload,
                            self.b64_images], weights=[35, 25, 15, 15, 10])[0]
        path, headers, body = make()
        method = "POST" if rng.random() < 0.95 else rng.choice(["GET", "PUT", "DELETE"])
        lines = [f"{method} {path} HTTP/1.1", "host: fuzz",
                 f"x-api-key: {API_KEY if rng.random() < 0.95 else 'wrong'}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        framing = rng.random()
        if framing < 0.03:
            lines += [f"content-length: {len(body)}", f"content-length: {len(body) + 1}"]
        elif framing < 0.06:
            lines.append(f"content-length: {max(0, len(body) - 1)}")
        elif framing < 0.08:
            lines.append("content-length: -5")
        elif framing < 0.1:
            lines.append("content-length: 99999999999999999999")
        elif framing < 0.12:
            lines.append("transfer-encoding: chunked")
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        else:
            lines.append(f"content-length: {len(body)}")
        if rng.random() < 0.03:
            lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_status(sock: socket.socket) -> tuple[int | None, bool]:
    """The status of the response on `sock` (None: closed, or nothing within the timeout) and
    whether the connection can carry another request (a whole response arrived, not closing)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None, False
            data += chunk
    except TimeoutError:
        return None, False
    head, _, rest = data.partition(b"\r\n\r\n")
    fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
    fields = {k.strip().lower(): v.strip().lower() for k, v in fields.items()}
    length = int(fields.get(b"content-length", b"0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(head.split(b" ", 2)[1]), fields.get(b"connection") != b"close"


@pytest.mark.parametrize("http_server", SERVERS)
def test_random_hostile_requests_get_client_errors_never_5xx(http_server, digits_model_dir,
                                                               tmp_path):
    manifest = json.loads((digits_model_dir / "manifest.json").read_text())
    requests = HostileRequests(seed=13, name=manifest["name"], shape=manifest["input"]["shape"])
    statuses: collections.Counter = collections.Counter()
    failures = []
    with limited_server(digits_model_dir, tmp_path / "server.log", header_timeout_s=1,
                        body_timeout_s=1, server=http_server) as srv:
        sock = None
        for _ in range(REQUESTS):
            raw = requests.request()
            if sock is None or requests.rng.random() < 0.3:
                if sock is not None:
                    sock.close()
                sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            try:
                sock.sendall(raw)
                status, reusable = read_status(sock)
            except OSError:  # the server closed it while we wrote: allowed
                status, reusable = None, False
            statuses[status] += 1
            if status is not None and status >= 500:
                failures.append((status, raw[:400]))
            if not reusable:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()
        assert httpx.get(srv.url + "/readyz", timeout=10).status_code == 200
    assert not failures, failures[:5]
    # the generator reached both answers and refusals, on several routes' checks
    assert statuses[200] >= 20 and sum(statuses[s] for s in (400, 404, 415, 422)) >= 200, statuses
