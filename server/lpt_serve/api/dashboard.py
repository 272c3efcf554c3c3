"""The ops page: per-task latency p50/p95/p99, throughput, errors, batch size and mix, queue depth; since start
and over the last 1, 5 and 15 minutes, as figures and as charts over time.

`GET /dashboard/data` reads the app's prometheus registry, the same one `/metrics` exposes, so the page and
Prometheus can never disagree: no counter is kept here, only samples of the registry's counters and histogram
buckets. Each window (1m, 5m, 15m) has a fixed ring of slots: every `step` seconds the difference between the
registry now and at the previous tick becomes one slot, stored sparsely (only the tasks that moved), so memory
follows traffic and never grows past `slots` per window. A window's figures are the sum of its slots plus what
happened since the last tick; its rates divide by the seconds covered, and its quantiles come from the summed
bucket deltas, as Prometheus' `rate` and `histogram_quantile` do (linear inside the bucket). The slots are also
the points of the charts. A background task samples every second while the app runs, so the history exists
before anyone opens the page; each `/dashboard/data` call samples too.

With thousands of tasks the page asks for the top rows only (`?top=50&sort=rows|errors|p99|name&filter=...`):
every task is ranked server-side, and only those rows plus the totals travel.

`GET /dashboard` is `static/dashboard.html` with its CSS and JS beside it (served from `/dashboard/static/`, read
with importlib.resources, no CDN), polling the data every second and drawing its charts as inline SVG.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client.registry import Collector

from lpt_serve.serving.batcher import BatchRecord
from lpt_serve.serving.metrics import LATENCY_BUCKETS, Metrics
from lpt_serve.serving.registry import Registry

QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
RECENT_BATCHES = 20
SAMPLE_EVERY_S = 1.0  # the background sampler's period; finer than the smallest window step
TOP_DEFAULT, TOP_MAX = 50, 1000
MIX_TASKS = 5  # the task-mix chart shows this many tasks by name, the rest as "other"


@dataclass(frozen=True)
class WindowSpec:
    name: str
    seconds: float
    step: float  # one slot (and one chart point) per step
    slots: int


# About 30 points per chart whatever the window; 90 slots in all.
WINDOWS = (WindowSpec("1m", 60, 2, 30), WindowSpec("5m", 300, 10, 30), WindowSpec("15m", 900, 30, 30))
WINDOW_NAMES = tuple(w.name for w in WINDOWS) + ("start",)
Window = Literal["1m", "5m", "15m", "start"]
Sort = Literal["rows", "errors", "p99", "name"]

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
    """One pass over what `collectors` (a registry, or some of its metrics) collect: counters and gauges by (name,
    labels), histograms by labels."""

    def __init__(self, *collectors: Collector) -> None:
        self.values: dict[str, list[tuple[dict[str, str], float]]] = {}
        self.histograms: dict[str, dict[tuple[tuple[str, str], ...], Histo]] = {}
        for family in itertools.chain.from_iterable(c.collect() for c in collectors):
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
    x = float(x)  # numpy scalars from the sample arrays become JSON numbers
    return int(x) if x.is_integer() else x


def _rate(delta: float, seconds: float | None) -> float | None:
    if seconds is None or seconds <= 0:
        return None
    return round(max(0.0, float(delta)) / float(seconds), 3)



# ------------------------------------------------------------------------------------------ samples and rings
BOUNDS = (*LATENCY_BUCKETS, math.inf)
N_BUCKETS = len(BOUNDS)
# One row per task: counters, then the cumulative request-latency buckets (the +Inf one last).
ROWS, REQUESTS, ERRORS = 0, 1, 2
LATENCY = slice(3, 3 + N_BUCKETS)
TASK_FIELDS = 3 + N_BUCKETS
# The rest, one vector: dropped rows, forward-pass buckets, batch size and tasks-per-batch (count, sum).
DROPPED = 0
FORWARD = slice(1, 1 + N_BUCKETS)
BATCH_COUNT, BATCH_SUM, MIX_COUNT, MIX_SUM = range(1 + N_BUCKETS, 5 + N_BUCKETS)
GLOBAL_FIELDS = 5 + N_BUCKETS


def quantiles_ms(buckets: np.ndarray) -> dict[str, float | None]:
    """p50/p95/p99 in ms from one row of cumulative bucket counts over BOUNDS (or deltas of them)."""
    pairs = list(zip(BOUNDS, buckets.tolist(), strict=True))
    out: dict[str, float | None] = {}
    for name, q in QUANTILES.items():
        value = histogram_quantile(q, pairs)
        out[name] = None if value is None else round(value * 1000, 3)
    return out


@dataclass
class State:
    """The registry's cumulative figures at one instant: `tasks[i]` is the task the dashboard numbered i."""

    tasks: np.ndarray  # (tasks known then, TASK_FIELDS) float64
    totals: np.ndarray  # (GLOBAL_FIELDS,) float64
    queue_depth: float

    def minus(self, older: State) -> tuple[np.ndarray, np.ndarray]:
        """What happened between `older` and this state; a task born since counts from zero."""
        tasks = self.tasks.copy()
        tasks[: len(older.tasks)] -= older.tasks
        return tasks, self.totals - older.totals


