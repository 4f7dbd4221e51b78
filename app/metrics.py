"""Prometheus metrics of one app instance (its own registry, so tests can build many apps).

Server-wide metrics (requests by route, admission) have no model label; the batcher's metrics
are per model version, labelled `model` and `version`, and each batcher writes them through its
`ModelMetrics` view (`Metrics.for_model`), so the batcher code does not spell the labels out.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MODEL_LABELS = ("model", "version")
# The attributes of Metrics that are per model version (labelled MODEL_LABELS first)
PER_MODEL = ("queue_wait", "batch_size", "exits", "in_flight", "queue_depth", "stage_queue_depth",
             "operating_point", "operating_point_accuracy", "deadline_misses")


class RequestCounts(Collector):
    """hff_requests_total{route,status} and hff_request_latency_seconds{route}, counted in plain
    dicts and turned into metric families when scraped. Every request updates them from the
    event loop, and the client library's Counter and Histogram take a lock per update (about
    2.8 us a request against 0.6 here: a few percent of a small request's CPU)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        # route -> [requests per bucket of LATENCY_BUCKETS, then +Inf; sum of seconds]
        self.latency: dict[str, list[Any]] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.counts[key] = self.counts.get(key, 0) + 1
        latency = self.latency.get(route)
        if latency is None:
            latency = self.latency[route] = [[0] * (len(LATENCY_BUCKETS) + 1), 0.0]
        latency[0][bisect_left(LATENCY_BUCKETS, seconds)] += 1  # buckets count value <= le
        latency[1] += seconds

    def collect(self) -> Iterator[Metric]:
        # list(...) copies in one step of the interpreter: a scrape on another thread never
        # iterates a dict the loop is growing
        requests = CounterMetricFamily("hff_requests", "HTTP requests by route and status",
                                       labels=["route", "status"])
        for (route, status), n in sorted(list(self.counts.items())):
            requests.add_metric([route, str(status)], n)
        yield requests
        latency = HistogramMetricFamily("hff_request_latency_seconds",
                                        "HTTP request latency by route", labels=["route"])
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for route, (per_bucket, total) in sorted(list(self.latency.items())):
            cumulative, seen = [], 0
            for bound, n in zip(bounds, list(per_bucket), strict=True):
                seen += n
                cumulative.append((bound, seen))
            latency.add_metric([route], cumulative, total)
        yield latency


class Metrics:
    """The service's metrics; names are listed in the README."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_counts = RequestCounts()
        r.register(self.request_counts)
        self.queue_wait = Histogram("hff_queue_wait_seconds",
                                    "time a request's rows waited in the queue before a batch took them",
                                    MODEL_LABELS, buckets=WAIT_BUCKETS, registry=r)
        self.batch_size = Histogram("hff_batch_size", "rows per batch run by the batcher",
                                    MODEL_LABELS, buckets=BATCH_BUCKETS, registry=r)
        self.exits = Counter("hff_exits", "rows answered at each block (1-based)", [*MODEL_LABELS, "block"],
                             registry=r)
        self.in_flight = Gauge("hff_instances_in_flight", "accepted instances not answered yet",
                               MODEL_LABELS, registry=r)
        self.queue_depth = Gauge("hff_queue_depth", "instances waiting for a batch", MODEL_LABELS,
                                 registry=r)
        self.stage_queue_depth = Gauge("hff_stage_queue_depth", "instances waiting for a stage "
                                       "(1-based block)", [*MODEL_LABELS, "stage"],
                                       registry=r)
        self.operating_point = Gauge("hff_operating_point", "index of the operating point "
                                     "'auto' early exit uses now (0 = calibrated)", MODEL_LABELS,
                                     registry=r)
        self.operating_point_accuracy = Gauge("hff_operating_point_expected_accuracy",
                                              "expected (validation) accuracy of the current "
                                              "operating point", MODEL_LABELS, registry=r)
        self.deadline_misses = Counter("hff_deadline_misses", "instances whose deadline_ms "
                                       "passed before their next block: answered from the block "
                                       "reached, or refused (none reached)",
                                       [*MODEL_LABELS, "outcome"],
                                       registry=r)
        self.admitted_rows = Gauge("hff_admitted_instances", "instances admitted and not answered "
                                   "(an upper bound until a body is parsed)", registry=r)
        self.admitted_bytes = Gauge("hff_admitted_bytes", "body bytes of admitted requests not "
                                    "answered", registry=r)
        self.waiting_requests = Gauge("hff_waiting_requests", "requests waiting for admission, "
                                      "their bodies unread", registry=r)

        # one answered request (app.guard for the ASGI app, app.hotpath for the requests it
        # answers itself); the route is a template, never a raw path
        self.observe_request = self.request_counts.observe

    def for_model(self, model: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, model, version)


class _Labelled:
    """A metric with its model labels fixed: `.labels(stage="1")` adds the rest."""

    def __init__(self, metric: MetricWrapperBase, fixed: dict[str, str]):
        self.metric = metric
        self.fixed = fixed
        self.children: dict[tuple[tuple[str, str], ...], Any] = {}

    def labels(self, **labels: str) -> Any:
        key = tuple(labels.items())
        child = self.children.get(key)
        if child is None:  # looked up once: .labels() costs a lock and a dict build per call
            child = self.children[key] = self.metric.labels(**self.fixed, **labels)
        return child

    def remove(self) -> None:
        for key in self.children:
            self.metric.remove(*self.fixed.values(), *(v for _, v in key))


class ModelMetrics:
    """One model version's per-model metrics, with Metrics' attribute names (PER_MODEL)."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        self.values = (model, version)
        self._metrics: list[MetricWrapperBase] = []
        self._labelled: list[_Labelled] = []
        fixed = dict(zip(MODEL_LABELS, self.values, strict=True))
        for name in PER_MODEL:
            metric = getattr(metrics, name)
            if len(metric._labelnames) == len(MODEL_LABELS):
                setattr(self, name, metric.labels(*self.values))
                self._metrics.append(metric)
            else:
                labelled = _Labelled(metric, fixed)
                setattr(self, name, labelled)
                self._labelled.append(labelled)

    def remove(self) -> None:
        """Drop this version's series (it was unloaded): no stale gauges in /metrics."""
        for metric in self._metrics:
            metric.remove(*self.values)
        for labelled in self._labelled:
            labelled.remove()
