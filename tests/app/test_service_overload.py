"""Issue 14 against a real server: operating points under a latency target, deadlines, the
fields and metrics that show them, and a SIGTERM drain with stage-level scheduling."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.app.conftest import ServerProcess, assert_drained, metric, sigterm_under_load

pytestmark = pytest.mark.slow


async def flood(url: str, bodies: list[dict], path: str = "/predict") -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as c:
        return await asyncio.gather(*(c.post(path, json=b) for b in bodies))


@pytest.fixture
def overloaded(digits_model_dir, tmp_path):
    """A 1 ms latency target that any burst misses, with no accuracy floor: 'auto' must move."""
    srv = ServerProcess(digits_model_dir, tmp_path / "server.log", latency_target_ms=1,
                        min_accuracy=0, max_batch_size=8, max_batch_wait_ms=0, threads=1)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def test_auto_moves_to_cheaper_points_under_load_but_off_and_thresholds_never_do(
        overloaded, digits_test_split):
    x = digits_test_split[0][:32]
    info = httpx.get(overloaded.url + "/v1/models").json()["models"][0]
    points = info["early_exit"]["operating_points"]
    blocks = info["num_blocks"]
    assert len(points) >= 2, "the digits export should offer cheaper operating points"
    bodies = [{"instances": x.tolist()} for _ in range(30)]
    bodies += [{"instances": x.tolist(), "early_exit": "off"},
               {"instances": x.tolist(), "early_exit": 0.9}] * 5
    responses = asyncio.run(flood(overloaded.url, bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    auto = [p for r in responses[:30] for p in r.json()["predictions"]]
    used = {p["operating_point"]["index"] for p in auto}
    assert used - {0}, "no 'auto' instance was answered from a cheaper point"
    for p in auto:
        point = points[p["operating_point"]["index"]]
        assert p["operating_point"]["expected_accuracy"] == point["expected_accuracy"]
        assert p["deadline_missed"] is False
    for r, body in zip(responses[30:], bodies[30:], strict=True):
        for p in r.json()["predictions"]:
            assert p["operating_point"] is None  # never degraded, never attributed to a point
            if body["early_exit"] == "off":
                assert p["exit_block"] == blocks
            elif p["exit_block"] < blocks:
                assert p["confidence"] >= 0.9
    text = httpx.get(overloaded.url + "/metrics").text
    assert metric(text, 'hff_stage_queue_depth{stage="1"}') >= 0
    assert "hff_operating_point_expected_accuracy" in text
    # once the burst is over the point climbs back to the calibrated one
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = httpx.get(overloaded.url + "/metrics").text
        if metric(text, "hff_operating_point") == 0:
            break
        time.sleep(0.2)
    assert metric(text, "hff_operating_point") == 0
    assert metric(text, "hff_operating_point_expected_accuracy") == pytest.approx(
        points[0]["expected_accuracy"])
    info = httpx.get(overloaded.url + "/v1/models").json()["models"][0]
    assert info["early_exit"]["current_point"] == 0 and info["early_exit"]["latency_target_ms"] == 1


def test_deadlines_answer_from_the_block_reached_or_refuse_with_503(server, api_key,
                                                                  digits_test_split):
    x = digits_test_split[0][:64]
    headers = {"X-API-Key": api_key}
    # a generous deadline changes nothing
    ok = httpx.post(server.url + "/predict", headers=headers, timeout=60,
                    json={"instances": x.tolist(), "deadline_ms": 60_000}).json()
    assert not any(p["deadline_missed"] for p in ok["predictions"])
    # a burst that takes longer than its 50 ms deadlines: each request is answered in full from
    # the blocks its rows reached, or refused with a 503 that says why; never another 5xx
    bodies = [{"instances": x.tolist(), "deadline_ms": 50, "early_exit": ("auto", "off")[i % 2]}
              for i in range(80)]

    async def go():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as c:
            return await asyncio.gather(*(c.post("/predict", json=b) for b in bodies))

    responses = asyncio.run(go())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, "no request missed a 50 ms deadline"
    for r in responses:
        if r.status_code == 503:
            assert "deadline_ms" in r.json()["error"] and r.headers["retry-after"]
        else:
            assert len(r.json()["predictions"]) == len(x)
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, 'hff_deadline_misses_total{outcome="refused"}') >= 1
    # KServe takes it as a parameter; bad values are a 422 with words
    v2 = httpx.post(server.url + f"/v2/models/{ok['model']['name']}/infer", headers=headers,
                    json={"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                      "data": x[0].reshape(-1).tolist()}],
                          "parameters": {"deadline_ms": 60_000}})
    assert v2.status_code == 200
    outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
    assert outputs["operating_point"] == [0]
    for value in (-5, 10):
        bad = httpx.post(server.url + "/predict", headers=headers,
                         json={"instances": x[:1].tolist(), "deadline_ms": value})
        assert bad.status_code == 422 and "deadline_ms" in bad.json()["error"], bad.text


def test_sigterm_drain_answers_every_accepted_row_with_stage_level_scheduling(
        digits_model_dir, digits_test_split, tmp_path):
    srv = ServerProcess(digits_model_dir, tmp_path / "server.log", max_batch_size=4,
                        max_batch_wait_ms=0, threads=1, latency_target_ms=5, scheduling="stage")
    x = digits_test_split[0][:64]
    _, results = sigterm_under_load(srv, {"instances": x.tolist()}, requests=24, rows_in_flight=63)
    ok = assert_drained(srv, results)
    assert ok and all(len(body["predictions"]) == len(x) for body, _ in ok)
