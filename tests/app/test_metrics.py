"""Request metrics counted in plain dicts (app.metrics.RequestCounts) read like the client
library's Counter and Histogram: totals by route and status, cumulative buckets with `le`
inclusive, count and sum."""

from __future__ import annotations

import re
import threading

from prometheus_client import generate_latest

from app.metrics import LATENCY_BUCKETS, Metrics


def samples(metrics: Metrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(hff_request\S*) (\S+)$", text, re.M)}


def test_requests_and_latency_are_exposed_as_a_counter_and_a_histogram():
    m = Metrics()
    for seconds in (0.001, 0.003, 0.003):  # 0.001 is on a bound: counted in le="0.001"
        m.observe_request("/predict", 200, seconds)
    m.observe_request("/predict", 422, 20.0)  # beyond the last bound: +Inf only
    m.observe_request("/v2/models/{name}/infer", 200, 0.2)
    got = samples(m)
    assert got['hff_requests_total{route="/predict",status="200"}'] == 3
    assert got['hff_requests_total{route="/predict",status="422"}'] == 1
    assert got['hff_requests_total{route="/v2/models/{name}/infer",status="200"}'] == 1
    bucket = 'hff_request_latency_seconds_bucket{{le="{}",route="/predict"}}'.format
    assert got[bucket("0.001")] == 1
    assert got[bucket("0.0025")] == 1
    assert got[bucket("0.005")] == 3
    assert got[bucket("10.0")] == 3
    assert got[bucket("+Inf")] == 4
    assert got['hff_request_latency_seconds_count{route="/predict"}'] == 4
    assert abs(got['hff_request_latency_seconds_sum{route="/predict"}'] - 20.007) < 1e-9
    assert len([k for k in got if k.startswith("hff_request_latency_seconds_bucket")
                and 'route="/predict"' in k]) == len(LATENCY_BUCKETS) + 1


def test_a_scrape_on_another_thread_while_new_routes_are_counted_does_not_fail():
    m = Metrics()
    done = threading.Event()
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            while not done.is_set():
                generate_latest(m.registry)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    for i in range(20_000):
        m.observe_request(f"/route/{i % 500}", 200 + i % 7, 0.001 * (i % 50))
    done.set()
    scraper.join()
    assert not errors
    assert sum(v for k, v in samples(m).items() if k.startswith("hff_requests_total")) == 20_000
