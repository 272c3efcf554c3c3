"""Tiers: the store's index at start, host memory (LRU over a byte budget, with pinning) on demand, and the
accelerator (tests/serving/test_registry.py). Loads are counted by wrapping the registry's `load_adapter`."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import lpt_serve.serving.registry as registry_module
from lpt_serve.api.app import create_app
from lpt_serve.api.settings import Settings
from lpt_serve.errors import TaskFailed
from lpt_serve.format import WEIGHTS_NAME
from lpt_serve.serving.registry import Registry
from lpt_serve.serving.store import AdapterStore
from tests.helpers import make_adapter, serving

NAMES = ["a", "b", "c", "d", "e"]


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Every adapter directory the registry reads weights from, in order."""
    seen: list[str] = []
    real = registry_module.load_adapter

    def counting(directory, backbone):
        seen.append(directory.parent.name)
        return real(directory, backbone)

    monkeypatch.setattr(registry_module, "load_adapter", counting)
    return seen


@pytest.fixture
def store(tiny_backbone, tmp_path) -> AdapterStore:
    store = AdapterStore(tmp_path / "store")
    for i, task in enumerate(NAMES):
        store.commit_dir(task, make_adapter(tiny_backbone, task, seed=i).save(tmp_path / "src" / task))
    return store


def one_adapter_bytes(tiny_backbone, tmp_path) -> int:
    registry = Registry(tiny_backbone, AdapterStore(tmp_path / "probe"))
    return registry.estimated_size(make_adapter(tiny_backbone, "x").config)[1]


def tiers(registry: Registry) -> dict[str, str]:
    return {e.task: registry.location(e) for e in registry.entries()}


def test_start_up_reads_the_index_not_the_weights(tiny_backbone, store, loads):
    registry = Registry(tiny_backbone, store, pinned=["c"])
    registry.load_all()
    assert loads == ["c"]  # the pinned task only
    assert registry.names() == NAMES
    assert tiers(registry) == {"a": "disk", "b": "disk", "c": "cpu", "d": "disk", "e": "disk"}
    assert registry.labels(registry.entry("a")) == ("neg", "pos")  # from the config file: still no weights read
    assert loads == ["c"]
    assert registry.get("a").version == 1 and loads == ["c", "a"]
    assert registry.location(registry.entry("a")) == "cpu"


async def test_a_cold_task_loads_once_however_many_ask(tiny_backbone, store, loads):
    registry = Registry(tiny_backbone, store)
    registry.load_all()
    served = await asyncio.gather(*(registry.resolve(t) for t in ["a"] * 20 + ["b"] * 5))
    assert sorted(loads) == ["a", "b"]
    assert len({id(s.adapter) for s in served[:20]}) == 1 and served[0].task == "a"
    assert len({id(s.adapter) for s in served[20:]}) == 1 and served[20].task == "b"
    assert (await registry.resolve("a")) is served[0] and sorted(loads) == ["a", "b"]


async def test_loads_for_requests_run_one_at_a_time_on_one_thread(tiny_backbone, store, monkeypatch):
    """Five cold tasks asked at once: five loads, one after another on the registry's loader thread, never two at
    a time (concurrent loads hold the GIL against the inference threads between their native calls)."""
    real = registry_module.load_adapter
    lock = threading.Lock()
    state = {"running": 0, "most": 0, "threads": set()}

    def watched(directory, backbone):
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
            state["threads"].add(threading.current_thread().name)
        time.sleep(0.05)  # long enough for a second load to overlap, were they run in parallel
        try:
            return real(directory, backbone)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(registry_module, "load_adapter", watched)
    registry = Registry(tiny_backbone, store)
    registry.load_all()
    served = await asyncio.gather(*(registry.resolve(t) for t in NAMES))
    assert [s.task for s in served] == NAMES
    assert state["most"] == 1 and len(state["threads"]) == 1 and next(iter(state["threads"])).startswith("lpt-load")