@dataclass
class Slot:
    """What happened in [start, end): only the tasks that moved (`index`, ascending) with their deltas."""

    start: float
    end: float
    index: np.ndarray  # int32
    deltas: np.ndarray  # (len(index), TASK_FIELDS) float32: counts within one step are small integers
    totals: np.ndarray  # (GLOBAL_FIELDS,) float64
    queue_depth: float  # the gauge at `end`

    def task(self, i: int) -> np.ndarray | None:
        at = int(np.searchsorted(self.index, i))
        return self.deltas[at] if at < len(self.index) and self.index[at] == i else None


@dataclass
class Ring:
    spec: WindowSpec
    last_time: float
    last: State
    slots: deque[Slot] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.slots = deque(self.slots, maxlen=self.spec.slots)

    def tick(self, now: float, state: State) -> None:
        if now - self.last_time < self.spec.step:
            return
        tasks, totals = state.minus(self.last)
        moved = np.flatnonzero(np.any(tasks != 0, axis=1)).astype(np.int32)
        self.slots.append(Slot(self.last_time, now, moved, tasks[moved].astype(np.float32), totals,
                               state.queue_depth))
        self.last_time, self.last = now, state

    def evict(self, now: float) -> None:
        # A slot that ended before the window began holds nothing of it (the ring also drops by size).
        while self.slots and self.slots[0].end <= now - self.spec.seconds:
            self.slots.popleft()

    def delta(self, now: float, state: State) -> tuple[np.ndarray, np.ndarray, float]:
        """(per-task deltas, global deltas, seconds covered) over the window ending now."""
        tasks, totals = state.minus(self.last)
        for slot in self.slots:
            tasks[slot.index] += slot.deltas
            totals = totals + slot.totals
        start = self.slots[0].start if self.slots else self.last_time
        return tasks, totals, now - start


def _read_state(snap: Snapshot, number: Callable[[str], int], queue_depth: float) -> State:
    rows = snap.by("lpt_rows_total", "task")
    requests = snap.by("lpt_requests_total", "task")
    errors = snap.by("lpt_errors_total", "task")
    latency = snap.histograms.get("lpt_request_duration_seconds", {})
    entries: list[tuple[int, int, float]] = []
    for column, counter in ((ROWS, rows), (REQUESTS, requests), (ERRORS, errors)):
        entries += [(number(task), column, value) for (task,), value in counter.items()]
    bucket_rows: list[tuple[int, list[float]]] = []
    for key, histo in latency.items():
        bucket_rows.append((number(dict(key).get("task", "")), [histo.buckets.get(b, 0.0) for b in BOUNDS]))
    size = 1 + max([i for i, _, _ in entries] + [i for i, _ in bucket_rows], default=-1)
    tasks = np.zeros((size, TASK_FIELDS))
    for i, column, value in entries:
        tasks[i, column] += value
    for i, buckets in bucket_rows:
        tasks[i, LATENCY] = buckets
    totals = np.zeros(GLOBAL_FIELDS)
    totals[DROPPED] = snap.scalar("lpt_rows_dropped_total")
    forward = snap.histogram("lpt_forward_duration_seconds")
    totals[FORWARD] = [forward.buckets.get(b, 0.0) for b in BOUNDS]
    size_h, mix_h = snap.histogram("lpt_batch_size"), snap.histogram("lpt_batch_tasks")
    totals[[BATCH_COUNT, BATCH_SUM, MIX_COUNT, MIX_SUM]] = [size_h.count, size_h.sum, mix_h.count, mix_h.sum]
    return State(tasks, totals, queue_depth)


