"""Prometheus metrics of one app instance (its own registry, so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


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
                                    buckets=WAIT_BUCKETS, registry=r)
        self.batch_size = Histogram("hff_batch_size", "rows per batch run by the batcher",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.exits = Counter("hff_exits", "rows answered at each block (1-based)", ["block"],
                             registry=r)
        self.in_flight = Gauge("hff_instances_in_flight", "accepted instances not answered yet",
                               registry=r)
        self.queue_depth = Gauge("hff_queue_depth", "instances waiting for a batch", registry=r)
        self.stage_queue_depth = Gauge("hff_stage_queue_depth", "instances waiting for a stage "
                                       "(1-based block)", ["stage"], registry=r)
        self.operating_point = Gauge("hff_operating_point", "index of the operating point "
                                     "'auto' early exit uses now (0 = calibrated)", registry=r)
        self.operating_point_accuracy = Gauge("hff_operating_point_expected_accuracy",
                                              "expected (validation) accuracy of the current "
                                              "operating point", registry=r)
        self.deadline_misses = Counter("hff_deadline_misses", "instances whose deadline_ms "
                                       "passed before their next block: answered from the block "
                                       "reached, or refused (none reached)", ["outcome"],
                                       registry=r)
        self.admitted_rows = Gauge("hff_admitted_instances", "instances admitted and not answered "
                                   "(an upper bound until a body is parsed)", registry=r)
        self.admitted_bytes = Gauge("hff_admitted_bytes", "body bytes of admitted requests not "
                                    "answered", registry=r)
        self.waiting_requests = Gauge("hff_waiting_requests", "requests waiting for admission, "
                                      "their bodies unread", registry=r)
