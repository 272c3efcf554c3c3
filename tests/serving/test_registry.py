"""Registry placement: LRU over a device byte budget with pinning (the bookkeeping, exercised on the CPU)."""

from __future__ import annotations

from lpt_serve.api.routes.tasks import task_info
from lpt_serve.serving.registry import Registry
from lpt_serve.serving.store import AdapterStore
from tests.helpers import make_adapter


def make_registry(tiny_backbone, tmp_path, budget_tasks: float, pinned=()) -> Registry:
    store = AdapterStore(tmp_path / "store")
    for i, task in enumerate(["a", "b", "c", "d"]):
        store.commit_dir(task, make_adapter(tiny_backbone, task, seed=i).save(tmp_path / task))
    registry = Registry(tiny_backbone, store, pinned=pinned)
    registry.load_all()
    one = sum(registry.get(task).nbytes for task in "abcd") // 4  # all four in host memory, as a small store is
    registry.device_budget_bytes = int(one * budget_tasks)
    # Pretend the device is an accelerator: moves are CPU->CPU no-ops, the LRU bookkeeping is the real one.
    registry.offload = True
    return registry


def where(registry: Registry) -> dict[str, str]:
    return {s.task: registry.location(s) for s in registry.served()}


def test_least_recently_used_leave_the_device(tiny_backbone, tmp_path):
    registry = make_registry(tiny_backbone, tmp_path, budget_tasks=2.5)
    adapter = {t: registry.get(t).adapter for t in "abcd"}
    assert set(where(registry).values()) == {"cpu"}
    registry.acquire([adapter["a"], adapter["b"]])
    assert where(registry) == {"a": "gpu", "b": "gpu", "c": "cpu", "d": "cpu"}
    registry.acquire([adapter["a"]])  # a is now the most recent
    registry.acquire([adapter["c"]])  # over budget: b, the least recent, leaves
    assert where(registry) == {"a": "gpu", "b": "cpu", "c": "gpu", "d": "cpu"}


def test_a_batch_keeps_all_its_adapters_even_over_budget(tiny_backbone, tmp_path):
    registry = make_registry(tiny_backbone, tmp_path, budget_tasks=1.5)
    registry.acquire([registry.get(t).adapter for t in "abc"])
    assert where(registry) == {"a": "gpu", "b": "gpu", "c": "gpu", "d": "cpu"}
    registry.acquire([registry.get("d").adapter])
    assert where(registry) == {"a": "cpu", "b": "cpu", "c": "cpu", "d": "gpu"}


def test_pinned_tasks_never_leave(tiny_backbone, tmp_path):
    registry = make_registry(tiny_backbone, tmp_path, budget_tasks=1.5, pinned=["a"])
    for task in "abcd":
        registry.acquire([registry.get(task).adapter])
    assert where(registry)["a"] == "gpu" and where(registry)["d"] == "gpu"
    assert where(registry)["b"] == "cpu" and where(registry)["c"] == "cpu"
    assert task_info(registry, registry.get("a")).pinned is True


def test_replaced_versions_free_their_device_slot(tiny_backbone, tmp_path):
    registry = make_registry(tiny_backbone, tmp_path, budget_tasks=10)
    old = registry.get("a").adapter
    registry.acquire([old])
    folder = make_adapter(tiny_backbone, "a", seed=50).save(tmp_path / "a2")
    registry.upload("a", (folder / "adapter_config.json").read_bytes(),
                    (folder / "adapter_model.safetensors").read_bytes())
    registry.acquire([registry.get("b").adapter])
    assert id(old) not in registry._on_device
    assert registry.get("a").version == 2 and where(registry)["a"] == "cpu"
