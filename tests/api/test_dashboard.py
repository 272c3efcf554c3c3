"""The ops page: `/dashboard/data` in-process against the registry `/metrics` exposes, and `/dashboard` in Chromium."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lpt_serve.api.app import create_app, dashboard_for
from lpt_serve.api.dashboard import histogram_quantile
from lpt_serve.api.settings import Settings
from lpt_serve.serving.metrics import LATENCY_BUCKETS
from tests.helpers import ThreadedServer, serving

CHROMIUM = os.environ.get("LPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
MAX_MS = LATENCY_BUCKETS[-1] * 1000  # the highest finite bucket bound: no estimate goes past it


def make_app(tiny_backbone, store_root, **overrides):
    return create_app(Settings(store=store_root, **{"max_wait_ms": 2, **overrides}), backbone=tiny_backbone)


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
    g = data["global"]
    assert g["requests"] == 10 and g["rows"] == 21 and g["errors"] == 0
    assert g["tasks_served"] == 2 and g["queue_depth"] == 0 and g["dropped_rows"] == {}
    assert_quantiles_sane(g["forward_ms"])
    assert g["forward_passes"] == len(data["batches"]) == 9  # one pass per request here: they came one by one
    assert 1 <= g["mean_batch_size"] <= 5
    assert data["served"] == [{"task": "alpha", "version": 1, "location": "cpu"},
                              {"task": "beta", "version": 1, "location": "cpu"}]

    batches = data["batches"]
    assert 1 <= len(batches) <= 20
    assert batches[0]["tasks"] == {"alpha": 1, "beta": 2} and batches[0]["rows"] == 3  # newest first: the mixed one
    assert sum(b["rows"] for b in batches) == 21
    assert all(b["ms"] >= 0 and sum(b["tasks"].values()) == b["rows"] for b in batches)

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


async def test_throughput_is_the_rows_delta_over_a_sliding_window(tiny_backbone, store_root):
    app = make_app(tiny_backbone, store_root)
    async with serving(app) as client:
        now = [100.0]
        dashboard = dashboard_for(app.state.service, window_s=10.0, clock=lambda: now[0])
        first = dashboard.data()
        assert first["window_s"] is None and first["global"]["rows_per_s"] is None  # one sample: no rate yet
        assert (await client.post("/classify/alpha", json={"texts": ["a", "b", "c", "d", "e", "f"]})).status_code == 200

        now[0] = 102.0
        d = dashboard.data()
        assert d["window_s"] == 2.0
        assert d["global"]["rows_per_s"] == 3.0 and by_task(d)["alpha"]["rows_per_s"] == 3.0
        assert by_task(d)["beta"]["rows_per_s"] == 0.0
        assert d["global"]["rows_per_s_avg"] == 3.0  # six rows in the two seconds since the dashboard started

        now[0] = 104.0
        d = dashboard.data()
        assert d["window_s"] == 4.0 and d["global"]["rows_per_s"] == 1.5  # quiet for 2 s: the window still holds 6

        now[0] = 120.0  # the window slid past the rows
        d = dashboard.data()
        assert d["global"]["rows_per_s"] == 0.0 and d["global"]["rows_per_s_avg"] == 0.3
        assert (await client.post("/classify/beta", json={"texts": ["a", "b"]})).status_code == 200
        now[0] = 121.0
        d = dashboard.data()
        assert d["window_s"] == 17.0  # from the newest sample at or before the window's start (t=104)
        assert by_task(d)["beta"]["rows_per_s"] == round(2 / 17, 3)
        assert by_task(d)["alpha"]["rows_per_s"] == 0.0
        assert len(dashboard.ring) <= 3


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


@pytest.fixture
def live_server(tiny_backbone, store_root):
    server = ThreadedServer(make_app(tiny_backbone, store_root, max_wait_ms=20))
    yield server
    server.stop()


@pytest.mark.browser
def test_dashboard_in_chromium_is_live(chromium, live_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

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
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(live_server.url + "/dashboard")

                def cell(task: str, col: str):
                    return page.locator(f'[data-testid="task-row-{task}"] [data-col="{col}"]')

                expect(cell("alpha", "requests")).to_have_text("4", timeout=15_000)
                expect(cell("beta", "requests")).to_have_text("3")
                expect(cell("alpha", "rows")).to_have_text("4")
                expect(cell("beta", "rows")).to_have_text("5")
                expect(cell("alpha", "errors")).to_have_text("0")
                expect(cell("alpha", "version")).to_have_text("v1")
                expect(page.get_by_test_id("queue-depth")).to_have_text("0")
                expect(page.get_by_test_id("tasks-served")).to_have_text("2")
                expect(page.get_by_test_id("error-banner")).to_be_hidden()
                mixed = page.locator('[data-testid="batch-list"] [data-testid="batch"][data-tasks="alpha,beta"]')
                expect(mixed.first).to_be_visible()
                expect(mixed.first.locator("[data-task]")).to_have_count(2)  # one coloured bar per task
                for testid in ["throughput", "mean-batch-size", "forward-p50"]:
                    expect(page.get_by_test_id(testid)).not_to_have_text("–")
                expect(page.get_by_test_id("last-updated")).to_contain_text("last updated")

                # Live: more traffic shows up without a reload (the marker survives: same document).
                page.evaluate("window.__sameDocument = true")
                for _ in range(5):
                    assert client.post("/classify/alpha", json={"texts": ["good", "fine"]}).status_code == 200
                expect(cell("alpha", "requests")).to_have_text("9", timeout=15_000)
                expect(cell("alpha", "rows")).to_have_text("14")
                assert page.evaluate("window.__sameDocument") is True
                page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

                # The server going away shows the banner, and the page keeps its last numbers.
                live_server.stop()
                expect(page.get_by_test_id("error-banner")).to_be_visible(timeout=15_000)
                expect(page.get_by_test_id("error-banner")).to_contain_text("Cannot refresh")
                expect(cell("alpha", "requests")).to_have_text("9")
                page.screenshot(path=str(tmp_path / "dashboard-offline.png"))
            finally:
                browser.close()
