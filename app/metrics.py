"""Prometheus metrics of one app instance (its own registry, so tests can build many apps).

Server-wide metrics (requests by route, admission) have no model label; the batcher's metrics
are per model version, labelled `model` and `version`, and each batcher writes them through its
`ModelMetrics` view (`Metrics.for_model`), so the batcher code does not spell the labels out.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MODEL_LABELS = ("model", "version")
# The attributes of Metrics that are per model version (labelled MODEL_LABELS first)
PER_MODEL = ("queue_wait", "batch_size", "exits", "in_flight", "queue_depth", "stage_queue_depth",
             "operating_point", "operating_point_accuracy", "deadline_misses")


class Metrics:
    """The service's metrics; names are listed in the README."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hff_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("hff_request_latency_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
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

        # labelled children looked up once: .labels() costs a lock and a dict build per call
        self._request_counters: dict[tuple[str, int], Any] = {}
        self._request_latencies: dict[str, Any] = {}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request (app.guard for the ASGI app, app.hotpath and app.rsgi
        for the requests they answer themselves); `route` is a template, never a raw path."""
        counter = self._request_counters.get((route, status))
        if counter is None:
            counter = self._request_counters[route, status] = self.requests.labels(
                route=route, status=str(status))
        latency = self._request_latencies.get(route)
        if latency is None:
            latency = self._request_latencies[route] = self.latency.labels(route=route)
        counter.inc()
        latency.observe(seconds)

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
