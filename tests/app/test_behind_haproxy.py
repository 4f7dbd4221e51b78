"""docker/haproxy.cfg in front of real replicas (what `docker compose up --scale api=3` runs,
without the containers): requests spread over every replica, and a replica stopped under load
(SIGTERM: it turns not-ready, refuses new work, drains) costs the clients not one failed request.
Skipped where HAProxy is not installed (apt-get install haproxy)."""

from __future__ import annotations

import shutil
import sys
import threading
import time

import httpx
import pytest

from tests.app.conftest import REPO, ServerProcess

sys.path.insert(0, str(REPO / "bench"))
from proxy_replicas import Proxy  # noqa: E402 - the bench's HAProxy on local ports

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy")]


def predict_requests(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("hff_requests_total{") and 'route="/predict"' in line)


def test_a_replica_stopped_under_load_fails_no_request(digits_model_dir, digits_test_split,
                                                       tmp_path):
    servers = [ServerProcess(digits_model_dir, tmp_path / f"replica-{i}.log", threads="1")
               for i in range(3)]
    proxy = None
    try:
        proxy = Proxy(servers, tmp_path)
        x, _ = digits_test_split
        body = {"instances": [x[0].tolist()]}
        failures: list[str] = []
        answered = [0]
        stop = threading.Event()

        def client():
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    try:
                        r = c.post(proxy.url + "/predict", json=body)
                    except httpx.HTTPError as e:
                        failures.append(repr(e))
                        continue
                    if r.status_code != 200:
                        failures.append(f"{r.status_code}: {r.text[:200]}")
                    answered[0] += 1

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(2)
            assert all(predict_requests(s) > 0 for s in servers)  # every replica takes work
            assert servers[2].stop() == 0  # SIGTERM under load: drained, exits 0
            deadline = time.monotonic() + 30
            while proxy.servers_up() != 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert proxy.servers_up() == 2  # the /readyz checks took it out
            before = answered[0]
            time.sleep(1)
            assert answered[0] > before  # the other two go on answering
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert failures == [], failures[:5]
    finally:
        if proxy is not None:
            proxy.close()
        for s in servers:
            s.stop()