def test_host_memory_keeps_the_tasks_asked_for_most_within_its_budget_and_pinned_tasks_stay(
        tiny_backbone, store, tmp_path, loads):
    one = one_adapter_bytes(tiny_backbone, tmp_path)
    kept: list[bool] = []
    registry = Registry(tiny_backbone, store, host_budget_bytes=int(one * 2.5), pinned=["a"], on_load=kept.append)
    registry.load_all()
    assert kept == [True]  # the pinned task
    kept.clear()
    held = registry.get("b").adapter
    assert kept == [True]  # there was room
    # c would push b out, and was not asked for more often than b: it answers its request and is not kept.
    assert registry.get("c").task == "c" and kept == [True, False]
    assert tiers(registry) == {"a": "cpu", "b": "cpu", "c": "disk", "d": "disk", "e": "disk"}
    # Asked for again, c now outweighs b, the least recently used unpinned task, which leaves; a is pinned.
    registry.get("c")
    assert kept == [True, False, True]
    assert tiers(registry) == {"a": "cpu", "b": "disk", "c": "cpu", "d": "disk", "e": "disk"}
    # A row still holding b's evicted adapter keeps a working module; asking again loads b anew.
    assert held.labels == ["neg", "pos"] and next(held.parameters()).numel() > 0
    again = registry.get("b")
    assert again.adapter is not held and again.version == 1
    assert loads == ["a", "b", "c", "c", "b"]
    # b (asked twice) does not outweigh c (asked twice): c stays.
    assert kept[-1] is False and tiers(registry)["c"] == "cpu" and tiers(registry)["a"] == "cpu"
    for _ in range(2):
        registry.get("d")
    assert registry.location(registry.entry("d")) == "disk"  # asked for as often as c, not more
    registry.get("d")
    assert tiers(registry) == {"a": "cpu", "b": "disk", "c": "disk", "d": "cpu", "e": "disk"}


def test_under_skewed_traffic_host_memory_holds_the_popular_tasks(tiny_backbone, tmp_path):
    """A few tasks asked for often among many asked for once each: with room for three, plain LRU would let every
    one-off task push a popular one out (and load it again); the popular ones stay, the one-off ones pass."""
    store = AdapterStore(tmp_path / "store")
    names = [f"t{i}" for i in range(30)]
    for i, task in enumerate(names):
        store.commit_dir(task, make_adapter(tiny_backbone, task, seed=i).save(tmp_path / "src" / task))
    one = one_adapter_bytes(tiny_backbone, tmp_path)
    kept: list[bool] = []
    registry = Registry(tiny_backbone, store, host_budget_bytes=int(one * 3.5), on_load=kept.append)
    registry.load_all()
    popular, rare = names[:3], names[3:]
    for task in popular * 3:
        registry.get(task)
    for i, task in enumerate(rare):
        registry.get(task)
        registry.get(popular[i % 3])
    assert {t for t, where in tiers(registry).items() if where == "cpu"} == set(popular)
    assert len(kept) == 3 + len(rare) and kept[3:] == [False] * len(rare)  # the popular tasks loaded once each


def test_quarantine_survives_eviction_and_reload(tiny_backbone, store, tmp_path):
    one = one_adapter_bytes(tiny_backbone, tmp_path)
    registry = Registry(tiny_backbone, store, host_budget_bytes=int(one * 1.5), quarantine_after=2)
    registry.load_all()
    first = registry.get("a").adapter
    assert [registry.record_failure(first, "boom") for _ in range(2)] == [False, True]
    registry.get("b")
    registry.get("b")  # asked for more often than a now: a leaves host memory
    assert registry.location(registry.entry("a")) == "disk"
    reloaded = registry.get("a").adapter
    assert reloaded is not first
    assert registry.quarantine_reason(reloaded) == "it failed 2 forward passes in a row (last: boom)"
    assert registry.quarantine_reason_of("a", 1) is not None and registry.quarantine_reason_of("b", 1) is None


