"""Fixtures for the service tests: the digits run exported by the real exporter, and real
`python -m app` server processes on free ports."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, run_module

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"


def repo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFF_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def digits_model_dir(digits_run, tmp_path_factory) -> Path:
    """The session's briefly trained digits run (tests/conftest.py), exported by hff-export."""
    out = tmp_path_factory.mktemp("service-models") / "digits"
    proc = run_module("model.export_cli", str(digits_run), "--out", str(out), timeout=1200)
    assert proc.returncode == 0, f"hff-export failed:\n{proc.stderr[-3000:]}"
    return out


@pytest.fixture(scope="session")
def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits validation and test splits as (images (N, 1, 8, 8), labels)."""
    from training.data import load_dataset

    data = load_dataset("digits")
    return {name: tuple(t.numpy() for t in getattr(data, name).tensors) for name in ("val", "test")}


@pytest.fixture(scope="session")
def digits_test_split(digits_splits) -> tuple[np.ndarray, np.ndarray]:
    return digits_splits["test"]


def png_bytes(mode: str, size: tuple[int, int]) -> bytes:
    """A blank image of `mode` and `size` (width, height), encoded as PNG."""
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def metric(text: str, series: str) -> float:
    """The value of `series` ('name' or 'name{label="value",...}') in a /metrics text, summed
    over the labels it leaves out (the per-model metrics also carry model and version)."""
    name, _, rest = series.partition("{")
    want = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    samples = [s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and want.items() <= s.labels.items()]
    assert samples, f"no {series} in /metrics"
    return sum(samples)


class ServerProcess:
    """`python -m app` in a subprocess; `url` once /readyz says ready."""

    def __init__(self, model_dir: Path | None, log_path: Path, *,
                 model_repository: Path | None = None, **settings: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        env = repo_env(**{f"HFF_{k.upper()}": str(v) for k, v in settings.items()})
        source = (["--model-dir", str(model_dir)] if model_repository is None
                  else ["--model-repository", str(model_repository)])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", *source, "--port", str(self.port)],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, signal_first: bool = True) -> int:
        """SIGTERM (unless already sent) and wait for the exit; returns the exit status."""
        if self.proc.poll() is None:
            if signal_first:
                self.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def sigterm_under_load(srv: ServerProcess, body: dict, requests: int, rows_in_flight: int):
    """Post `body` `requests` times at once, SIGTERM the server as soon as it holds more than
    `rows_in_flight` accepted, unanswered rows, and wait for every answer. Returns the SIGTERM's
    monotonic time and, per request, (status or the transport error's name, JSON body or None,
    monotonic time of the answer); the caller then checks the drain with `assert_drained`."""

    async def go():
        limits = httpx.Limits(max_connections=requests + 2)
        async with httpx.AsyncClient(base_url=srv.url, limits=limits, timeout=120) as c:
            async def one():
                try:
                    r = await c.post("/predict", json=body)
                    return r.status_code, r.json(), time.monotonic()
                except httpx.TransportError as e:  # never reached the server: not accepted
                    return type(e).__name__, None, time.monotonic()

            tasks = [asyncio.create_task(one()) for _ in range(requests)]
            async with httpx.AsyncClient(base_url=srv.url) as probe:
                while True:
                    text = (await probe.get("/metrics")).text
                    if metric(text, "hff_instances_in_flight") > rows_in_flight:
                        break
                    await asyncio.sleep(0.005)
            srv.terminate()
            sent = time.monotonic()
            return sent, await asyncio.gather(*tasks)

    return asyncio.run(go())


def assert_drained(srv: ServerProcess, results: list) -> list:
    """The server exited 0 by itself after SIGTERM, answered every request it accepted (the rest
    got 503 or never connected) and logged no traceback. Returns the answered (body, time) pairs."""
    code = srv.stop(signal_first=False)
    log = srv.log()
    assert code == 0, log
    assert all(status in (200, 503) or isinstance(status, str) for status, _, _ in results), results
    ok = [(body, t) for status, body, t in results if status == 200]
    # one line per batcher: per worker process when there are several (HFF_WORKERS)
    counts = re.findall(r"(\d+) requests accepted, (\d+) answered", log)
    assert counts, log
    accepted, answered = (sum(int(c[i]) for c in counts) for i in (0, 1))
    assert accepted == answered == len(ok), log
    assert "Traceback" not in log, log
    return ok


# Every HTTP server hff-serve runs on (HFF_SERVER); the test extra installs granian.
SERVERS = ["uvicorn", "granian"]


@contextmanager
def limited_server(model_dir: Path, log_path: Path, **settings) -> Iterator[ServerProcess]:
    """The model behind an API key, small limits so the limit cases are cheap to send; stopped
    after, and its log must hold no traceback: no request may have hit a bug."""
    srv = ServerProcess(model_dir, log_path, api_key=API_KEY, max_instances=64,
                        max_body_bytes=256 * 1024, threads=1, **settings)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="session", params=SERVERS)
def server(request, digits_model_dir, tmp_path_factory):
    """The digits model on each server, shared by the tests that only read its answers."""
    with limited_server(digits_model_dir, tmp_path_factory.mktemp("server") / "server.log",
                        max_batch_size=32, max_batch_wait_ms=5, server=request.param) as srv:
        yield srv


@pytest.fixture
def api_key() -> str:
    return API_KEY


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60) as c:
        yield c