def _served_tasks(registry: Registry) -> list[tuple[str, int, str, str | None]]:
    """(task, version, location, quarantine reason) of every served task, loaded or not, from the registry's index:
    listing a task never loads it."""
    return [(e.task, e.version, registry.location(e), registry.quarantine_reason_of(e.task, e.version))
            for e in registry.entries()]


def _ratio(a: float, b: float, digits: int = 3) -> float | None:
    return round(float(a) / float(b), digits) if b > 0 else None


# ----------------------------------------------------------------------------------------------- dashboard
class Dashboard:
    """Reads the metrics registry, the registry of served tasks and the batch history, and keeps one ring of
    samples per window (see the module docstring).

    The registry and the batch history exist once the service has started, so they are passed as callables.
    """

    def __init__(self, metrics: Metrics, *, registry: Callable[[], Registry | None],
                 batches: Callable[[], Sequence[BatchRecord]], queue_depth: Callable[[], int],
                 windows: Sequence[WindowSpec] = WINDOWS, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.registry = registry
        self.batches = batches
        self.queue_depth = queue_depth
        self.clock = clock
        self.names: list[str] = []
        self.numbers: dict[str, int] = {}
        self.lock = threading.Lock()  # the sampler thread and the data route both tick the rings
        self.started = clock()
        # The baseline: the registry when the dashboard was made (with the app, before any request).
        # What the rings count, read each second; the other metrics (per-task queue time, padding) are read only
        # when the page asks. Prometheus builds an object per sample, so a per-task histogram the sampler does not
        # need is a third of its time: ~10 ms a second of GIL with 100 labelled tasks.
        self._ring_metrics = (metrics.rows, metrics.requests, metrics.errors, metrics.request_latency,
                              metrics.dropped, metrics.forward_latency, metrics.batch_rows, metrics.batch_tasks,
                              metrics.queue_depth)
        baseline = self._state(Snapshot(*self._ring_metrics))
        self.rings = {w.name: Ring(w, self.started, baseline) for w in windows}

    def _number(self, task: str) -> int:
        if task not in self.numbers:
            self.numbers[task] = len(self.names)
            self.names.append(task)
        return self.numbers[task]

    def _state(self, snap: Snapshot) -> State:
        return _read_state(snap, self._number, snap.scalar("lpt_queue_depth"))

    def sample(self, everything: bool = False) -> tuple[float, Snapshot, State]:
        """Read what the rings count (`everything`: the whole registry) once and tick every ring whose step has
        passed; thread-safe."""
        with self.lock:
            snap = Snapshot(self.metrics.registry) if everything else Snapshot(*self._ring_metrics)
            now = self.clock()
            state = self._state(snap)
            for ring in self.rings.values():
                ring.tick(now, state)
                ring.evict(now)
            return now, snap, state

    async def run_sampler(self, every_s: float = SAMPLE_EVERY_S) -> None:
        """Sample until cancelled; off the event loop, since reading a registry of many tasks takes a while.

        Reading the registry holds the GIL for as long as it takes (seconds with thousands of busy tasks), so the
        sampler waits at least four times its last sample between samples: it never takes more than a fifth of
        the process, and the rings (whose slots record their real start and end) just get coarser."""
        pause = every_s
        while True:
            await asyncio.sleep(pause)
            began = time.monotonic()
            with contextlib.suppress(Exception):  # a failed sample only costs one chart point
                await asyncio.to_thread(self.sample)
            pause = max(every_s, 4 * (time.monotonic() - began))

    # ------------------------------------------------------------------------------------------------ data
    def data(self, window: Window = "1m", *, top: int = TOP_DEFAULT, sort: Sort = "rows", filter: str = "",
             task: str | None = None) -> dict[str, Any]:
        if window not in WINDOW_NAMES:
            raise ValueError(f"window must be one of {WINDOW_NAMES}")
        self.queue_depth()  # as /metrics does: the gauge is also set by the batcher; refresh it before reading
        now, snap, state = self.sample(everything=True)
        wall = time.time()
        uptime = now - self.started
        by_length = sorted(self.rings.values(), key=lambda r: r.spec.seconds)
        # Since start, the charts use the finest ring that still covers the whole uptime (or the longest one).
        chart_ring = self.rings.get(window) or next((r for r in by_length if r.spec.seconds >= uptime), by_length[-1])
        with self.lock:
            if window == "start":
                win_tasks, win_totals, covered = state.tasks.copy(), state.totals.copy(), uptime
            else:
                win_tasks, win_totals, covered = self.rings[window].delta(now, state)
            slots = list(chart_ring.slots)
        names = self.names[: len(state.tasks)]

        served: dict[str, dict[str, Any]] = {}
        quarantine: dict[str, str] = {}
        registry = self.registry()
        for name, version, location, reason in ([] if registry is None else _served_tasks(registry)):
            served[name] = {"task": name, "version": version, "location": location}
            if reason is not None:
                # Only on the tasks it concerns, so a healthy entry keeps its three fields.
                served[name] |= {"quarantined": True, "quarantine_reason": reason}
                quarantine[name] = reason
        all_names = sorted(set(served) | set(names))
        needle = filter.strip().lower()
        matching = [n for n in all_names if needle in n.lower()] if needle else all_names
        shown = self._rank(matching, win_tasks, sort)[:top]

        requests = snap.by("lpt_requests_total", "task", "status")
        errors = snap.by("lpt_errors_total", "task", "type")
        wanted = set(shown)
        by_status: dict[str, dict[str, int | float]] = {}
        for (t, status), v in sorted(requests.items()):
            if t in wanted:
                by_status.setdefault(t, {})[status] = _num(v)
        by_type: dict[str, dict[str, int | float]] = {}
        for (t, kind), v in sorted(errors.items()):
            if t in wanted:
                by_type.setdefault(t, {})[kind] = _num(v)
        empty = np.zeros(TASK_FIELDS)
        rows_out = []
        for name in shown:
            i = self.numbers.get(name)
            since = state.tasks[i] if i is not None and i < len(state.tasks) else empty
            recent = win_tasks[i] if i is not None and i < len(win_tasks) else empty
            rows_out.append({
                "task": name,
                "served": name in served,
                "quarantined": name in quarantine,
                "quarantine_reason": quarantine.get(name),
                "version": served.get(name, {}).get("version"),
                "location": served.get(name, {}).get("location"),
                "requests": _num(since[REQUESTS]),
                "requests_by_status": by_status.get(name, {}),
                "errors": _num(since[ERRORS]),
                "errors_by_type": by_type.get(name, {}),
                "rows": _num(since[ROWS]),
                "rows_per_s_avg": _rate(since[ROWS], uptime),
                "latency_ms": quantiles_ms(since[LATENCY]),
                "queue_ms": snap.histogram("lpt_queue_duration_seconds", task=name).quantiles_ms(),
                "window": {
                    "requests": _num(recent[REQUESTS]),
                    "errors": _num(recent[ERRORS]),
                    "rows": _num(recent[ROWS]),
                    "rows_per_s": _rate(recent[ROWS], covered),
                    "latency_ms": quantiles_ms(recent[LATENCY]),
                },
            })

        total = state.totals
        recent_batches = list(self.batches())[-RECENT_BATCHES:]
        batches = [{"rows": b.rows, "tasks": dict(b.tasks), "ms": round(b.seconds * 1000, 3),
                    "padded_tokens": b.padded_tokens, "padding": round(b.padding, 4), "started": b.started}
                   for b in reversed(recent_batches)]
        quarantined = [{"task": t, "version": served[t]["version"], "reason": r} for t, r in sorted(quarantine.items())]
        return {
            "time": wall,
            "uptime_s": round(uptime, 3),
            "window": window,
            "window_s": round(covered, 3),
            "global": {
                "queue_depth": _num(snap.scalar("lpt_queue_depth")),
                "tasks_served": _num(snap.scalar("lpt_tasks_served")),
                "tasks_quarantined": len(quarantine),
                "requests": _num(state.tasks[:, REQUESTS].sum()),
                "errors": _num(state.tasks[:, ERRORS].sum()),
                "rows": _num(state.tasks[:, ROWS].sum()),
                "rows_per_s_avg": _rate(state.tasks[:, ROWS].sum(), uptime),
                "latency_ms": quantiles_ms(state.tasks[:, LATENCY].sum(axis=0)),
                "forward_ms": quantiles_ms(total[FORWARD]),
                "forward_passes": _num(total[BATCH_COUNT]),
                "mean_batch_size": _ratio(total[BATCH_SUM], total[BATCH_COUNT]),
                "mean_batch_tasks": _ratio(total[MIX_SUM], total[MIX_COUNT]),
                "dropped_rows": {reason: _num(v) for (reason,), v in sorted(snap.by("lpt_rows_dropped_total",
                                                                                    "reason").items())},
                "window": self._global_window(win_tasks, win_totals, covered),
            },
            "tasks": rows_out,
            "table": {"sort": sort, "filter": filter, "top": top, "total": len(all_names),
                      "matching": len(matching), "shown": len(shown)},
            "served": [served[n] for n in shown if n in served]
                      + [served[n] for n in sorted(quarantine) if n not in wanted],
            "quarantined": quarantined,
            "series": self._series(slots, now, wall, win_tasks, names, task),
            "batches": batches,
        }

    def _rank(self, names: list[str], win_tasks: np.ndarray, sort: Sort) -> list[str]:
        """`names` busiest first by `sort` over the window (ties and idle tasks by name)."""
        if sort == "name":
            return names

        def key(name: str) -> tuple[float, str]:
            i = self.numbers.get(name)
            if i is None or i >= len(win_tasks):
                return (0.0, name)
            row = win_tasks[i]
            if sort == "rows":
                return (-row[ROWS], name)
            if sort == "errors":
                return (-row[ERRORS], name)
            if row[LATENCY][-1] <= 0:
                return (0.0, name)
            p99 = histogram_quantile(0.99, list(zip(BOUNDS, row[LATENCY].tolist(), strict=True)))
            return (-(p99 or 0.0), name)

        return sorted(names, key=key)

    @staticmethod
    def _global_window(win_tasks: np.ndarray, win_totals: np.ndarray, covered: float) -> dict[str, Any]:
        rows = win_tasks[:, ROWS].sum()
        return {
            "seconds": round(covered, 3),
            "requests": _num(win_tasks[:, REQUESTS].sum()),
            "errors": _num(win_tasks[:, ERRORS].sum()),
            "rows": _num(rows),
            "rows_per_s": _rate(rows, covered),
            "errors_per_s": _rate(win_tasks[:, ERRORS].sum(), covered),
            "latency_ms": quantiles_ms(win_tasks[:, LATENCY].sum(axis=0)),
            "forward_ms": quantiles_ms(win_totals[FORWARD]),
            "forward_passes": _num(win_totals[BATCH_COUNT]),
            "mean_batch_size": _ratio(win_totals[BATCH_SUM], win_totals[BATCH_COUNT]),
            "mean_batch_tasks": _ratio(win_totals[MIX_SUM], win_totals[MIX_COUNT]),
            "dropped_rows": _num(win_totals[DROPPED]),
        }

    def _series(self, slots: list[Slot], now: float, wall: float, win_tasks: np.ndarray, names: list[str],
                task: str | None) -> dict[str, Any]:
        """One point per slot of the window's ring: global figures, the task mix, and `task`'s own figures."""
        top = [i for i in np.argsort(-win_tasks[:, ROWS], kind="stable")[:MIX_TASKS] if win_tasks[i, ROWS] > 0]
        mix_names = [names[i] for i in top]
        chosen = self.numbers.get(task) if task else None
        out: dict[str, Any] = {"t": [], "rows_per_s": [], "errors_per_s": [], "p50_ms": [], "p99_ms": [],
                               "mean_batch_size": [], "mean_batch_tasks": [], "queue_depth": [],
                               "mix": {"tasks": mix_names, "rows_per_s": [[] for _ in top], "other": []},
                               "task": task,
                               "task_series": None}
        task_series: dict[str, list] = {"rows_per_s": [], "errors_per_s": [], "p50_ms": [], "p99_ms": []}
        for slot in slots:
            seconds = slot.end - slot.start
            summed = slot.deltas.sum(axis=0) if len(slot.deltas) else np.zeros(TASK_FIELDS)
            out["t"].append(round(wall - (now - slot.end), 3))
            out["rows_per_s"].append(_rate(summed[ROWS], seconds))
            out["errors_per_s"].append(_rate(summed[ERRORS], seconds))
            q = quantiles_ms(summed[LATENCY])
            out["p50_ms"].append(q["p50"])
            out["p99_ms"].append(q["p99"])
            out["mean_batch_size"].append(_ratio(slot.totals[BATCH_SUM], slot.totals[BATCH_COUNT]))
            out["mean_batch_tasks"].append(_ratio(slot.totals[MIX_SUM], slot.totals[MIX_COUNT]))
            out["queue_depth"].append(_num(slot.queue_depth))
            shown_rows = 0.0
            for k, i in enumerate(top):
                row = slot.task(int(i))
                value = 0.0 if row is None else float(row[ROWS])
                shown_rows += value
                out["mix"]["rows_per_s"][k].append(_rate(value, seconds))
            out["mix"]["other"].append(_rate(summed[ROWS] - shown_rows, seconds))
            if chosen is not None:
                row = slot.task(chosen)
                row = np.zeros(TASK_FIELDS) if row is None else row.astype(np.float64)
                task_series["rows_per_s"].append(_rate(row[ROWS], seconds))
                task_series["errors_per_s"].append(_rate(row[ERRORS], seconds))
                q = quantiles_ms(row[LATENCY])
                task_series["p50_ms"].append(q["p50"])
                task_series["p99_ms"].append(q["p99"])
        if chosen is not None:
            out["task_series"] = task_series
        return out


def install_dashboard(app: FastAPI, dashboard: Dashboard) -> Dashboard:
    """Add `GET /dashboard`, its static files and `GET /dashboard/data` to the app (the app's lifespan runs the
    dashboard's sampler). They are not classification requests, so they touch no per-task metric."""
    static = resources.files("lpt_serve.api") / "static"
    page = (static / "dashboard.html").read_text(encoding="utf-8")
    app.state.dashboard = dashboard
    # An installed package is a directory on disk (never a zip here), so StaticFiles can serve it in place.
    app.mount("/dashboard/static", StaticFiles(directory=str(static)), name="dashboard-static")

    @app.get("/dashboard", tags=["ops"], response_class=HTMLResponse)
    async def dashboard_page() -> HTMLResponse:
        """The ops page: throughput, latency (p50/p99), errors, batch size, task mix and queue depth over the last
        1, 5 or 15 minutes as charts, and the busiest tasks in a sortable, filterable table (click a row for
        that task's charts); refreshes itself every second from `/dashboard/data`."""
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/dashboard/data", tags=["ops"])
    async def dashboard_data(
        window: Annotated[Window, Query(description="the window of the recent figures and the charts")] = "1m",
        top: Annotated[int, Query(ge=1, le=TOP_MAX, description="at most this many task rows")] = TOP_DEFAULT,
        sort: Annotated[Sort, Query(description="rank tasks by rows, errors or p99 over the window, or by name")
                        ] = "rows",
        filter: Annotated[str, Query(max_length=200, description="only tasks whose name contains this (any case)")
                          ] = "",
        task: Annotated[str | None, Query(max_length=200, description="also chart this task on its own")] = None,
    ) -> dict:
        """What the ops page shows, as JSON, read from the registry `/metrics` exposes: totals since start, the
        window's figures, one chart point per slot of the window, and the top task rows."""
        return dashboard.data(window, top=top, sort=sort, filter=filter, task=task)

    return dashboard