def test_a_stored_adapter_that_no_longer_loads_fails_alone(tiny_backbone, store, loads):
    (store.get("b").path() / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    registry = Registry(tiny_backbone, store)
    assert registry.load_all() == {}  # nothing was loaded, so nothing failed yet
    with pytest.raises(TaskFailed, match="task 'b' v1 is stored but no longer loads"):
        registry.get("b")
    with pytest.raises(TaskFailed):
        registry.get("b")  # remembered: the weights are not read again
    assert loads == ["b"] and "b" in registry.load_errors
    assert registry.get("a").task == "a"


async def test_http_a_broken_task_answers_its_own_error_while_others_serve(tiny_backbone, store, loads):
    (store.get("b").path() / WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    app = create_app(Settings(store=store.root, max_wait_ms=2), backbone=tiny_backbone)
    async with serving(app) as client:
        assert loads == []  # ready before any weights were read
        responses = await asyncio.gather(*(client.post(f"/classify/{t}", json={"text": "good"})
                                           for t in ["a", "b", "c", "b", "a"]))
        assert [r.status_code for r in responses] == [200, 500, 200, 500, 200]
        assert responses[1].json()["error"]["type"] == "task_failed"
        assert "no longer loads" in responses[1].json()["error"]["message"]
        assert sorted(loads) == ["a", "b", "c"]  # each once, b's failure included
        mixed = await client.post("/classify", json={"items": [{"task": "a", "text": "x"},
                                                              {"task": "b", "text": "y"}]})
        assert mixed.status_code == 500
        listed = {t["task"]: t["location"] for t in (await client.get("/tasks")).json()["tasks"]}
        assert listed == {"a": "cpu", "b": "disk", "c": "cpu", "d": "disk", "e": "disk"}


async def test_http_rows_of_an_evicted_task_still_run(tiny_backbone, store, tmp_path):
    one = one_adapter_bytes(tiny_backbone, tmp_path)
    budget_mb = one * 1.5 / 2**20
    app = create_app(Settings(store=store.root, max_wait_ms=50, host_budget_mb=budget_mb), backbone=tiny_backbone)
    async with serving(app) as client:
        # Five tasks at once with room for one: each request's adapter leaves host memory while its row waits.
        responses = await asyncio.gather(*(client.post(f"/classify/{t}", json={"texts": ["good", "bad"]})
                                           for t in NAMES))
        assert [r.status_code for r in responses] == [200] * 5
        assert [r.json()["task"] for r in responses] == NAMES
        service = app.state.service
        assert sum(1 for loc in tiers(service.registry).values() if loc == "cpu") == 1


def test_a_request_for_a_task_in_memory_makes_it_the_most_recently_used_and_counts(tiny_backbone, store, tmp_path):
    one = one_adapter_bytes(tiny_backbone, tmp_path)
    registry = Registry(tiny_backbone, store, host_budget_bytes=int(one * 2.5))
    registry.load_all()
    registry.get("a")
    registry.get("b")  # host memory: a, b (b most recent)
    assert registry.hit("a").task == "a"  # a request answered from memory: a is now the most recent
    assert registry.hit("e") is None  # not in memory: no answer, nothing counted
    for _ in range(3):
        registry.get("c")  # asked for more often than b, the least recently used now: b leaves, not a
    assert tiers(registry) == {"a": "cpu", "b": "disk", "c": "cpu", "d": "disk", "e": "disk"}
    assert registry.loaded("a") is not None and registry.location(registry.entry("a")) == "cpu"


async def test_a_request_that_leaves_during_a_load_does_not_fail_the_others_waiting_on_it(tiny_backbone, store,
                                                                                          monkeypatch):
    real = registry_module.load_adapter

    def slow(directory, backbone):
        time.sleep(0.2)
        return real(directory, backbone)

    monkeypatch.setattr(registry_module, "load_adapter", slow)
    registry = Registry(tiny_backbone, store)
    registry.load_all()
    staying = asyncio.ensure_future(registry.resolve("a"))  # runs the load
    leaving = [asyncio.ensure_future(registry.resolve("a")) for _ in range(2)]  # wait on it
    await asyncio.sleep(0.05)
    leaving[0].cancel()
    assert (await staying).task == "a" and (await leaving[1]).task == "a"
    assert registry.loaded("a") is not None  # the load finished and was kept


async def test_a_load_that_fails_after_reading_settles_its_waiters_and_the_next_request_loads_again(
        tiny_backbone, store, loads):
    """Loads run on the loader thread and nobody awaits that thread's own result: whatever fails after the weights
    are read must still answer the requests waiting on the load, not leave them waiting for ever."""
    registry = Registry(tiny_backbone, store)
    registry.load_all()

    def broken(task, nbytes):
        raise RuntimeError("bookkeeping broke")

    registry._admit = broken  # on the instance alone; deleted below
    outcomes = await asyncio.wait_for(asyncio.gather(*(registry.resolve("a") for _ in range(3)),
                                                     return_exceptions=True), timeout=30)
    assert [type(o) for o in outcomes] == [RuntimeError] * 3 and loads == ["a"]
    del registry._admit
    assert (await asyncio.wait_for(registry.resolve("a"), timeout=30)).task == "a" and loads == ["a", "a"]
