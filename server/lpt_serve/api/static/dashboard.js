// The ops page: polls dashboard/data every second and redraws; plain DOM and hand-drawn SVG, no framework, no CDN.
"use strict";
const DATA_URL = location.pathname.replace(/\/+$/, "") + "/data";
// The SVG namespace, as the HTML parser assigns it (no URL written here: the page references nothing external).
const SVG = new DOMParser().parseFromString("<svg></svg>", "text/html").body.firstChild.namespaceURI;
const WINDOW_LABEL = {"1m": "last 1 min", "5m": "last 5 min", "15m": "last 15 min", "start": "since start"};
const query = new URLSearchParams(location.search);
const view = {  // what the user picked; sent to the server, which ranks and cuts the task list
  window: WINDOW_LABEL[query.get("window")] ? query.get("window") : "1m",
  sort: ["rows", "errors", "p99", "name"].includes(query.get("sort")) ? query.get("sort") : "rows",
  filter: query.get("filter") || "",
  task: query.get("task") || null,
  top: 50,
};
// Distinct colours for the tasks the task-mix chart names (the busiest), a hash of the name for the rest.
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                 "#bcbd22", "#393b79"];
const colours = {};
let nextColour = 0;
function colour(task, distinct) {
  if (!colours[task] || (distinct && !colours[task].startsWith("#") && nextColour < PALETTE.length)) {
    let h = 0;
    for (const c of task) h = (h * 31 + c.charCodeAt(0)) >>> 0;
    colours[task] = distinct && nextColour < PALETTE.length ? PALETTE[nextColour++] : "hsl(" + (h % 360) + ", 55%, 55%)";
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
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
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
function clock(t) { return new Date(t * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit"}); }

// ------------------------------------------------------------------------------------------------- charts
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}
// lines: [{name, values, colour, dashed}], one value per time in `t`; null leaves a gap. stacked: areas summed.
function chart(id, t, lines, opts) {
  opts = opts || {};
  const W = 360, H = 150, L = 40, R = 8, T = 8, B = 20;
  const box = document.getElementById(id);
  const root = svg("svg", {viewBox: "0 0 " + W + " " + H, class: "plot", role: "img"});
  const n = t.length;
  const tops = lines.map(() => new Array(n).fill(null));
  const bottoms = lines.map(() => new Array(n).fill(0));
  for (let i = 0; i < n; i++) {
    let acc = 0;
    lines.forEach((line, k) => {
      const v = line.values[i];
      if (v === null || v === undefined) return;
      bottoms[k][i] = opts.stacked ? acc : 0;
      acc = opts.stacked ? acc + v : v;
      tops[k][i] = opts.stacked ? acc : v;
    });
  }
  const peak = Math.max(0, ...tops.flat().filter(v => v !== null));
  const ymax = niceMax(peak);
  const x = i => L + (n <= 1 ? (W - L - R) / 2 : (W - L - R) * i / (n - 1));
  const y = v => T + (H - T - B) * (1 - v / ymax);
  for (const f of [0, 0.5, 1]) {
    root.append(svg("line", {x1: L, x2: W - R, y1: y(ymax * f), y2: y(ymax * f), class: "grid"}));
    root.append(svg("text", {x: L - 4, y: y(ymax * f) + 3, class: "tick", "text-anchor": "end"}, fmt(ymax * f)));
  }
  if (n) {
    root.append(svg("text", {x: L, y: H - 5, class: "tick"}, clock(t[0])));
    root.append(svg("text", {x: W - R, y: H - 5, class: "tick", "text-anchor": "end"}, clock(t[n - 1])));
  }
  lines.forEach((line, k) => {
    let path = "", area = "", run = [];
    const flush = () => {
      if (!run.length) return;
      path += run.map((i, j) => (j ? "L" : "M") + x(i).toFixed(1) + " " + y(tops[k][i]).toFixed(1)).join(" ") + " ";
      if (opts.stacked) {
        const back = run.slice().reverse().map(i => "L" + x(i).toFixed(1) + " " + y(bottoms[k][i]).toFixed(1));
        area += run.map((i, j) => (j ? "L" : "M") + x(i).toFixed(1) + " " + y(tops[k][i]).toFixed(1)).join(" ")
          + " " + back.join(" ") + " Z ";
      }
      run = [];
    };
    for (let i = 0; i < n; i++) { if (tops[k][i] === null) flush(); else run.push(i); }
    flush();
    if (opts.stacked && area) root.append(svg("path", {d: area, fill: line.colour, "fill-opacity": 0.55, stroke: "none"}));
    if (path) {
      root.append(svg("path", {d: path, fill: "none", stroke: line.colour, "stroke-width": opts.stacked ? 1 : 2,
                               "stroke-dasharray": line.dashed ? "4 3" : "none", "data-series": line.name}));
    }
    if (n === 1 && tops[k][0] !== null) root.append(svg("circle", {cx: x(0), cy: y(tops[k][0]), r: 3, fill: line.colour}));
  });
  if (!n) root.append(svg("text", {x: W / 2, y: H / 2, class: "tick", "text-anchor": "middle"},
                          "collecting samples…"));
  const legend = el("div", {class: "legend"});
  for (const line of lines) {
    const last = [...line.values].reverse().find(v => v !== null && v !== undefined);
    legend.append(el("span", {}, el("i", {style: "background:" + line.colour}), line.name + " " + fmt(last)));
  }
  box.replaceChildren(root, legend);
}

function renderCharts(d) {
  const s = d.series, t = s.t, own = s.task_series;
  const scope = own ? "task " + s.task : "all tasks";
  const scopeBox = document.getElementById("chart-scope");
  scopeBox.replaceChildren(el("span", {class: "hint"}, "latency and throughput: "), el("b", {}, scope));
  if (s.task) {
    const clear = el("button", {class: "link", "data-testid": "chart-all-tasks"}, "show all tasks");
    clear.onclick = () => { view.task = null; refresh(); };
    scopeBox.append(" ", clear);
    if (!own) scopeBox.append(el("span", {class: "hint"}, " (no traffic in this window)"));
  }
  const step = t.length > 1 ? Math.round(t[1] - t[0]) : null;
  text("charts-hint", (d.window === "start" ? "since start, at most the last 15 min" : WINDOW_LABEL[d.window])
       + (step ? " · one point per " + step + " s" : ""));
  const lat = own || s, thr = own || s;
  chart("chart-latency", t, [{name: "p50", values: lat.p50_ms, colour: "#1e88e5"},
                             {name: "p99", values: lat.p99_ms, colour: "#e53935"}]);
  chart("chart-throughput", t, [{name: "rows/s", values: thr.rows_per_s, colour: "#2e7d32"},
                                {name: "errors/s", values: thr.errors_per_s, colour: "#c62828", dashed: true}]);
  const mix = s.mix.tasks.map((name, k) => ({name: name, values: s.mix.rows_per_s[k], colour: colour(name, true)}));
  mix.push({name: "other", values: s.mix.other, colour: "#9aa1ad"});
  chart("chart-mix", t, mix, {stacked: true});
  chart("chart-batch", t, [{name: "rows/pass", values: s.mean_batch_size, colour: "#6d4c41"},
                           {name: "tasks/pass", values: s.mean_batch_tasks, colour: "#8e24aa", dashed: true}]);
  chart("chart-queue", t, [{name: "queued rows", values: s.queue_depth, colour: "#fb8c00"}]);
}

// -------------------------------------------------------------------------------------------------- page
function render(d) {
  const g = d.global, w = g.window;
  for (const node of document.querySelectorAll(".scope")) node.textContent = "· " + WINDOW_LABEL[d.window];
  for (const b of document.querySelectorAll("[data-window]")) b.classList.toggle("on", b.dataset.window === d.window);
  text("throughput", fmt(w.rows_per_s));
  text("throughput-note", fmt(w.rows, 0) + " rows in " + fmt(w.seconds, 0) + " s · avg since start "
       + fmt(g.rows_per_s_avg) + " rows/s");
  text("latency-p99", fmt(w.latency_ms.p99));
  text("latency-note", "p50 " + fmt(w.latency_ms.p50) + " · p95 " + fmt(w.latency_ms.p95) + " ms · "
       + fmt(w.requests, 0) + " requests");
  text("errors", fmt(w.errors, 0));
  text("errors-note", fmt(w.errors_per_s) + " /s · " + fmt(g.errors, 0) + " since start");
  document.getElementById("errors-tile").classList.toggle("alert", w.errors > 0);
  text("queue-depth", fmt(g.queue_depth, 0));
  const dropped = Object.keys(g.dropped_rows).length ? pairs(g.dropped_rows) : "none";
  text("dropped-note", "dropped rows: " + dropped);
  text("tasks-served", fmt(g.tasks_served, 0));
  const qTile = document.getElementById("tasks-note");
  qTile.textContent = g.tasks_quarantined ? g.tasks_quarantined + " quarantined" : "none quarantined";
  qTile.classList.toggle("bad", g.tasks_quarantined > 0);
  text("mean-batch", fmt(w.mean_batch_size));
  text("mean-tasks", w.mean_batch_tasks === null ? "no passes in this window"
       : fmt(w.mean_batch_tasks) + " tasks per pass · " + fmt(w.forward_passes, 0) + " passes");
  text("forward-p50", fmt(w.forward_ms.p50));
  text("forward-tail", "p95 " + fmt(w.forward_ms.p95) + " · p99 " + fmt(w.forward_ms.p99) + " ms");

  const q = document.getElementById("quarantine");
  q.replaceChildren();
  if (d.quarantined.length) {
    q.append(el("b", {}, d.quarantined.length + (d.quarantined.length === 1 ? " task" : " tasks")
                + " quarantined (requests refused until an upload or rollback): "));
    d.quarantined.slice(0, 10).forEach((e, i) => {
      q.append((i ? ", " : ""), el("span", {title: e.reason}, e.task + " v" + e.version));
    });
    if (d.quarantined.length > 10) q.append(" and " + (d.quarantined.length - 10) + " more");
  }
  q.classList.toggle("show", d.quarantined.length > 0);

  renderCharts(d);
  renderTable(d);

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
      el("span", {title: "padded share of the positions computed, after length buckets"},
         b.rows + (b.rows === 1 ? " row" : " rows") + " · " + fmt(b.ms) + " ms · pad " + Math.round(100 * b.padding) + "%"),
      el("div", {class: "track"}, bar),
      el("span", {class: "mix"}, names.map(n => n + " " + b.tasks[n]).join(" · "))));
  }
  if (!items.length) items.push(el("li", {class: "empty"}, "no forward passes yet"));
  document.getElementById("batches").replaceChildren(...items);
}

