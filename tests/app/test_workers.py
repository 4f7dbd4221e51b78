"""Several worker processes on one port (HFF_WORKERS): they share the connections, answer as one
service (metrics, readiness, model control), drain together on SIGTERM, and stop together when
one of them dies. Real processes, real HTTP."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.main import main
from app.peers import WorkerPeers, merge_expositions
from app.service import DEFAULT_INLINE_CALL_MS, Service
from app.settings import Settings
from tests.app.conftest import API_KEY, ServerProcess, assert_drained, metric, sigterm_under_load
from tests.app.test_model_repository import KEY, add_version, one_row

pytestmark = pytest.mark.slow


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def per_worker(text: str, series: str) -> dict[str, float]:
    """`series` (a sample name) summed per `worker` label."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == series:
                totals[s.labels["worker"]] = totals.get(s.labels["worker"], 0.0) + s.value
    return totals


def test_two_workers_share_the_port_and_answer_as_one_service(digits_model_dir,
                                                              digits_test_split, tmp_path):
    srv = ServerProcess(digits_model_dir, tmp_path / "server.log", workers=2)
    try:
        assert len(worker_pids(srv.proc.pid)) == 2
        x = digits_test_split[0][:40]
        want = ort.InferenceSession(str(digits_model_dir / "model.onnx")).run(
            None, {"input": x})[-1].argmax(1)
        # a new connection per request: the kernel spreads connections, not requests
        labels = []
        for row in x:
            r = httpx.post(srv.url + "/predict", json=one_row(row), timeout=30)
            assert r.status_code == 200, r.text
            labels.append(r.json()["predictions"][0]["label"])
        assert labels == want.tolist()
        assert httpx.get(srv.url + "/readyz").json() == {"status": "ready"}
        assert httpx.get(srv.url + "/v2/health/ready").json() == {"ready": True}
        # any worker's /metrics holds every worker's series, labelled by worker
        for _ in range(4):
            text = httpx.get(srv.url + "/metrics").text
            served = per_worker(text, "hff_requests_total")
            assert set(served) == {"0", "1"}, served  # both took connections (2^-39 to fail)
            assert metric(text, 'hff_requests_total{route="/predict",status="200"}') == 40
            assert metric(text, "hff_batch_size_count") >= 40 / 64
        log = srv.log()
        assert "[worker 0]" in log and "[worker 1]" in log
        assert "1 intra-op threads" in log or len(os.sched_getaffinity(0)) > 2  # cores shared out
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()


def test_sigterm_drains_every_worker_and_loses_no_accepted_request(digits_model_dir,
                                                                   digits_test_split, tmp_path):
    srv = ServerProcess(digits_model_dir, tmp_path / "server.log", workers=2, max_batch_size=1,
                        max_batch_wait_ms=0, max_instances=64, threads=1)
    workers = worker_pids(srv.proc.pid)
    x = digits_test_split[0][:64]
    want = ort.InferenceSession(str(digits_model_dir / "model.onnx")).run(None, {"input": x})[-1]
    sigterm_at, results = sigterm_under_load(srv, {"instances": x.tolist(), "early_exit": "off"},
                                             requests=24, rows_in_flight=64)
    ok = assert_drained(srv, results)  # exit 0, every accepted request answered, in each worker
    for body, _ in ok:
        assert [p["label"] for p in body["predictions"]] == want.argmax(1).tolist()
    assert any(t > sigterm_at for _, t in ok), "no request was still in flight at SIGTERM"
    assert not any(alive(pid) for pid in workers)
    assert srv.log().count("requests accepted") == 2


def test_sigint_to_the_supervisor_drains_the_workers(digits_model_dir, tmp_path):
    """Ctrl-C in a terminal reaches the supervisor only (the workers have their own session)."""
    srv = ServerProcess(digits_model_dir, tmp_path / "server.log", workers=2, threads=1)
    workers = worker_pids(srv.proc.pid)
    srv.proc.send_signal(signal.SIGINT)
    assert srv.stop(signal_first=False) == 0
    assert not any(alive(pid) for pid in workers)
    log = srv.log()
    assert "supervisor: SIGINT, draining 2 workers" in log and log.count("Finished server") == 2
    assert "Traceback" not in log, log


def test_a_port_in_use_is_refused_not_shared(digits_model_dir, tmp_path, capsys):
    """SO_REUSEPORT would let a second service on the same port take half the connections."""
    srv = ServerProcess(digits_model_dir, tmp_path / "server.log", workers=2, threads=1)
    try:
        assert main(["--model-dir", str(digits_model_dir), "--port", str(srv.port),
                     "--workers", "2"]) == 1
        assert "cannot listen on 127.0.0.1 port" in capsys.readouterr().err
        assert httpx.get(srv.url + "/readyz").status_code == 200
    finally:
        assert srv.stop() == 0


def test_a_worker_that_dies_stops_the_service(digits_model_dir, tmp_path):
    srv = ServerProcess(digits_model_dir, tmp_path / "server.log", workers=2, threads=1)
    first, second = worker_pids(srv.proc.pid)
    os.kill(first, signal.SIGKILL)
    assert srv.proc.wait(timeout=60) == 1  # not a half service: the orchestrator restarts it
    assert not alive(second)
    srv.stop()
    assert "exited with status -9; stopping the others" in srv.log()


