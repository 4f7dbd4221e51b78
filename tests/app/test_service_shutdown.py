"""Graceful shutdown: readiness drops at once, new work is refused, accepted work is answered."""

from __future__ import annotations

import asyncio
import signal

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import uvicorn

from app.main import DrainingServer, create_app
from app.settings import Settings
from tests.app.conftest import SERVERS, ServerProcess, assert_drained, sigterm_under_load

pytestmark = pytest.mark.slow


def test_sigterm_marks_not_ready_and_refuses_new_work(digits_model_dir, digits_test_split):
    app = create_app(Settings(MODEL_DIR=digits_model_dir, MAX_BATCH_SIZE=4))
    repository = app.state.repository
    body = {"instances": [digits_test_split[0][0].tolist()]}

    async def go():
        async with app.router.lifespan_context(app):
            while not repository.ready:
                await asyncio.sleep(0.01)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                assert (await c.get("/readyz")).status_code == 200
                assert (await c.post("/predict", json=body)).status_code == 200
                server = DrainingServer(uvicorn.Config(app), repository)
                server.handle_exit(signal.SIGTERM, None)
                ready = await c.get("/readyz")
                refused = await c.post("/predict", json=body)
                v2 = await c.get("/v2/health/ready")
                live = await c.get("/healthz")
        return server, ready, refused, v2, live

    server, ready, refused, v2, live = asyncio.run(go())
    assert server.should_exit
    assert ready.status_code == 503 and "shutting down" in ready.json()["error"]
    assert v2.status_code == 503 and v2.json()["ready"] is False
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert live.status_code == 200


@pytest.mark.parametrize("server", SERVERS)
def test_sigterm_during_load_loses_no_accepted_request(digits_model_dir, digits_test_split,
                                                       tmp_path, server):
    # batch size 1 and one thread: 24 x 64 rows take a while, so SIGTERM lands mid-load
    srv = ServerProcess(digits_model_dir, tmp_path / "server.log", max_batch_size=1,
                        max_batch_wait_ms=0, max_instances=64, threads=1, server=server)
    x = digits_test_split[0][:64]
    want = ort.InferenceSession(str(digits_model_dir / "model.onnx")).run(None, {"input": x})[-1]
    body = {"instances": x.tolist(), "early_exit": "off"}
    sigterm_at, results = sigterm_under_load(srv, body, requests=24, rows_in_flight=64)
    ok = assert_drained(srv, results)
    for body_, _ in ok:
        got = np.array([[t["probability"] for t in p["top_k"]] for p in body_["predictions"]])
        assert [p["label"] for p in body_["predictions"]] == want.argmax(1).tolist()
        np.testing.assert_allclose(got[:, 0], want.max(1), atol=1e-5)
    assert any(t > sigterm_at for _, t in ok), "no request was still in flight at SIGTERM"


def test_an_unexpected_error_is_a_generic_500_and_logged(digits_model_dir, caplog):
    app = create_app(Settings(MODEL_DIR=digits_model_dir))

    async def boom():
        raise RuntimeError("secret internals")

    app.add_api_route("/boom", boom)

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get("/boom"), await c.post("/predict", json={"instances": [[[0.0] * 8] * 8]})

    r, not_ready = asyncio.run(go())  # no lifespan ran: the model is not warmed up
    assert r.status_code == 500 and r.json() == {"error": "internal server error (logged on the server)"}
    assert "secret internals" in caplog.text
    assert not_ready.status_code == 503 and "warming up" in not_ready.json()["error"]
