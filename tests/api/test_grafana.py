"""The Grafana dashboard in docker/grafana: every PromQL expression names metrics (and labels) that the server's
`/metrics` really exposes, and docker/compose.yaml provisions it with its datasource."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from lpt_serve.api.app import create_app
from lpt_serve.api.settings import Settings
from tests.helpers import serving

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "lpt-serve.json"
COMPOSE = DOCKER / "compose.yaml"
METRIC = re.compile(r"\blpt_[a-z_]+\b")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER = re.compile(r"\{([^}]*)\}")
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def expressions(dashboard: dict) -> list[str]:
    out = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    out += [v["definition"] for v in dashboard.get("templating", {}).get("list", []) if v.get("definition")]
    return out


async def exposed(tiny_backbone, store_root) -> tuple[dict[str, set[str]], str]:
    """Series names /metrics declares (each family's sample names, from its type) -> their label names."""
    app = create_app(Settings(store=store_root, max_wait_ms=2), backbone=tiny_backbone)
    async with serving(app) as client:
        assert (await client.post("/classify/alpha", json={"text": "good"})).status_code == 200
        text = (await client.get("/metrics")).text
        # Families with no child yet (errors, dropped rows) list no sample: their label names come from the
        # collectors themselves.
        declared = {c._name: set(c._labelnames) for c in app.state.service.metrics.__dict__.values()
                    if hasattr(c, "_labelnames")}
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        labels = declared.get(family.name, set()) | {k for s in family.samples for k in s.labels}
        for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names, text


def test_dashboard_json_is_a_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uids = {d["uid"] for d in datasource["datasources"]}
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] in uids, f"{p['title']}: datasource {t['datasource']} is not provisioned"


async def test_every_expression_names_metrics_and_labels_that_metrics_exposes(tiny_backbone, store_root):
    names, text = await exposed(tiny_backbone, store_root)
    assert "lpt_rows_total" in names and "lpt_request_duration_seconds_bucket" in names, text[:500]
    exprs = expressions(json.loads(DASHBOARD.read_text()))
    used = set()
    for expr in exprs:
        metrics = set(METRIC.findall(expr))
        assert metrics, f"no lpt_ metric in {expr!r}"
        unknown = metrics - set(names)
        assert not unknown, f"{expr!r} names {sorted(unknown)}, which /metrics does not expose"
        used |= metrics
        labels = set().union(*(names[m] for m in metrics))
        for group in GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in labels, f"{expr!r} groups by {label!r}, a label none of {sorted(metrics)} has"
        for matchers in MATCHER.findall(expr):
            for matcher in filter(None, (m.strip() for m in matchers.split(","))):
                label = re.split(r"[=!~]", matcher, maxsplit=1)[0].strip()
                assert label in labels, f"{expr!r} matches on {label!r}, a label none of {sorted(metrics)} has"
    # The metrics are all on the dashboard.
    for family in ["lpt_requests_total", "lpt_request_duration_seconds_bucket", "lpt_batch_size_bucket",
                   "lpt_batch_tasks_bucket", "lpt_queue_depth", "lpt_forward_duration_seconds_bucket",
                   "lpt_errors_total", "lpt_rows_total", "lpt_rows_dropped_total"]:
        assert family in used, f"{family} is on no panel"


def test_compose_provisions_grafana_beside_prometheus():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert "prometheus" in services and "grafana" in services
    grafana = services["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    provisioning = COMPOSE.parent / mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert [d["url"] for d in datasources] == ["http://prometheus:9090"]  # the compose service, by name
    [provider] = yaml.safe_load((provisioning / "dashboards" / "lpt-serve.yaml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert dashboards_dir in mounts, f"the provider reads {dashboards_dir}, which compose does not mount"
    mounted = COMPOSE.parent / mounts[dashboards_dir]
    assert (mounted / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    # Prometheus scrapes the server service, so the dashboard has data.
    prometheus = yaml.safe_load((COMPOSE.parent / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert any(t.split(":")[0] in services for t in targets), targets