def test_a_worker_that_does_not_drain_in_time_is_killed(digits_model_dir, tmp_path):
    srv = ServerProcess(digits_model_dir, tmp_path / "server.log", workers=2, threads=1,
                        shutdown_timeout_s=1)
    stuck, other = worker_pids(srv.proc.pid)
    os.kill(stuck, signal.SIGSTOP)  # it cannot handle SIGTERM; SIGKILL still works
    srv.terminate()
    assert srv.proc.wait(timeout=60) == 1  # one worker did not exit by itself
    assert not alive(stuck) and not alive(other)
    srv.stop()
    assert "did not exit; killing it" in srv.log()


def test_workers_exit_when_the_supervisor_is_killed(digits_model_dir, tmp_path):
    srv = ServerProcess(digits_model_dir, tmp_path / "server.log", workers=2, threads=1)
    workers = worker_pids(srv.proc.pid)
    srv.proc.kill()
    srv.stop(signal_first=False)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "a worker outlived its supervisor"


def test_model_control_reaches_every_worker(digits_model_dir, digits_test_split, tmp_path):
    repo = tmp_path / "repo"
    (repo / "digits").mkdir(parents=True)
    add_version(digits_model_dir, repo, "digits", 1)
    srv = ServerProcess(None, tmp_path / "server.log", model_repository=repo, api_key=API_KEY,
                        workers=2, threads=1)
    x = digits_test_split[0][0]

    def statuses() -> set[int]:  # a new connection each: both workers are asked
        return {httpx.post(srv.url + "/v1/models/digits:predict", json=one_row(x),
                           headers=KEY).status_code for _ in range(24)}

    try:
        assert statuses() == {200}
        r = httpx.post(srv.url + "/v2/repository/models/digits/unload", headers=KEY, timeout=60)
        assert r.status_code == 200, r.text
        assert statuses() == {404}
        assert httpx.get(srv.url + "/readyz").status_code == 503  # no model: not ready
        r = httpx.post(srv.url + "/v2/repository/models/digits/load", headers=KEY, timeout=60)
        assert r.json() == {"name": "digits", "version": "1"}
        assert statuses() == {200}
        # unloading what no worker serves: the first worker's 404, with words
        r = httpx.post(srv.url + "/v2/repository/models/digits/unload", headers=KEY, timeout=60)
        assert r.status_code == 200, r.text
        again = httpx.post(srv.url + "/v2/repository/models/digits/unload", headers=KEY)
        assert again.status_code == 404 and "unknown model 'digits'" in again.json()["error"]
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()


def test_workers_need_uvicorn(digits_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("HFF_WORKERS", "2")
    monkeypatch.setenv("HFF_SERVER", "granian")
    assert main(["--model-dir", str(digits_model_dir)]) == 2
    assert "HFF_WORKERS > 1 runs uvicorn workers" in capsys.readouterr().err
    monkeypatch.setenv("HFF_SERVER", "uvicorn")
    assert main(["--model-dir", str(digits_model_dir), "--workers", "0"]) == 2
    assert "HFF_WORKERS" in capsys.readouterr().err


def test_a_worker_not_up_is_not_ready(tmp_path):
    class Repository:  # only what WorkerPeers reads of it
        class metrics:  # noqa: N801
            registry = None

    peers = WorkerPeers(tmp_path, 0, 3, Repository())  # type: ignore[arg-type]
    assert asyncio.run(peers.not_ready()) == "worker 1 of 3 is not up"


def test_merged_metrics_label_each_workers_series():
    one = (b"# HELP hff_requests_total HTTP requests\n# TYPE hff_requests_total counter\n"
           b'hff_requests_total{route="/predict",status="200"} 3.0\n'
           b"# HELP hff_batch_size rows\n# TYPE hff_batch_size histogram\n"
           b'hff_batch_size_bucket{le="1.0"} 1.0\nhff_batch_size_bucket{le="+Inf"} 2.0\n'
           b"hff_batch_size_count 2.0\nhff_batch_size_sum 5.0\n")
    two = one.replace(b"} 3.0", b"} 4.0")
    text = merge_expositions({0: one, 1: two}).decode()
    assert metric(text, 'hff_requests_total{worker="0"}') == 3
    assert metric(text, 'hff_requests_total{worker="1"}') == 4
    assert metric(text, "hff_batch_size_sum") == 10
    assert metric(text, 'hff_batch_size_bucket{le="+Inf",worker="1"}') == 2
    assert text.count("# TYPE hff_batch_size histogram") == 1
    np.testing.assert_equal(sorted(per_worker(text, "hff_batch_size_count").items()),
                            [("0", 2.0), ("1", 2.0)])


def test_a_worker_with_one_thread_runs_every_model_call_on_its_loop(digits_model_dir):
    """With one onnxruntime thread per worker the other workers keep the cores busy while a
    loop waits for its call, so no call is handed to a thread (unless HFF_INLINE_CALL_MS says)."""

    def inline_below_ms(threads: int, device: str = "cpu", **settings) -> float:
        stub = SimpleNamespace(runtime=SimpleNamespace(device=device, threads=threads),
                               settings=Settings(MODEL_DIR=digits_model_dir, **settings))
        return Service.inline_below_ms(stub)  # type: ignore[arg-type]

    assert inline_below_ms(2) == DEFAULT_INLINE_CALL_MS  # one process: small calls only
    assert inline_below_ms(1, WORKERS=2) == math.inf
    assert inline_below_ms(2, WORKERS=2) == DEFAULT_INLINE_CALL_MS  # its threads overlap the loop
    assert inline_below_ms(1, WORKERS=2, INLINE_CALL_MS=0) == 0.0  # the setting wins
    assert inline_below_ms(1, device="cuda", WORKERS=2) == 0.0
