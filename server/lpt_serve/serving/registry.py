"""The served tasks: adapters loaded from the store, hot upload/rollback/retire, and device placement.

Swaps are atomic: a request resolves its task to an adapter object when it is admitted and keeps that
object, so an upload never changes what an in-flight request runs; the new version serves every request
admitted after the swap.

Placement follows vLLM's LoRA manager: every served adapter is in CPU memory; the ones used recently are
also on the accelerator, up to a byte budget (LRU), and pinned tasks never leave it. On a CPU-only server
the two tiers are one. `acquire` is called only from the inference thread, so moving a module between
devices never races a forward pass.

Quarantine: the inference thread reports each pass's failed and fully answered tasks; a served version that
fails `quarantine_after` passes in a row is held out (its requests are refused at admission) until an upload,
a rollback or a retire replaces it. The state lives in memory: a restart serves every task again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lpt_serve.errors import AdapterError, TaskNotFound
from lpt_serve.format import validate_task_name
from lpt_serve.model.adapter import TaskAdapter, build_adapter, load_adapter, parse_config_json
from lpt_serve.model.backbone import Backbone
from lpt_serve.serving.store import AdapterStore

log = logging.getLogger(__name__)


@dataclass
class TaskHealth:
    """One served version's failure streak. Holding the adapter itself (not its id) means a report about a
    version that has since been replaced can never be taken for the new one."""

    adapter: TaskAdapter
    failures_in_a_row: int = 0
    last_failure: str = ""
    quarantined: bool = False


@dataclass(frozen=True)
class ServedTask:
    """The one shape of a served task inside the server: name, the version it serves, every stored version, and
    the loaded adapter (whose config says everything else)."""

    task: str
    version: int
    versions: tuple[int, ...]
    adapter: TaskAdapter

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.adapter.state_dict().values())


class Registry:
    def __init__(self, backbone: Backbone, store: AdapterStore, *, device_budget_bytes: int = 512 << 20,
                 pinned: Iterable[str] = (), quarantine_after: int = 3) -> None:
        self.backbone = backbone
        self.store = store
        self.device = backbone.device
        self.offload = self.device.type != "cpu"
        self.device_budget_bytes = device_budget_bytes
        self.pinned = set(pinned)
        self._tasks: dict[str, ServedTask] = {}
        self._mutate = threading.Lock()  # one upload/rollback/retire at a time, in this process
        self._on_device: OrderedDict[int, ServedTask] = OrderedDict()  # id(adapter) -> task, LRU order
        self.load_errors: dict[str, str] = {}
        self.quarantine_after = quarantine_after
        self._health_lock = threading.Lock()  # the inference thread writes, the event loop reads
        self._health: dict[str, TaskHealth] = {}

    # --------------------------------------------------------------------------------------------- loading
    def _prepare(self, adapter: TaskAdapter) -> TaskAdapter:
        # Kept in CPU memory in the backbone's dtype; `acquire` moves it to the accelerator when needed.
        return adapter.to(device="cpu" if self.offload else self.device, dtype=self.backbone.dtype)

    def load_all(self) -> dict[str, str]:
        """Serve exactly what the store has committed. A broken entry is logged and skipped, not fatal."""
        loaded: dict[str, ServedTask] = {}
        errors: dict[str, str] = {}
        for task, record in self.store.tasks().items():
            try:
                adapter = self._prepare(load_adapter(record.path(), self.backbone))
            except AdapterError as exc:
                errors[task] = str(exc)
                log.error("task %s v%d cannot be served: %s", task, record.current, exc)
                continue
            loaded[task] = ServedTask(task, record.current, record.versions, adapter)
        self._tasks = loaded
        self.load_errors = errors
        with self._health_lock:
            self._health = {}
        log.info("serving %d tasks: %s", len(loaded), ", ".join(f"{t}@v{s.version}" for t, s in loaded.items()))
        return errors

    # ---------------------------------------------------------------------------------------------- lookup
    def get(self, task: str) -> ServedTask:
        served = self._tasks.get(task)
        if served is None:
            raise TaskNotFound(f"task {task!r} is not served")
        return served

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def served(self) -> list[ServedTask]:
        return [self._tasks[t] for t in sorted(self._tasks)]

    def location(self, served: ServedTask) -> str:
        if not self.offload:
            return "cpu"
        return "gpu" if id(served.adapter) in self._on_device else "cpu"

    # ------------------------------------------------------------------------------------------- mutations
    def upload(self, task: str, config_bytes: bytes, weights_bytes: bytes) -> ServedTask:
        """Check against the backbone, commit to the store (atomic), then swap in. Blocking: call off the loop."""
        task = validate_task_name(task)
        config_bytes = _with_task_name(config_bytes, task)
        adapter = self._prepare(build_adapter(config_bytes, weights_bytes, self.backbone))
        with self._mutate:
            record = self.store.commit(task, config_bytes, weights_bytes)
            served = ServedTask(task, record.current, record.versions, adapter)
            self._swap(task, served)
        log.info("task %s now serves v%d (%d parameters)", task, served.version, adapter.num_parameters())
        return served

    def rollback(self, task: str) -> ServedTask:
        task = validate_task_name(task)
        with self._mutate:
            record = self.store.rollback(task)
            try:
                adapter = self._prepare(load_adapter(record.path(), self.backbone))
            except AdapterError as exc:
                raise AdapterError(f"version {record.current} of {task!r} no longer loads: {exc}") from exc
            served = ServedTask(task, record.current, record.versions, adapter)
            self._swap(task, served)
        log.info("task %s rolled back to v%d", task, served.version)
        return served

    def retire(self, task: str) -> None:
        task = validate_task_name(task)
        with self._mutate:
            self.store.retire(task)
            tasks = dict(self._tasks)
            tasks.pop(task, None)
            self._tasks = tasks
            self._forget_health(task)
        log.info("task %s retired", task)

    def _swap(self, task: str, served: ServedTask) -> None:
        # Copy-on-write: readers see either the old dict or the new one, never a half-updated one.
        tasks = dict(self._tasks)
        tasks[task] = served
        self._tasks = tasks
        self._forget_health(task)  # a new version (or the rolled-back one) starts with a clean record

    # ------------------------------------------------------------------------------------------- quarantine
    def _forget_health(self, task: str) -> None:
        with self._health_lock:
            if self._health.pop(task, None) is not None:
                log.info("task %s: failure record cleared", task)

    def _current(self, adapter: TaskAdapter) -> bool:
        served = self._tasks.get(adapter.task)
        return served is not None and served.adapter is adapter

    def record_failure(self, adapter: TaskAdapter, reason: str) -> bool:
        """A pass in which this adapter failed; True if that put it in quarantine. Reports about versions no
        longer served are ignored."""
        if not self._current(adapter):
            return False
        with self._health_lock:
            health = self._health.get(adapter.task)
            if health is None or health.adapter is not adapter:
                health = self._health[adapter.task] = TaskHealth(adapter)
            health.failures_in_a_row += 1
            health.last_failure = reason
            if health.quarantined or health.failures_in_a_row < self.quarantine_after:
                return False
            health.quarantined = True
        log.error("task %s quarantined after %d failed passes in a row (last: %s); upload a new version or roll "
                  "back to serve it again", adapter.task, health.failures_in_a_row, reason)
        return True

    def record_success(self, adapter: TaskAdapter) -> None:
        """A pass that answered every row of this adapter: its streak starts over."""
        with self._health_lock:
            health = self._health.get(adapter.task)
            if health is not None and health.adapter is adapter and not health.quarantined:
                del self._health[adapter.task]

    def quarantine_reason(self, adapter: TaskAdapter) -> str | None:
        """Why this adapter is held out of every batch, or None if it is not."""
        health = self._health.get(adapter.task)
        if health is None or health.adapter is not adapter or not health.quarantined:
            return None
        return f"it failed {health.failures_in_a_row} forward passes in a row (last: {health.last_failure})"

    # ------------------------------------------------------------------------------------------- placement
    def acquire(self, adapters: Iterable[TaskAdapter]) -> None:
        """Make sure every adapter of the next batch is on the device; evict least recently used ones beyond budget."""
        if not self.offload:
            return
        needed = {id(a): a for a in adapters}
        by_adapter = {id(s.adapter): s for s in self._tasks.values()}
        for key, adapter in needed.items():
            if key in self._on_device:
                self._on_device.move_to_end(key)
                continue
            adapter.to(self.device)
            served = by_adapter.get(key) or ServedTask(adapter.task, 0, (), adapter)
            self._on_device[key] = served
        used = sum(s.nbytes for s in self._on_device.values())
        for key in list(self._on_device):
            if used <= self.device_budget_bytes:
                break
            served = self._on_device[key]
            if key in needed or served.task in self.pinned:
                continue
            served.adapter.to("cpu")
            del self._on_device[key]
            used -= served.nbytes
        # Versions no longer served hold no device memory.
        for key in [k for k in self._on_device if k not in by_adapter and k not in needed]:
            self._on_device.pop(key).adapter.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def _with_task_name(config_bytes: bytes, task: str) -> bytes:
    """The URL names the task; an adapter trained under another name is renamed rather than refused."""
    data = parse_config_json(config_bytes)  # its size is checked before it is parsed
    if data.get("task") == task:
        return config_bytes
    data["task"] = task
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
