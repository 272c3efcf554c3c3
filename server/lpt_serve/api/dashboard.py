"""The ops page: per-task latency p50/p95/p99, throughput, batch size and mix, queue depth, errors.

`GET /dashboard/data` reads the app's prometheus registry, the same one `/metrics` exposes, so the page and
Prometheus can never disagree: no counter is kept here. Quantiles are estimated from the histogram buckets the
way Prometheus' `histogram_quantile` does (linear inside the bucket). Throughput is the delta of
`lpt_rows_total` between samples of that counter taken on each call, over a sliding window, next to the average
since the dashboard started. The recent batches and their task mix come from the batcher's history.

`GET /dashboard` is `static/dashboard.html` with its CSS and JS beside it (served from `/dashboard/static/`, read
with importlib.resources, no CDN), polling the data every second.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry

from lpt_serve.serving.batcher import BatchRecord
from lpt_serve.serving.metrics import Metrics
from lpt_serve.serving.registry import Registry

QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
RECENT_BATCHES = 20
WINDOW_S = 10.0  # throughput is measured over (about) the last WINDOW_S seconds of samples
RING_SIZE = 128  # at most this many samples are kept, whatever the polling rate


# ----------------------------------------------------------------------------------------------- quantiles
def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Estimate the q-quantile from cumulative `(upper bound, count)` buckets ending with `+Inf`.

    As Prometheus does: find the bucket holding rank q*count and interpolate linearly inside it (the first
    bucket starts at 0); a rank in the `+Inf` bucket answers the highest finite bound. None without observations.
    """
    if not buckets:
        return None
    buckets = sorted(buckets)
    total = buckets[-1][1]
    if total <= 0 or not math.isinf(buckets[-1][0]):
        return None
    if not 0 <= q <= 1:
        return None
    rank = q * total
    i = next(i for i, (_, count) in enumerate(buckets) if count >= rank)
    upper, count = buckets[i]
    if math.isinf(upper):
        return buckets[i - 1][0] if i > 0 else None
    if i == 0:
        lower, below = 0.0, 0.0
        if upper <= 0:
            return upper
    else:
        lower, below = buckets[i - 1]
    in_bucket = count - below
    if in_bucket <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / in_bucket


# ------------------------------------------------------------------------------------------ registry reading
@dataclass
class Histo:
    buckets: dict[float, float]
    count: float = 0.0
    sum: float = 0.0

    def quantiles_ms(self) -> dict[str, float | None]:
        pairs = list(self.buckets.items())
        out: dict[str, float | None] = {}
        for name, q in QUANTILES.items():
            value = histogram_quantile(q, pairs)
            out[name] = None if value is None else round(value * 1000, 3)
        return out

    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None


