// The ops page: polls dashboard/data every second and redraws; plain DOM, no framework, no CDN.
"use strict";
const DATA_URL = location.pathname.replace(/\/+$/, "") + "/data";
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
    if (t.quarantined) {
      name.append(el("span", {class: "tag bad", "data-testid": "quarantined-" + t.task,
                              title: t.quarantine_reason || ""}, "quarantined"));
    }
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
