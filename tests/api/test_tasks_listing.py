"""`GET /tasks` at scale: pages with a cursor, filters (prefix, tier, label), the compact default body and the full
view; and the client, which pages through the full view."""

from __future__ import annotations

import httpx
import pytest

from lpt_client import AsyncLptClient
from lpt_serve.api.app import create_app
from lpt_serve.api.settings import Settings
from lpt_serve.serving.store import AdapterStore
from tests.helpers import make_adapter, serving

COMPACT = {"task", "version", "labels", "location", "quarantined", "quarantine_reason"}


@pytest.fixture
def many_root(tiny_backbone, tmp_path):
    store = AdapterStore(tmp_path / "store")
    for i in range(12):
        task = f"{'news' if i % 3 == 0 else 'film'}-{i:02d}"
        labels = ["sport", "world"] if task.startswith("news") else ["neg", "pos"]
        store.commit_dir(task, make_adapter(tiny_backbone, task, seed=i, labels=labels).save(tmp_path / task))
    return store.root


async def names_of(client, **params) -> tuple[list[str], str | None]:
    r = await client.get("/tasks", params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    return [t["task"] for t in body["tasks"]], body["next"]


async def test_pages_follow_the_cursor_to_the_end(tiny_backbone, many_root):
    app = create_app(Settings(store=many_root), backbone=tiny_backbone)
    async with serving(app) as client:
        every, last = await names_of(client, limit=1000)
        assert len(every) == 12 and every == sorted(every) and last is None
        pages, cursor = [], None
        while True:
            page, cursor = await names_of(client, limit=5, **({"cursor": cursor} if cursor else {}))
            pages.append(page)
            if cursor is None:
                break
        assert [len(p) for p in pages] == [5, 5, 2]
        assert [n for p in pages for n in p] == every
        exactly, after = await names_of(client, limit=12)
        assert len(exactly) == 12 and after is None  # a full last page says it is the last
        assert (await client.get("/tasks", params={"limit": 0})).status_code == 422
        assert (await client.get("/tasks", params={"tier": "tape"})).status_code == 422


async def test_filters_and_the_compact_body(tiny_backbone, many_root):
    app = create_app(Settings(store=many_root, max_wait_ms=2), backbone=tiny_backbone)
    async with serving(app) as client:
        news, _ = await names_of(client, prefix="news")
        assert news == ["news-00", "news-03", "news-06", "news-09"]
        assert (await names_of(client, label="sport"))[0] == news
        assert (await names_of(client, label="pos", prefix="film-1"))[0] == ["film-10", "film-11"]
        assert (await names_of(client, tier="cpu"))[0] == []
        assert (await client.post("/classify/film-04", json={"text": "good"})).status_code == 200
        assert (await names_of(client, tier="cpu"))[0] == ["film-04"]
        assert len((await names_of(client, tier="disk"))[0]) == 11
        body = (await client.get("/tasks", params={"prefix": "film-04"})).json()
        assert body == {"tasks": [{"task": "film-04", "version": 1, "labels": ["neg", "pos"], "location": "cpu",
                                   "quarantined": False, "quarantine_reason": None}], "next": None}
        full = (await client.get("/tasks", params={"prefix": "news-00", "view": "full"})).json()["tasks"][0]
        assert set(full) > COMPACT and full["location"] == "disk" and full["parameters"] > 0
        one = (await client.get("/tasks/news-00")).json()
        assert one["location"] == "disk" and one["parameters"] == full["parameters"]  # described, not loaded
        both = (await client.get("/tasks", params={"prefix": "film-0", "view": "full"})).json()["tasks"]
        sizes = {(t["location"], t["parameters"], t["bytes"]) for t in both if t["task"] in ("film-01", "film-04")}
        assert len(sizes) == 2 and len({(p, b) for _, p, b in sizes}) == 1  # the estimate is the loaded size
        assert (await names_of(client, tier="cpu"))[0] == ["film-04"]


async def test_the_client_pages_through_every_task(tiny_backbone, many_root, monkeypatch):
    import lpt_client.client as client_module

    monkeypatch.setattr(client_module, "TASKS_PAGE", 5)
    app = create_app(Settings(store=many_root), backbone=tiny_backbone)
    async with serving(app), AsyncLptClient("http://lpt", transport=httpx.ASGITransport(app)) as client:
        tasks = await client.tasks()
        assert len(tasks) == 12 and tasks[0].task == "film-01" and tasks[0].generator == "npg"
        assert {t.location for t in tasks} == {"disk"}