function renderTable(d) {
  const g = d.global, tb = d.table;
  const sortName = {rows: "rows/s", errors: "errors", p99: "p99", name: "name"}[tb.sort];
  text("table-hint", (tb.sort === "name" ? "by name" : "busiest first by " + sortName) + " · "
       + WINDOW_LABEL[d.window] + " · click a row for its charts");
  for (const th of document.querySelectorAll("th[data-sort]")) th.classList.toggle("sorted", th.dataset.sort === tb.sort);
  const body = [];
  for (const t of d.tasks) {
    const w = t.window;
    const name = el("td", {}, el("span", {class: "swatch", style: "background:" + colour(t.task)}), t.task);
    if (t.location) name.append(el("span", {class: "tag"}, t.location));
    if (t.task === "_other") {
      name.append(el("span", {class: "tag", title: "tasks past the metrics' per-task label limit, counted together"},
                     "all other tasks"));
    } else if (!t.served) name.append(el("span", {class: "tag"}, "not served"));
    if (t.quarantined) {
      name.append(el("span", {class: "tag bad", "data-testid": "quarantined-" + t.task,
                              title: t.quarantine_reason || ""}, "quarantined"));
    }
    const req = el("td", {"data-col": "requests", title: "since start: " + pairs(t.requests_by_status)},
                   fmt(w.requests, 0));
    const err = el("td", {"data-col": "errors", title: "since start: " + pairs(t.errors_by_type),
                          class: w.errors ? "bad" : ""}, fmt(w.errors, 0));
    const classes = [t.served ? "" : "retired", t.quarantined ? "quarantined" : "", w.requests ? "" : "idle",
                     view.task === t.task ? "selected" : ""].join(" ").trim();
    const row = el("tr", {"data-testid": "task-row-" + t.task, "data-task": t.task, class: classes},
      name,
      el("td", {"data-col": "version"}, t.version === null ? "–" : "v" + t.version),
      req, err,
      el("td", {"data-col": "rows"}, fmt(w.rows, 0)),
      el("td", {"data-col": "rows-per-s"}, fmt(w.rows_per_s)),
      el("td", {"data-col": "p50"}, fmt(w.latency_ms.p50)),
      el("td", {"data-col": "p95"}, fmt(w.latency_ms.p95)),
      el("td", {"data-col": "p99"}, fmt(w.latency_ms.p99)));
    row.onclick = () => { view.task = view.task === t.task ? null : t.task; refresh(); };
    body.push(row);
  }
  if (!body.length) {
    body.push(el("tr", {}, el("td", {colspan: 9, class: "empty"}, tb.filter ? "no task matches “" + tb.filter + "”"
                                                                         : "no tasks yet")));
  }
  document.getElementById("tasks").replaceChildren(...body);
  const more = tb.matching - tb.shown;
  text("more", (more > 0 ? more.toLocaleString() + " more not shown · " : "") + "showing " + tb.shown + " of "
       + tb.matching.toLocaleString() + (tb.filter ? " matching" : "") + " · " + tb.total.toLocaleString()
       + " tasks in all");
  text("totals", "since start: " + fmt(g.requests, 0) + " requests · " + fmt(g.errors, 0) + " errors · "
       + fmt(g.rows, 0) + " rows · p50 " + fmt(g.latency_ms.p50) + " · p99 " + fmt(g.latency_ms.p99) + " ms");
}