class Snapshot:
    """One pass over `registry.collect()`: counters and gauges by (name, labels), histograms by labels."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.values: dict[str, list[tuple[dict[str, str], float]]] = {}
        self.histograms: dict[str, dict[tuple[tuple[str, str], ...], Histo]] = {}
        for family in registry.collect():
            if family.type == "histogram":
                per = self.histograms.setdefault(family.name, {})
                for s in family.samples:
                    labels = {k: v for k, v in s.labels.items() if k != "le"}
                    key = tuple(sorted(labels.items()))
                    h = per.setdefault(key, Histo({}))
                    if s.name.endswith("_bucket"):
                        h.buckets[float(s.labels["le"])] = s.value
                    elif s.name.endswith("_count"):
                        h.count = s.value
                    elif s.name.endswith("_sum"):
                        h.sum = s.value
            else:
                for s in family.samples:
                    if not s.name.endswith("_created"):
                        self.values.setdefault(s.name, []).append((dict(s.labels), s.value))

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        return self.values.get(name, [])

    def scalar(self, name: str) -> float:
        return sum(v for _, v in self.samples(name))

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for labels, value in self.samples(name):
            k = tuple(labels.get(key, "") for key in keys)
            out[k] = out.get(k, 0.0) + value
        return out

    def histogram(self, name: str, **labels: str) -> Histo:
        return self.histograms.get(name, {}).get(tuple(sorted(labels.items())), Histo({}))

    def histogram_labels(self, name: str, key: str) -> set[str]:
        return {dict(k).get(key, "") for k in self.histograms.get(name, {})}


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _rate(delta: float, seconds: float | None) -> float | None:
    if seconds is None or seconds <= 0:
        return None
    return round(max(0.0, delta) / seconds, 3)


# ----------------------------------------------------------------------------------------------- dashboard
class Dashboard:
    """Reads the metrics registry, the registry of served tasks and the batch history; remembers recent
    `lpt_rows_total` samples for the throughput window.

    The registry and the batch history exist once the service has started, so they are passed as callables.
    """

    def __init__(self, metrics: Metrics, *, registry: Callable[[], Registry | None],
                 batches: Callable[[], Sequence[BatchRecord]], queue_depth: Callable[[], int],
                 window_s: float = WINDOW_S, ring_size: int = RING_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.registry = registry
        self.batches = batches
        self.queue_depth = queue_depth
        self.window_s = window_s
        self.clock = clock
        self.started = clock()
        self.ring: deque[tuple[float, dict[str, float]]] = deque(maxlen=ring_size)

    def _sample(self, now: float, rows: dict[str, float]) -> tuple[float | None, dict[str, float]]:
        """Record this sample; answer (seconds, rows per task) since the oldest sample inside the window."""
        while len(self.ring) > 1 and now - self.ring[1][0] >= self.window_s:
            self.ring.popleft()  # keep one sample at or beyond the window's start as the baseline
        base = self.ring[0] if self.ring else None
        self.ring.append((now, dict(rows)))
        if base is None:
            return None, {}
        return now - base[0], base[1]

    def data(self) -> dict[str, Any]:
        self.queue_depth()  # as /metrics does: the gauge is also set by the batcher; refresh it before reading
        snap = Snapshot(self.metrics.registry)
        now = self.clock()
        uptime = now - self.started

        rows = {task: v for (task,), v in snap.by("lpt_rows_total", "task").items()}
        window, base = self._sample(now, rows)

        served = {}
        quarantine: dict[str, str] = {}
        registry = self.registry()
        if registry is not None:
            for s in registry.served():
                served[s.task] = {"task": s.task, "version": s.version, "location": registry.location(s)}
                reason = registry.quarantine_reason(s.adapter)
                if reason is not None:
                    # Only on the tasks it concerns, so a healthy entry keeps its three fields.
                    served[s.task] |= {"quarantined": True, "quarantine_reason": reason}
                    quarantine[s.task] = reason

        requests = snap.by("lpt_requests_total", "task", "status")
        errors = snap.by("lpt_errors_total", "task", "type")
        names = set(served) | set(rows) | {t for t, _ in requests} | {t for t, _ in errors}
        names |= snap.histogram_labels("lpt_request_duration_seconds", "task")
        tasks = []
        for task in sorted(names):
            by_status = {s: _num(v) for (t, s), v in sorted(requests.items()) if t == task}
            by_type = {k: _num(v) for (t, k), v in sorted(errors.items()) if t == task}
            task_rows = rows.get(task, 0.0)
            tasks.append({
                "task": task,
                "served": task in served,
                "quarantined": task in quarantine,
                "quarantine_reason": quarantine.get(task),
                "version": served.get(task, {}).get("version"),
                "location": served.get(task, {}).get("location"),
                "requests": _num(sum(by_status.values())),
                "requests_by_status": by_status,
                "errors": _num(sum(by_type.values())),
                "errors_by_type": by_type,
                "rows": _num(task_rows),
                "rows_per_s": _rate(task_rows - base.get(task, 0.0), window),
                "rows_per_s_avg": _rate(task_rows, uptime),
                "latency_ms": snap.histogram("lpt_request_duration_seconds", task=task).quantiles_ms(),
                "queue_ms": snap.histogram("lpt_queue_duration_seconds", task=task).quantiles_ms(),
            })

        forward = snap.histogram("lpt_forward_duration_seconds")
        batch_size = snap.histogram("lpt_batch_size")
        batch_tasks = snap.histogram("lpt_batch_tasks")
        total_rows = sum(rows.values())
        mean_size = batch_size.mean()
        mean_tasks = batch_tasks.mean()
        recent = list(self.batches())[-RECENT_BATCHES:]
        batches = [{"rows": b.rows, "tasks": dict(b.tasks), "ms": round(b.seconds * 1000, 3),
                    "padded_tokens": b.padded_tokens, "started": b.started} for b in reversed(recent)]
        return {
            "time": time.time(),
            "uptime_s": round(uptime, 3),
            "window_s": None if window is None else round(window, 3),
            "global": {
                "queue_depth": _num(snap.scalar("lpt_queue_depth")),
                "tasks_served": _num(snap.scalar("lpt_tasks_served")),
                "requests": _num(sum(requests.values())),
                "errors": _num(sum(errors.values())),
                "rows": _num(total_rows),
                "rows_per_s": _rate(total_rows - sum(base.values()), window),
                "rows_per_s_avg": _rate(total_rows, uptime),
                "forward_ms": forward.quantiles_ms(),
                "forward_passes": _num(forward.count),
                "mean_batch_size": None if mean_size is None else round(mean_size, 3),
                "mean_batch_tasks": None if mean_tasks is None else round(mean_tasks, 3),
                "dropped_rows": {reason: _num(v) for (reason,), v in sorted(snap.by("lpt_rows_dropped_total",
                                                                                    "reason").items())},
            },
            "tasks": tasks,
            "served": list(served.values()),
            "batches": batches,
        }


def install_dashboard(app: FastAPI, dashboard: Dashboard) -> Dashboard:
    """Add `GET /dashboard`, its static files and `GET /dashboard/data` to the app. They are not classification
    requests, so they touch no per-task metric."""
    static = resources.files("lpt_serve.api") / "static"
    page = (static / "dashboard.html").read_text(encoding="utf-8")
    app.state.dashboard = dashboard
    # An installed package is a directory on disk (never a zip here), so StaticFiles can serve it in place.
    app.mount("/dashboard/static", StaticFiles(directory=str(static)), name="dashboard-static")

    @app.get("/dashboard", tags=["ops"], response_class=HTMLResponse)
    async def dashboard_page() -> HTMLResponse:
        """The ops page: per-task requests, errors, throughput and latency (p50/p95/p99), queue depth, batch
        size and the task mix of recent forward passes; refreshes itself every second from `/dashboard/data`."""
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/dashboard/data", tags=["ops"])
    async def dashboard_data() -> dict:
        """What the ops page shows, as JSON, read from the registry `/metrics` exposes."""
        return dashboard.data()

    return dashboard
