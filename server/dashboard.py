"""The ops page (DESIGN: per-task latency p50/p95/p99, throughput, batch size and mix, queue depth, errors).

`GET /dashboard/data` reads the app's prometheus registry, the same one `/metrics` exposes, so the page and
Prometheus can never disagree: no counter is kept here. Quantiles are estimated from the histogram buckets the
way Prometheus' `histogram_quantile` does (linear inside the bucket). Throughput is the delta of
`lpt_rows_total` between samples of that counter taken on each call, over a sliding window, next to the average
since the dashboard started. The recent batches and their task mix come from the batcher's history.

`GET /dashboard` is one self-contained page (inline CSS and JS, no external assets) polling the data every second.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from server.app import Service

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
    """Reads the service's registry; remembers recent `lpt_rows_total` samples for the throughput window."""

    def __init__(self, service: Service, *, window_s: float = WINDOW_S, ring_size: int = RING_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
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
        service = self.service
        metrics = service.metrics
        batcher = service.batcher
        # As /metrics does: the gauge is also set by the batcher; refresh it before reading.
        metrics.queue_depth.set(batcher.depth if batcher is not None else 0)
        snap = Snapshot(metrics.registry)
        now = self.clock()
        uptime = now - self.started

        rows = {task: v for (task,), v in snap.by("lpt_rows_total", "task").items()}
        window, base = self._sample(now, rows)

        served = {}
        if service.registry is not None:
            for s in service.registry.served():
                served[s.task] = {"task": s.task, "version": s.version, "location": service.registry.location(s)}

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
        recent = list(batcher.history)[-RECENT_BATCHES:] if batcher is not None else []
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


def install_dashboard(app: FastAPI, service: Service) -> Dashboard:
    """Add `GET /dashboard` and `GET /dashboard/data` to the app. They are not classification requests, so
    they touch no per-task metric."""
    dashboard = Dashboard(service)
    app.state.dashboard = dashboard

    @app.get("/dashboard", tags=["ops"], response_class=HTMLResponse)
    async def dashboard_page() -> HTMLResponse:
        """The ops page: per-task requests, errors, throughput and latency (p50/p95/p99), queue depth, batch
        size and the task mix of recent forward passes; refreshes itself every second from `/dashboard/data`."""
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    @app.get("/dashboard/data", tags=["ops"])
    async def dashboard_data() -> dict:
        """What the ops page shows, as JSON, read from the registry `/metrics` exposes."""
        return dashboard.data()

    return dashboard


# ---------------------------------------------------------------------------------------------------- page
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lpt-serve · ops</title>
<style>
  :root { --bg:#f6f7f9; --card:#fff; --ink:#1d2330; --muted:#6b7385; --line:#e3e6eb; --bad:#c62828; --ok:#2e7d32; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; background:var(--bg);
         color:var(--ink); }
  header { display:flex; align-items:baseline; gap:12px; padding:14px 24px; background:var(--card);
           border-bottom:1px solid var(--line); }
  header h1 { font-size:18px; margin:0; }
  header .sub { color:var(--muted); }
  header .updated { margin-left:auto; color:var(--muted); font-size:12px; font-variant-numeric:tabular-nums; }
  main { padding:16px 24px 32px; max-width:1200px; }
  #banner { display:none; margin:0 0 12px; padding:8px 12px; border-radius:6px; background:#fdecea;
            color:var(--bad); border:1px solid #f5c2c0; }
  #banner.show { display:block; }
  .tiles { display:grid; grid-template-columns:repeat(auto-fit, minmax(170px, 1fr)); gap:12px; margin-bottom:16px; }
  .tile { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:10px 14px; }
  .tile .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
  .tile .value { font-size:26px; font-weight:600; font-variant-numeric:tabular-nums; }
  .tile .unit { font-size:13px; color:var(--muted); font-weight:400; margin-left:3px; }
  .tile .note { color:var(--muted); font-size:12px; }
  section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px;
            margin-bottom:16px; }
  section h2 { font-size:14px; margin:0 0 8px; }
  table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
  th, td { padding:6px 8px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
  th { color:var(--muted); font-weight:500; font-size:12px; }
  th:first-child, td:first-child { text-align:left; }
  tr:last-child td { border-bottom:none; }
  .swatch { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:6px;
            vertical-align:baseline; }
  .tag { color:var(--muted); font-size:12px; margin-left:4px; }
  .retired td { color:var(--muted); }
  .bad { color:var(--bad); font-weight:600; }
  .muted { color:var(--muted); }
  #batches { list-style:none; margin:0; padding:0; }
  #batches li { display:grid; grid-template-columns:120px 1fr 170px; align-items:center; gap:10px;
                padding:3px 0; font-variant-numeric:tabular-nums; }
  .track { height:14px; border-radius:3px; background:var(--line); }
  .bar { display:flex; height:100%; min-width:4px; border-radius:3px; overflow:hidden; }
  .bar span { display:block; height:100%; }
  .mix { color:var(--muted); font-size:12px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
  .empty { color:var(--muted); padding:6px 0; }
  .extra { color:var(--muted); font-size:12px; }
  .hint { color:var(--muted); font-weight:400; }
</style>
</head>
<body>
<header>
  <h1>lpt-serve</h1><span class="sub">ops</span>
  <span class="updated" data-testid="last-updated" id="updated">connecting…</span>
</header>
<main>
  <div id="banner" data-testid="error-banner" role="alert"></div>
  <div class="tiles">
    <div class="tile"><div class="label">Queue depth</div>
      <div class="value"><span data-testid="queue-depth" id="queue-depth">–</span><span class="unit">rows</span></div>
    </div>
    <div class="tile"><div class="label">Tasks served</div>
      <div class="value" data-testid="tasks-served" id="tasks-served">–</div></div>
    <div class="tile"><div class="label">Throughput</div>
      <div class="value"><span data-testid="throughput" id="throughput">–</span><span class="unit">rows/s</span></div>
      <div class="note" id="throughput-avg"></div></div>
    <div class="tile"><div class="label">Mean batch size</div>
      <div class="value"><span data-testid="mean-batch-size" id="mean-batch">–</span><span class="unit">rows</span>
      </div><div class="note" id="mean-tasks"></div></div>
    <div class="tile"><div class="label">Forward pass p50</div>
      <div class="value"><span data-testid="forward-p50" id="forward-p50">–</span><span class="unit">ms</span></div>
      <div class="note" id="forward-tail"></div></div>
  </div>
  <section>
    <h2>Tasks</h2>
    <table data-testid="task-table">
      <thead><tr><th>task</th><th>version</th><th>requests</th><th>errors</th><th>rows</th><th>rows/s</th>
        <th>p50 ms</th><th>p95 ms</th><th>p99 ms</th></tr></thead>
      <tbody id="tasks"></tbody>
    </table>
    <div class="extra" id="totals"></div>
  </section>
  <section>
    <h2>Recent batches <span class="hint">(newest first; bar length: rows, colours: task mix)</span></h2>
    <ul id="batches" data-testid="batch-list"></ul>
  </section>
</main>
<script>
"use strict";
const DATA_URL = location.pathname.replace(/\\/+$/, "") + "/data";
const colours = {};
function colour(task) {
  if (!colours[task]) {
    let h = 0;
    for (const c of task) h = (h * 31 + c.charCodeAt(0)) >>> 0;
    colours[task] = "hsl(" + (h % 360) + ", 62%, 52%)";
  }
  return colours[task];
}
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
function fmt(x, digits) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (digits === undefined) digits = Math.abs(x) >= 100 ? 0 : Math.abs(x) >= 10 ? 1 : 2;
  return x.toLocaleString(undefined, {maximumFractionDigits: digits, minimumFractionDigits: 0});
}
function text(id, value) { document.getElementById(id).textContent = value; }
function pairs(obj) { return Object.entries(obj).map(([k, v]) => k + ": " + v).join(", "); }

