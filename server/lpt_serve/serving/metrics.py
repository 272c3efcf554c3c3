"""Prometheus metrics, one `lpt_` prefix, per-task labels; one registry per app so tests stay independent.

The ops page (`server/dashboard.py`) reads this same registry, as `/metrics` does: one source of truth.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("lpt_requests", "Classification requests by task and outcome", ["task", "status"],
                                registry=r)
        self.rows = Counter("lpt_rows", "Texts classified, by task", ["task"], registry=r)
        self.request_latency = Histogram("lpt_request_duration_seconds", "Request latency by task", ["task"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_latency = Histogram("lpt_queue_duration_seconds", "Time a row waits for its batch", ["task"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.forward_latency = Histogram("lpt_forward_duration_seconds", "One mixed forward pass",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("lpt_batch_size", "Rows per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.batch_tasks = Histogram("lpt_batch_tasks", "Distinct tasks per forward pass", buckets=BATCH_BUCKETS,
                                     registry=r)
        self.queue_depth = Gauge("lpt_queue_depth", "Rows waiting for a forward pass", registry=r)
        self.errors = Counter("lpt_errors", "Errors by task and kind", ["task", "type"], registry=r)
        self.dropped = Counter("lpt_rows_dropped", "Rows dropped before the pass (client gone or past deadline)",
                               ["reason"], registry=r)
        self.tasks_served = Gauge("lpt_tasks_served", "Tasks being served", registry=r)
        self.adapter_events = Counter("lpt_adapter_events", "Uploads, rollbacks and retirements", ["event"],
                                      registry=r)
