"""Prometheus metrics, one `lpt_` prefix, per-task labels; one registry per app so tests stay independent.

Per-task series are bounded: each labelled metric costs a series (a histogram ~18) per task, so only
`max_tasks` tasks get their own label: the `allow` list first, then the first tasks to be counted; every other
task is counted under `task="_other"` (task names cannot start with "_", so no task can take that label).

The ops page (`server/dashboard.py`) reads this same registry, as `/metrics` does: one source of truth.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PADDING_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
OTHER_TASKS = "_other"


class Metrics:
    def __init__(self, *, max_tasks: int = 100, allow: Iterable[str] = ()) -> None:
        self.max_tasks = max_tasks
        self._labelled: set[str] = set(list(dict.fromkeys(allow))[:max_tasks])
        self._label_lock = threading.Lock()
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
        self.forward_cpu = Counter("lpt_forward_cpu_seconds", "CPU time of the inference thread in forward passes "
                                   "(torch's own worker threads not counted); well below the passes' wall time "
                                   "means the cores are shared or the passes wait on an accelerator", registry=r)
        self.batch_rows = Histogram("lpt_batch_size", "Rows per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.batch_tasks = Histogram("lpt_batch_tasks", "Distinct tasks per forward pass", buckets=BATCH_BUCKETS,
                                     registry=r)
        self.batch_padding = Histogram("lpt_batch_padding_ratio", "Padded share of the positions a pass computes "
                                       "(after the engine's length buckets)", buckets=PADDING_BUCKETS, registry=r)
        self.queue_depth = Gauge("lpt_queue_depth", "Rows waiting for a forward pass", registry=r)
        self.errors = Counter("lpt_errors", "Errors by task and kind", ["task", "type"], registry=r)
        self.dropped = Counter("lpt_rows_dropped", "Rows dropped before the pass (client gone or past deadline)",
                               ["reason"], registry=r)
        self.tasks_served = Gauge("lpt_tasks_served", "Tasks being served", registry=r)
        self.adapter_events = Counter("lpt_adapter_events", "Uploads, rollbacks and retirements made here, and tasks "
                                      "changed by another replica (event=sync)", ["event"], registry=r)
        self.adapter_loads = Counter("lpt_adapter_loads", "Adapters read from the store because a request asked for "
                                     "a task not in host memory; kept=false: used for those requests only (host "
                                     "memory keeps the tasks asked for more often, or the task changed meanwhile)",
                                     ["kept"], registry=r)
        self.store_generation = Gauge("lpt_store_generation", "The shared store's generation this replica serves",
                                      registry=r)

    def task_label(self, task: str) -> str:
        """The `task` label to count this task under: its own name while there is room, else "_other"."""
        if task in self._labelled:
            return task
        with self._label_lock:
            if len(self._labelled) < self.max_tasks:
                self._labelled.add(task)
                return task
        return OTHER_TASKS
