"""The ops page: `/dashboard/data` in-process against the registry `/metrics` exposes, and `/dashboard` in Chromium."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lpt_serve.api.app import create_app, dashboard_for
from lpt_serve.api.dashboard import histogram_quantile
from lpt_serve.api.settings import Settings
from lpt_serve.format import CONFIG_NAME, WEIGHTS_NAME
from lpt_serve.serving.metrics import LATENCY_BUCKETS
from lpt_serve.serving.store import AdapterStore
from tests.helpers import ThreadedServer, make_adapter, serving

CHROMIUM = os.environ.get("LPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
MAX_MS = LATENCY_BUCKETS[-1] * 1000  # the highest finite bucket bound: no estimate goes past it


def make_app(tiny_backbone, store_root, **overrides):
    # One inference worker: the tests read which rows shared a pass.
    return create_app(Settings(store=store_root, **{"max_wait_ms": 2, "inference_workers": 1, **overrides}),
                      backbone=tiny_backbone)


def by_task(data: dict) -> dict[str, dict]:
    return {t["task"]: t for t in data["tasks"]}


def assert_quantiles_sane(q: dict) -> None:
    assert q["p50"] is not None
    assert 0 <= q["p50"] <= q["p95"] <= q["p99"] <= MAX_MS


# ---------------------------------------------------------------------------------------------- quantiles
def test_histogram_quantile_interpolates_like_prometheus():
    inf = math.inf
    buckets = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (inf, 40.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.3)  # rank 20: half way through (0.1, 0.5]
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.98)  # rank 39.6 in (0.5, 1.0]
    assert histogram_quantile(1.0, buckets) == pytest.approx(1.0)
    assert histogram_quantile(0.1, list(reversed(buckets))) == pytest.approx(0.04)  # rank 4 of 10 in (0, 0.1]
    assert histogram_quantile(0.9, [(0.1, 1.0), (inf, 10.0)]) == 0.1  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, [(0.1, 0.0), (inf, 0.0)]) is None  # nothing observed
    assert histogram_quantile(1.5, buckets) is None


# ------------------------------------------------------------------------------------------------ /data
async def test_counts_match_what_was_sent_and_what_metrics_says(tiny_backbone, store_root):
    app = make_app(tiny_backbone, store_root, max_wait_ms=20)
    async with serving(app) as client:
        sent = {"alpha": (0, 0), "beta": (0, 0)}  # task -> (requests, rows)
        for i in range(5):
            texts = ["good film"] * (i + 1)
            assert (await client.post("/classify/alpha", json={"texts": texts})).status_code == 200
        sent["alpha"] = (5, 15)
        for _ in range(3):
            assert (await client.post("/classify/beta", json={"text": "bad"})).status_code == 200
        items = [{"task": "alpha", "text": "good"}, {"task": "beta", "text": "bad"}, {"task": "beta", "text": "ok"}]
        assert (await client.post("/classify", json={"items": items})).status_code == 200
        sent = {"alpha": (6, 16), "beta": (4, 5)}
        r = await client.post("/classify/nope", json={"text": "good"})
        assert r.status_code == 404

        data = (await client.get("/dashboard/data")).json()
        metrics_text = (await client.get("/metrics")).text

    tasks = by_task(data)
    assert set(tasks) == {"alpha", "beta"}  # the unknown task got no row
    for task, (requests, rows) in sent.items():
        t = tasks[task]
        assert t["requests"] == requests and t["requests_by_status"] == {"200": requests}
        assert t["rows"] == rows
        assert t["errors"] == 0 and t["errors_by_type"] == {}
        assert t["served"] and t["version"] == 1 and t["location"] == "cpu"
        assert_quantiles_sane(t["latency_ms"])
        assert_quantiles_sane(t["queue_ms"])
        assert t["rows_per_s_avg"] > 0
        # All of it happened within the last minute: the 1m window (the default) holds the same counts.
        assert (t["window"]["requests"], t["window"]["rows"], t["window"]["errors"]) == (requests, rows, 0)
        assert t["window"]["latency_ms"] == t["latency_ms"]
    g = data["global"]
    assert g["requests"] == 10 and g["rows"] == 21 and g["errors"] == 0
    assert g["tasks_served"] == 2 and g["queue_depth"] == 0 and g["dropped_rows"] == {}
    assert_quantiles_sane(g["forward_ms"])
    assert g["forward_passes"] == len(data["batches"]) == 9  # one pass per request here: they came one by one
    assert 1 <= g["mean_batch_size"] <= 5
    w = g["window"]
    assert data["window"] == "1m" and (w["requests"], w["rows"], w["errors"]) == (10, 21, 0)
    assert w["forward_passes"] == 9 and w["mean_batch_size"] == g["mean_batch_size"]
    assert data["table"] == {"sort": "rows", "filter": "", "top": 50, "total": 2, "matching": 2, "shown": 2}
    assert data["quarantined"] == []
    assert data["served"] == [{"task": "alpha", "version": 1, "location": "cpu"},
                              {"task": "beta", "version": 1, "location": "cpu"}]

    batches = data["batches"]
    assert 1 <= len(batches) <= 20
    assert batches[0]["tasks"] == {"alpha": 1, "beta": 2} and batches[0]["rows"] == 3  # newest first: the mixed one
    assert sum(b["rows"] for b in batches) == 21
    assert all(b["ms"] >= 0 and sum(b["tasks"].values()) == b["rows"] for b in batches)
    # Padding per pass, after the engine's length buckets: at least one position per row, never all padding.
    assert all(0 <= b["padding"] < 1 and b["padded_tokens"] >= b["rows"] for b in batches)

    # One source of truth: what /metrics says is what the dashboard says.
    families = {f.name: f for f in text_string_to_metric_families(metrics_text)}
    for s in families["lpt_rows"].samples:
        if s.name == "lpt_rows_total":
            assert tasks[s.labels["task"]]["rows"] == s.value
    for s in families["lpt_requests"].samples:
        if s.name == "lpt_requests_total":
            assert tasks[s.labels["task"]]["requests_by_status"][s.labels["status"]] == s.value
    [count] = [s.value for s in families["lpt_batch_size"].samples if s.name == "lpt_batch_size_count"]
    [total] = [s.value for s in families["lpt_batch_size"].samples if s.name == "lpt_batch_size_sum"]
    assert g["mean_batch_size"] == pytest.approx(total / count, abs=1e-3)


async def test_errors_are_counted_per_task(tiny_backbone, store_root):
    app = make_app(tiny_backbone, store_root, request_timeout_s=0.2)
    async with serving(app) as client:
        service = app.state.service
        original = service._run_batch
        release = threading.Event()

        def stuck(adapters, encoded):
            release.wait(10)
            return original(adapters, encoded)

        service.batcher.run_batch = stuck
        r = await client.post("/classify/alpha", json={"text": "good"})
        assert r.status_code == 504
        service.batcher.run_batch = original
        # The next request must not race a short deadline.
        service.config = dataclasses.replace(service.config, request_timeout_s=30.0)
        release.set()
        assert (await client.post("/classify/beta", json={"text": "good"})).status_code == 200
        tasks = by_task((await client.get("/dashboard/data")).json())

    alpha, beta = tasks["alpha"], tasks["beta"]
    assert alpha["errors"] == 1 and alpha["errors_by_type"] == {"timeout": 1}
    assert alpha["requests"] == 1 and alpha["requests_by_status"] == {"504": 1}
    assert alpha["rows"] == 0 and alpha["latency_ms"] == {"p50": None, "p95": None, "p99": None}
    assert beta["errors"] == 0 and beta["requests_by_status"] == {"200": 1}


async def test_windows_are_deltas_of_ring_samples(tiny_backbone, store_root):
    app = make_app(tiny_backbone, store_root)
    async with serving(app) as client:
        now = [100.0]
        dashboard = dashboard_for(app.state.service, clock=lambda: now[0])  # its own rings; baseline at t=100
        first = dashboard.data("1m")
        assert first["window_s"] == 0.0 and first["global"]["window"]["rows_per_s"] is None  # no time: no rate
        assert (await client.post("/classify/alpha", json={"texts": ["a", "b", "c", "d", "e", "f"]})).status_code == 200

        now[0] = 102.0
        d = dashboard.data("1m")
        assert d["window"] == "1m" and d["window_s"] == 2.0
        assert d["global"]["window"]["rows_per_s"] == 3.0 and by_task(d)["alpha"]["window"]["rows_per_s"] == 3.0
        assert by_task(d)["beta"]["window"]["rows_per_s"] == 0.0
        assert d["global"]["rows_per_s_avg"] == 3.0  # six rows in the two seconds since the dashboard started
        assert_quantiles_sane(by_task(d)["alpha"]["window"]["latency_ms"])
        assert d["series"]["rows_per_s"] == [3.0]  # one completed 2 s slot: one chart point
        assert d["series"]["mix"]["tasks"] == ["alpha"] and d["series"]["mix"]["rows_per_s"] == [[3.0]]

        now[0] = 104.0
        d = dashboard.data("1m")
        assert d["window_s"] == 4.0 and d["global"]["window"]["rows_per_s"] == 1.5  # quiet for 2 s: still holds 6
        assert d["series"]["rows_per_s"] == [3.0, 0.0]

        # Sampled every 2 s, as the background sampler would; the 1m window slides past the rows, 5m still has
        # them, and the ring never holds more than its slots.
        while now[0] < 200.0:
            now[0] += 2.0
            dashboard.sample()
        d = dashboard.data("1m")
        g = d["global"]["window"]
        assert g["rows"] == 0 and g["rows_per_s"] == 0.0 and g["latency_ms"]["p99"] is None
        assert 60.0 <= d["window_s"] <= 62.0
        assert by_task(d)["alpha"]["window"]["rows"] == 0 and by_task(d)["alpha"]["rows"] == 6  # since start: 6
        assert by_task(d)["alpha"]["latency_ms"]["p99"] is not None
        assert len(dashboard.rings["1m"].slots) <= 30 and set(d["series"]["rows_per_s"]) == {0.0}
        five = dashboard.data("5m")
        assert five["global"]["window"]["rows"] == 6 and five["window_s"] == 100.0  # the whole life so far
        assert five["global"]["window"]["rows_per_s"] == 0.06
        start = dashboard.data("start")
        assert start["global"]["window"]["rows"] == 6 and start["global"]["window"]["rows_per_s"] == 0.06

        assert (await client.post("/classify/beta", json={"texts": ["a", "b"]})).status_code == 200
        now[0] = 201.0
        d = dashboard.data("1m", task="beta")
        assert by_task(d)["beta"]["window"]["rows"] == 2 and d["global"]["window"]["rows"] == 2
        assert d["series"]["task"] == "beta" and d["series"]["task_series"]["rows_per_s"][-1] == 0.0  # not ticked yet
        now[0] = 202.0
        d = dashboard.data("1m", task="beta")
        assert d["series"]["task_series"]["rows_per_s"][-1] == 1.0  # 2 rows in the slot [200, 202]
        assert d["series"]["rows_per_s"][-1] == 1.0


async def test_top_sort_and_filter_are_done_by_the_server(tiny_backbone, store_root, tmp_path):
    store = AdapterStore(store_root)
    for name in ["gamma", "delta", "alphabet"]:
        store.commit_dir(name, make_adapter(tiny_backbone, name, seed=3).save(tmp_path / name))
    app = make_app(tiny_backbone, store_root)
    async with serving(app) as client:
        for task, rows in [("beta", 5), ("alpha", 3), ("gamma", 1)]:
            assert (await client.post(f"/classify/{task}", json={"texts": ["x"] * rows})).status_code == 200
        async def data(**params):
            r = await client.get("/dashboard/data", params=params)
            assert r.status_code == 200, r.text
            return r.json()

        d = await data()
        assert [t["task"] for t in d["tasks"]] == ["beta", "alpha", "gamma", "alphabet", "delta"]  # busiest first
        assert d["table"] == {"sort": "rows", "filter": "", "top": 50, "total": 5, "matching": 5, "shown": 5}
        d = await data(top=2)
        assert [t["task"] for t in d["tasks"]] == ["beta", "alpha"] and d["table"]["shown"] == 2
        assert [s["task"] for s in d["served"]] == ["beta", "alpha"]  # the served entries of the rows sent only
        d = await data(filter="ALPHA")
        assert [t["task"] for t in d["tasks"]] == ["alpha", "alphabet"] and d["table"]["matching"] == 2
        d = await data(sort="name", top=3)
        assert [t["task"] for t in d["tasks"]] == ["alpha", "alphabet", "beta"]
        d = await data(sort="p99")
        assert {t["task"] for t in d["tasks"][:3]} == {"alpha", "beta", "gamma"}  # idle tasks (no p99) last
        d = await data(sort="errors", window="5m")
        assert d["window"] == "5m" and [t["task"] for t in d["tasks"]][:1] == ["alpha"]  # no errors: by name
        for bad in [{"window": "2m"}, {"sort": "size"}, {"top": 0}, {"top": 100_000}]:
            r = await client.get("/dashboard/data", params=bad)
            assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error", bad


async def test_ops_routes_are_not_classification_requests(tiny_backbone, store_root):
    app = make_app(tiny_backbone, store_root)
    async with serving(app) as client:
        assert (await client.post("/classify/alpha", json={"text": "good"})).status_code == 200
        before = (await client.get("/dashboard/data")).json()
        for path in ["/dashboard", "/dashboard/data", "/metrics", "/dashboard", "/dashboard/data"]:
            assert (await client.get(path)).status_code == 200
        after = (await client.get("/dashboard/data")).json()
        page = await client.get("/dashboard")
        assets = {}
        for ref in re.findall(r'(?:href|src)="([^"]+)"', page.text):
            asset = await client.get("/" + ref)  # relative to /dashboard
            assert asset.status_code == 200, ref
            assets[ref] = asset.text
        spec = (await client.get("/openapi.json")).json()

    assert [(t["task"], t["requests"], t["rows"]) for t in after["tasks"]] == [
        (t["task"], t["requests"], t["rows"]) for t in before["tasks"]]
    assert after["global"]["requests"] == 1
    # A page that works offline: its script and style come from this server; nothing external anywhere.
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert sorted(assets) == ["dashboard/static/dashboard.css", "dashboard/static/dashboard.js"]
    for text in (html, *assets.values()):
        assert "http://" not in text and "https://" not in text and "@import" not in text
    for testid in ["queue-depth", "tasks-served", "throughput", "mean-batch-size", "forward-p50", "batch-list",
                   "task-table", "last-updated", "error-banner"]:
        assert f'data-testid="{testid}"' in html
    assert "task-row-" in assets["dashboard/static/dashboard.js"]
    assert "/dashboard" in spec["paths"] and "/dashboard/data" in spec["paths"]
    assert "ops page" in spec["paths"]["/dashboard"]["get"]["description"]


# ---------------------------------------------------------------------------------------------- browser
@pytest.fixture
def chromium() -> str:
    """Chromium's path. Skip without Chromium or Playwright, unless LPT_REQUIRE_BROWSER=1 (CI): there it fails."""
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "the playwright package is missing: pip install -e '.[test]' (never run `playwright install`)"
    if problem is None and not os.access(CHROMIUM, os.X_OK):
        problem = f"no Chromium at {CHROMIUM}: apt-get install chromium (or set LPT_CHROMIUM)"
    if problem:
        if os.environ.get("LPT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"LPT_REQUIRE_BROWSER=1 but {problem}", pytrace=False)
        pytest.skip(problem)
    return CHROMIUM


MANY_TASKS = 1000
BUSY = [f"task-{i:04d}" for i in range(0, 40, 3)]  # the tasks the background traffic visits, busiest first


@pytest.fixture(scope="session")
def many_tasks_store(tiny_backbone, tmp_path_factory) -> Path:
    """`alpha` and `beta` as in `store_root`, plus one tiny adapter committed under MANY_TASKS more names."""
    root = tmp_path_factory.mktemp("many-tasks")
    store = AdapterStore(root / "store")
    for i, task in enumerate(["alpha", "beta"]):
        store.commit_dir(task, make_adapter(tiny_backbone, task, seed=i, prompt_layer=i + 1).save(root / task))
    template = make_adapter(tiny_backbone, "template", seed=7).save(root / "template")
    config = json.loads((template / CONFIG_NAME).read_text())
    folder = root / "one"
    folder.mkdir()
    shutil.copy(template / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    for i in range(MANY_TASKS):
        task = f"task-{i:04d}"
        (folder / CONFIG_NAME).write_text(json.dumps(config | {"task": task}))  # the config names its task
        store.commit_dir(task, folder)
    return root / "store"


@pytest.fixture
def live_server(tiny_backbone, many_tasks_store):
    server = ThreadedServer(make_app(tiny_backbone, many_tasks_store, max_wait_ms=20))
    yield server
    server.stop()


class Traffic:
    """Requests to BUSY in a thread, the first tasks more often (a skewed mix, as in production)."""

    def __init__(self, url: str) -> None:
        self.url, self.stop_event, self.sent = url, threading.Event(), 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        rng = random.Random(0)
        weights = [1 / (k + 1) for k in range(len(BUSY))]
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop_event.is_set():
                task = rng.choices(BUSY, weights)[0]
                r = client.post(f"/classify/{task}", json={"texts": ["good film"] * rng.randint(1, 6)})
                assert r.status_code == 200, r.text
                self.sent += 1
                time.sleep(0.02)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)


@pytest.mark.browser
def test_dashboard_in_chromium_is_live(chromium, live_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    traffic: Traffic | None = None
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        for _ in range(3):
            assert client.post("/classify/alpha", json={"text": "good film"}).status_code == 200
        for _ in range(2):
            assert client.post("/classify/beta", json={"texts": ["bad", "dull"]}).status_code == 200
        items = [{"task": "alpha", "text": "good"}, {"task": "beta", "text": "bad"}]
        assert client.post("/classify", json={"items": items}).status_code == 200  # one batch of two tasks

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(live_server.url + "/dashboard?window=start")

                def cell(task: str, col: str):
                    return page.locator(f'[data-testid="task-row-{task}"] [data-col="{col}"]')

                rows = page.locator('[data-testid^="task-row-"]')
                expect(page.get_by_test_id("window-start")).to_have_class("on", timeout=15_000)
                expect(cell("alpha", "requests")).to_have_text("4", timeout=15_000)
                expect(cell("beta", "requests")).to_have_text("3")
                expect(cell("alpha", "rows")).to_have_text("4")
                expect(cell("beta", "rows")).to_have_text("5")
                expect(cell("alpha", "errors")).to_have_text("0")
                expect(cell("alpha", "version")).to_have_text("v1")
                expect(page.get_by_test_id("tasks-served")).to_have_text(f"{MANY_TASKS + 2:,}")
                expect(page.get_by_test_id("error-banner")).to_be_hidden()
                expect(page.get_by_test_id("quarantine-banner")).to_be_hidden()
                # A thousand tasks, fifty rows: the busiest first, and a note for the rest.
                expect(rows).to_have_count(50)
                expect(page.get_by_test_id("table-more")).to_contain_text(f"{MANY_TASKS + 2 - 50:,} more not shown")
                mixed = page.locator('[data-testid="batch-list"] [data-testid="batch"][data-tasks="alpha,beta"]')
                expect(mixed.first).to_be_visible()
                expect(mixed.first.locator("[data-task]")).to_have_count(2)  # one coloured bar per task
                traffic = Traffic(live_server.url)  # from here on, other tasks are busier than alpha and beta
                expect(rows.first).to_have_attribute("data-testid", f"task-row-{BUSY[0]}", timeout=15_000)
                for testid in ["throughput", "mean-batch-size", "forward-p50", "latency-p99"]:
                    expect(page.get_by_test_id(testid)).not_to_have_text("–")
                expect(page.get_by_test_id("last-updated")).to_contain_text("last updated")
                # The charts are SVG drawn by the page: the latency chart has its p50 and p99 lines.
                expect(page.locator('[data-testid="chart-latency"] path[data-series="p99"]')).to_have_count(
                    1, timeout=15_000)
                expect(page.locator('[data-testid="chart-mix"] svg path').first).to_be_attached()

                # Filter (server-side) and sort by clicking a header.
                page.get_by_test_id("task-filter").fill("task-07")
                expect(rows).to_have_count(50)
                expect(page.get_by_test_id("table-more")).to_contain_text("showing 50 of 100 matching")
                page.get_by_test_id("task-filter").fill("alpha")
                expect(rows).to_have_count(1)
                page.get_by_test_id("task-filter").fill("")
                page.locator('th[data-sort="name"]').click()
                expect(rows.first).to_have_attribute("data-testid", "task-row-alpha")
                expect(page.locator('th[data-sort="name"]')).to_have_class("sortable sorted")
                page.locator('th[data-sort="rows"]').click()
                expect(rows.first).to_have_attribute("data-testid", f"task-row-{BUSY[0]}")

                # One task's charts: click its row.
                page.get_by_test_id(f"task-row-{BUSY[1]}").click()
                expect(page.get_by_test_id("chart-scope")).to_contain_text(f"task {BUSY[1]}")
                expect(page.get_by_test_id(f"task-row-{BUSY[1]}")).to_have_class("selected")

                # Live: more traffic shows up without a reload (the marker survives: same document).
                page.evaluate("window.__sameDocument = true")
                for _ in range(5):
                    assert client.post("/classify/alpha", json={"texts": ["good", "fine"]}).status_code == 200
                expect(cell("alpha", "requests")).to_have_text("9", timeout=15_000)
                expect(cell("alpha", "rows")).to_have_text("14")
                assert page.evaluate("window.__sameDocument") is True

                # The last minute: enough samples for a few chart points, then the picture an operator sees.
                page.get_by_test_id("window-1m").click()
                expect(page.get_by_test_id("window-1m")).to_have_class("on")
                time.sleep(7)
                page.wait_for_timeout(1500)
                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                print(f"dashboard screenshot: {shot}")
                traffic.stop()

                # The server going away shows the banner, and the page keeps its last numbers.
                live_server.stop()
                expect(page.get_by_test_id("error-banner")).to_be_visible(timeout=15_000)
                expect(page.get_by_test_id("error-banner")).to_contain_text("Cannot refresh")
                expect(cell("alpha", "requests")).to_have_text("9")
                page.screenshot(path=str(tmp_path / "dashboard-offline.png"))
            finally:
                if traffic is not None:
                    traffic.stop()
                browser.close()
