"""Replicas sharing one store: every registry serves what the store holds after `sync`, whoever changed it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading

import pytest
import torch

from lpt_serve.errors import TaskNotFound
from lpt_serve.model.engine import classify_rows, encode_texts
from lpt_serve.serving import registry as registry_module
from lpt_serve.serving import store as store_module
from lpt_serve.serving.registry import Registry, read_index
from lpt_serve.serving.service import OpenedStore, Service, ServiceConfig, open_store
from lpt_serve.serving.store import AdapterStore
from tests.helpers import adapter_files, make_adapter


def two_task_store(backbone, tmp_path) -> AdapterStore:
    """A store at tmp_path/store holding tasks a and b, v1 each."""
    store = AdapterStore(tmp_path / "store")
    for i, task in enumerate(["a", "b"]):
        store.commit_dir(task, make_adapter(backbone, task, seed=i).save(tmp_path / f"seed-{task}"))
    return store


@pytest.fixture
def replicas(tiny_backbone, tmp_path):
    """Two registries over one store root, each with its own AdapterStore object, as two processes would have."""
    root = two_task_store(tiny_backbone, tmp_path).root
    pair = []
    for _ in range(2):
        registry = Registry(tiny_backbone, AdapterStore(root))
        registry.load_all()
        pair.append(registry)
    return pair


def probabilities(registry: Registry, task: str) -> torch.Tensor:
    served = registry.get(task)
    encoded = encode_texts(registry.backbone, ["a fine day"], served.adapter.config.template)
    return classify_rows(registry.backbone, [served.adapter], encoded)[0]


def upload(registry: Registry, backbone, task: str, seed: int, tmp_path) -> None:
    config, weights = adapter_files(make_adapter(backbone, task, seed=seed), tmp_path / f"up-{task}-{seed}")
    registry.upload(task, config, weights)


def test_every_change_bumps_the_generation(replicas, tiny_backbone, tmp_path):
    a, _ = replicas
    before = a.store.generation()
    upload(a, tiny_backbone, "a", 10, tmp_path)
    a.rollback("a")
    a.retire("b")
    assert a.store.generation() == before + 3


def test_the_replica_making_a_change_is_at_the_new_generation_at_once(replicas, tiny_backbone, tmp_path):
    """/readyz reports `registry.generation`: the replica that made a change must not look behind until it syncs."""
    a, b = replicas
    upload(a, tiny_backbone, "a", 10, tmp_path)
    assert a.generation == a.store.generation()
    upload(b, tiny_backbone, "b", 11, tmp_path)  # b catches up with a's change on the way
    assert b.generation == b.store.generation() and b.entry("a").version == 2
    a.rollback("a")  # and a takes b's upload with its own rollback
    assert a.generation == a.store.generation() and a.entry("b").version == 2
    a.retire("a")
    assert a.generation == a.store.generation()
    assert a.sync() == []


def test_an_upload_through_one_replica_is_served_by_the_other(replicas, tiny_backbone, tmp_path):
    a, b = replicas
    old = probabilities(b, "a")
    upload(a, tiny_backbone, "a", 10, tmp_path)
    assert b.entry("a").version == 1  # not yet: nothing tells b until it syncs
    assert b.sync() == ["a"]
    assert b.entry("a").version == 2
    assert torch.allclose(probabilities(b, "a"), probabilities(a, "a"))
    assert not torch.allclose(probabilities(b, "a"), old)
    assert b.generation == a.store.generation()


def test_a_task_in_memory_has_its_new_version_loaded_before_the_switch(replicas, tiny_backbone, tmp_path):
    a, b = replicas
    b.get("a")  # hot on b
    upload(a, tiny_backbone, "a", 10, tmp_path)
    b.sync()
    assert b.loaded("a") is not None and b.loaded("a").version == 2  # no cold load for b's next request
    assert b.loaded("b") is None  # a task nobody asked b for stays on disk


def test_rollback_and_retire_through_one_replica_reach_the_other(replicas, tiny_backbone, tmp_path):
    a, b = replicas
    upload(a, tiny_backbone, "a", 10, tmp_path)
    b.sync()
    a.rollback("a")
    a.retire("b")
    assert sorted(b.sync()) == ["a", "b"]
    assert b.entry("a").version == 1
    with pytest.raises(TaskNotFound):
        b.get("b")
    # b's own admin calls now agree with its classify: the task is gone everywhere.
    with pytest.raises(TaskNotFound):
        b.retire("b")


def test_a_new_task_written_by_another_process_is_served(replicas, tiny_backbone, tmp_path):
    _, b = replicas
    outside = AdapterStore(b.store.root)  # `lpt` or a script, not a server
    outside.commit_dir("c", make_adapter(tiny_backbone, "c", seed=3).save(tmp_path / "c"))
    assert b.sync() == ["c"]
    assert b.get("c").version == 1


def test_sync_reads_nothing_when_the_generation_did_not_move(replicas, monkeypatch):
    _, b = replicas
    b.sync()
    reads = []
    monkeypatch.setattr(b.store, "state_stamp", lambda task: reads.append(task))
    monkeypatch.setattr(b.store, "record", lambda task: reads.append(task))
    assert b.sync() == []
    assert reads == []


def test_only_changed_tasks_are_read_and_no_task_is_stat_ed(replicas, tiny_backbone, tmp_path, monkeypatch):
    a, b = replicas
    upload(a, tiny_backbone, "a", 10, tmp_path)
    records, stats = [], []
    real_record, real_stamp = b.store.record, b.store.state_stamp
    monkeypatch.setattr(b.store, "record", lambda task: records.append(task) or real_record(task))
    monkeypatch.setattr(b.store, "state_stamp", lambda task: stats.append(task) or real_stamp(task))
    b.sync()
    assert records == ["a"]
    assert stats == ["a"]  # the journal named "a": no other task was even looked at (NFS attribute caches aside)


def test_a_replica_behind_the_journal_compares_every_task(replicas, tiny_backbone, tmp_path, monkeypatch):
    a, b = replicas
    monkeypatch.setattr(store_module, "CHANGES_KEPT", 2)
    for seed in range(3):
        upload(a, tiny_backbone, "b", 20 + seed, tmp_path)
    upload(a, tiny_backbone, "a", 10, tmp_path)
    assert b.store.changes_since(b.generation)[1] is None  # the journal no longer reaches back to b's generation
    assert sorted(b.sync()) == ["a", "b"]
    assert (b.entry("a").version, b.entry("b").version) == (2, 4)


def test_the_journal_names_each_changed_task_once(replicas, tiny_backbone, tmp_path):
    a, _ = replicas
    start = a.store.generation()
    upload(a, tiny_backbone, "a", 10, tmp_path)
    a.rollback("a")
    a.retire("b")
    assert a.store.changes_since(start) == (start + 3, ["a", "b"])
    assert a.store.changes_since(start + 3) == (start + 3, [])


def test_a_full_sync_catches_a_change_that_did_not_bump_the_generation(replicas, tiny_backbone, tmp_path):
    a, b = replicas
    upload(a, tiny_backbone, "a", 10, tmp_path)
    b.sync()
    # Someone edits state.json by hand (as a backup restore would), without the store's API.
    state = a.store.root / "a" / "state.json"
    state.write_text(json.dumps({"current": 1, "history": [1]}))
    assert b.sync() == []  # the generation did not move
    assert b.sync(full=True) == ["a"]
    assert b.entry("a").version == 1


def test_a_failed_generation_bump_does_not_fail_the_change(replicas, tiny_backbone, tmp_path, monkeypatch):
    a, b = replicas
    real = store_module._write_durably_replace

    def full_disk_for_the_counter(path, data):
        if path.name == store_module.GENERATION_NAME:
            raise OSError(28, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(store_module, "_write_durably_replace", full_disk_for_the_counter)
    upload(a, tiny_backbone, "a", 10, tmp_path)
    assert a.entry("a").version == 2
    assert b.sync(full=True) == ["a"]


def test_a_version_that_vanished_before_its_load_is_reconciled_not_failed(replicas, tiny_backbone, tmp_path):
    a, b = replicas
    a.store.keep_versions = 1  # a's uploads prune every older version at once
    upload(a, tiny_backbone, "b", 20, tmp_path)
    assert not (a.store.root / "b" / "v1").exists()
    assert b.entry("b").version == 1  # b indexed v1 and never loaded it
    served = b.get("b")  # the load finds v1 gone, reconciles "b", and loads what the store serves now
    assert served.version == 2
    assert torch.allclose(probabilities(b, "b"), probabilities(a, "b"))
    assert b.load_errors == {}  # nothing remembered against the task


def test_a_task_retired_before_its_load_answers_not_found(replicas):
    a, b = replicas
    a.retire("b")
    with pytest.raises(TaskNotFound):  # not TaskFailed: the version left, it did not break
        b.get("b")
    assert "b" not in b.names()


async def test_a_store_opened_while_the_backbone_loaded_catches_up_on_what_changed_since(tiny_backbone, tmp_path):
    """`lpt-serve` reads the store's index on a thread of its own, before the service starts: a change made between
    that read and the start must reach the started service at its first sync, not be lost."""
    config = ServiceConfig(store=tmp_path / "store", warmup=False, sync_interval_s=0, seed_from=None)
    opened = open_store(config)
    assert opened.index.result(timeout=30).entries == {}
    # Another process commits after the index was read.
    AdapterStore(tmp_path / "store").commit_dir("late", make_adapter(tiny_backbone, "late").save(tmp_path / "late"))
    service = Service(config, backbone=tiny_backbone, opened=opened)
    await service.start()
    try:
        assert service.registry.names() == []  # the index as it was read
        assert service.registry.sync() == ["late"]
        assert (await service.resolve("late")).version == 1
    finally:
        await service.stop()


async def test_tasks_are_served_while_the_index_is_read_and_the_index_never_turns_one_back(tiny_backbone, tmp_path):
    """A start does not wait for the store's index: requests meanwhile look their task up alone; listings wait for
    the index; a task looked up (or changed) meanwhile is read again after the index, whatever the index saw."""
    writer = two_task_store(tiny_backbone, tmp_path)
    root = writer.root
    pending: concurrent.futures.Future = concurrent.futures.Future()
    registry = Registry(tiny_backbone, AdapterStore(root))
    assert registry.load_all(pending) == {}
    assert registry.indexing and registry.names() == []
    assert (await registry.resolve("a")).version == 1  # looked up in the store alone
    assert registry.entry("b").version == 1
    with pytest.raises(TaskNotFound):
        await registry.resolve("nope")
    assert registry.sync(full=True) == []  # nothing to compare with yet: the index catches up when it comes
    listing = asyncio.ensure_future(registry.indexed())
    await asyncio.sleep(0.01)
    assert not listing.done()
    index = read_index(writer)  # read before the change below, as a slow read of 10,000 tasks would be
    upload(registry_for(writer, tiny_backbone), tiny_backbone, "a", seed=7, tmp_path=tmp_path)  # another replica
    pending.set_result(index)  # names a v1
    await listing
    assert not registry.indexing and registry.names() == ["a", "b"]
    assert registry.entry("a").version == 2 and registry.get("a").version == 2
    assert registry.entry("b").version == 1 and registry.generation == index.generation
    assert registry.sync() == []  # a was read again already; the generation catches up with nothing to change
    assert registry.generation == writer.generation()


def registry_for(store: AdapterStore, backbone) -> Registry:
    registry = Registry(backbone, store)
    registry.load_all()
    return registry


async def test_a_service_is_ready_before_a_slow_index_and_counts_the_tasks_once_it_is_in(tiny_backbone, tmp_path):
    writer = two_task_store(tiny_backbone, tmp_path)
    root = writer.root
    slow_index: concurrent.futures.Future = concurrent.futures.Future()  # a store too large to read in time
    config = ServiceConfig(store=root, warmup=False, sync_interval_s=0, seed_from=None)
    service = Service(config, backbone=tiny_backbone, opened=OpenedStore(AdapterStore(root), slow_index))
    await service.start()
    try:
        assert service.ready and service.registry.indexing
        served = await service.resolve("b")
        [prediction] = await service.classify([(served, "a fine day")])
        assert prediction.task == "b"
        assert service.metrics.registry.get_sample_value("lpt_tasks_served") == 0  # not counted before the index is in
        slow_index.set_result(read_index(writer))
        await service.registry.indexed()
        await asyncio.sleep(0.01)
        assert not service.registry.indexing and service.metrics.registry.get_sample_value("lpt_tasks_served") == 2
    finally:
        await service.stop()


def test_a_pinned_task_gone_while_the_index_was_read_does_not_hang_the_install(tiny_backbone, tmp_path):
    """The index names a pinned task's version that another replica removed meanwhile: loading it reconciles the
    task (under the registry's change lock), which must not wait on the install that asked for the load."""
    writer = two_task_store(tiny_backbone, tmp_path)
    root = writer.root
    pending: concurrent.futures.Future = concurrent.futures.Future()
    registry = Registry(tiny_backbone, AdapterStore(root), pinned=["a"])
    registry.load_all(pending)
    index = read_index(writer)
    writer.retire("a")
    installing = threading.Thread(target=pending.set_result, args=(index,), daemon=True)
    installing.start()
    installing.join(timeout=30)
    assert not installing.is_alive(), "the install hung"
    assert registry.names() == ["b"] and not registry.indexing


async def test_an_index_that_cannot_be_read_leaves_listings_answering_and_sync_reading_every_task(
        tiny_backbone, tmp_path, monkeypatch):
    writer = two_task_store(tiny_backbone, tmp_path)
    root = writer.root
    pending: concurrent.futures.Future = concurrent.futures.Future()
    registry = Registry(tiny_backbone, AdapterStore(root))
    registry.load_all(pending)
    assert (await registry.resolve("a")).task == "a"

    def unreadable(store):
        raise OSError("the disk is gone")

    monkeypatch.setattr(registry_module, "read_index", unreadable)
    pending.set_exception(OSError("the disk is gone"))
    await asyncio.wait_for(registry.indexed(), timeout=10)  # listings answer with what is known
    assert registry.names() == ["a"] and not registry.indexing
    monkeypatch.undo()
    assert sorted(registry.sync()) == ["b"]  # the watcher's next sync reads every task
    assert registry.names() == ["a", "b"]