function render(d) {
  const g = d.global;
  text("queue-depth", fmt(g.queue_depth, 0));
  text("tasks-served", fmt(g.tasks_served, 0));
  text("throughput", fmt(g.rows_per_s));
  text("throughput-avg", "avg since start " + fmt(g.rows_per_s_avg) + " rows/s");
  text("mean-batch", fmt(g.mean_batch_size));
  text("mean-tasks", g.mean_batch_tasks === null ? "no passes yet"
       : fmt(g.mean_batch_tasks) + " tasks per pass · " + fmt(g.forward_passes, 0) + " passes");
  text("forward-p50", fmt(g.forward_ms.p50));
  text("forward-tail", "p95 " + fmt(g.forward_ms.p95) + " · p99 " + fmt(g.forward_ms.p99) + " ms");

  const body = [];
  for (const t of d.tasks) {
    const name = el("td", {}, el("span", {class: "swatch", style: "background:" + colour(t.task)}), t.task);
    if (t.location) name.append(el("span", {class: "tag"}, t.location));
    if (!t.served) name.append(el("span", {class: "tag"}, "not served"));
    const req = el("td", {"data-col": "requests", title: pairs(t.requests_by_status)}, fmt(t.requests, 0));
    const err = el("td", {"data-col": "errors", title: pairs(t.errors_by_type), class: t.errors ? "bad" : ""},
                   fmt(t.errors, 0));
    body.push(el("tr", {"data-testid": "task-row-" + t.task, class: t.served ? "" : "retired"},
      name,
      el("td", {"data-col": "version"}, t.version === null ? "–" : "v" + t.version),
      req, err,
      el("td", {"data-col": "rows"}, fmt(t.rows, 0)),
      el("td", {"data-col": "rows-per-s"}, fmt(t.rows_per_s)),
      el("td", {"data-col": "p50"}, fmt(t.latency_ms.p50)),
      el("td", {"data-col": "p95"}, fmt(t.latency_ms.p95)),
      el("td", {"data-col": "p99"}, fmt(t.latency_ms.p99))));
  }
  if (!body.length) body.push(el("tr", {}, el("td", {colspan: 9, class: "empty"}, "no tasks yet")));
  document.getElementById("tasks").replaceChildren(...body);
  const dropped = Object.keys(g.dropped_rows).length ? pairs(g.dropped_rows) : "none";
  text("totals", fmt(g.requests, 0) + " requests · " + fmt(g.errors, 0) + " errors · " + fmt(g.rows, 0)
       + " rows · dropped rows: " + dropped);

  const items = [];
  const widest = Math.max(1, ...d.batches.map(b => b.rows));
  for (const b of d.batches) {
    const names = Object.keys(b.tasks).sort();
    const bar = el("div", {class: "bar", title: pairs(b.tasks), style: "width:" + (100 * b.rows / widest) + "%"});
    for (const n of names) {
      bar.append(el("span", {"data-task": n, title: n + ": " + b.tasks[n],
                             style: "width:" + (100 * b.tasks[n] / b.rows) + "%;background:" + colour(n)}));
    }
    items.push(el("li", {"data-testid": "batch", "data-rows": b.rows, "data-tasks": names.join(",")},
      el("span", {}, b.rows + (b.rows === 1 ? " row" : " rows") + " · " + fmt(b.ms) + " ms"),
      el("div", {class: "track"}, bar),
      el("span", {class: "mix"}, names.map(n => n + " " + b.tasks[n]).join(" · "))));
  }
  if (!items.length) items.push(el("li", {class: "empty"}, "no forward passes yet"));
  document.getElementById("batches").replaceChildren(...items);
}

const banner = document.getElementById("banner");
let lastOk = null;
async function poll() {
  try {
    const r = await fetch(DATA_URL, {cache: "no-store", signal: AbortSignal.timeout(5000)});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    lastOk = new Date();
    banner.classList.remove("show");
    text("updated", "last updated " + lastOk.toLocaleTimeString());
  } catch (e) {
    banner.textContent = "Cannot refresh from " + DATA_URL + " (" + (e && e.message ? e.message : e) + ")"
      + (lastOk ? "; showing data from " + lastOk.toLocaleTimeString() : "") + ". Retrying every second.";
    banner.classList.add("show");
  } finally {
    setTimeout(poll, 1000);
  }
}
poll();
</script>
</body>
</html>
"""