// ------------------------------------------------------------------------------------------------- input
for (const b of document.querySelectorAll("[data-window]")) {
  b.onclick = () => { view.window = b.dataset.window; refresh(); };
}
for (const th of document.querySelectorAll("th[data-sort]")) {
  th.title = "sort by " + th.textContent;
  th.onclick = () => { view.sort = th.dataset.sort; refresh(); };
}
const filterBox = document.getElementById("filter");
filterBox.value = view.filter;
let typing = null;
filterBox.oninput = () => {
  clearTimeout(typing);
  typing = setTimeout(() => { view.filter = filterBox.value.trim(); refresh(); }, 150);
};

const banner = document.getElementById("banner");
let lastOk = null, timer = null, generation = 0;
function dataUrl() {
  const p = new URLSearchParams({window: view.window, sort: view.sort, top: String(view.top)});
  if (view.filter) p.set("filter", view.filter);
  if (view.task) p.set("task", view.task);
  return DATA_URL + "?" + p.toString();
}
async function poll() {
  const mine = ++generation;
  try {
    const r = await fetch(dataUrl(), {cache: "no-store", signal: AbortSignal.timeout(5000)});
    if (!r.ok) throw new Error("HTTP " + r.status);
    const d = await r.json();
    if (mine !== generation) return;  // a newer request (the user changed the view) is on its way
    render(d);
    lastOk = new Date();
    banner.classList.remove("show");
    text("updated", "last updated " + lastOk.toLocaleTimeString());
  } catch (e) {
    if (mine !== generation) return;
    banner.textContent = "Cannot refresh from " + DATA_URL + " (" + (e && e.message ? e.message : e) + ")"
      + (lastOk ? "; showing data from " + lastOk.toLocaleTimeString() : "") + ". Retrying every second.";
    banner.classList.add("show");
  } finally {
    if (mine === generation) { clearTimeout(timer); timer = setTimeout(poll, 1000); }
  }
}
function refresh() {
  const p = new URLSearchParams();
  if (view.window !== "1m") p.set("window", view.window);
  if (view.sort !== "rows") p.set("sort", view.sort);
  if (view.filter) p.set("filter", view.filter);
  if (view.task) p.set("task", view.task);
  history.replaceState(null, "", location.pathname + (p.toString() ? "?" + p.toString() : ""));
  clearTimeout(timer);
  poll();
}
poll();
