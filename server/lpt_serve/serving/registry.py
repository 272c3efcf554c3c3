"""The served tasks in three tiers: every committed task is in the store's index (disk), the recently used ones are
loaded in host memory up to a byte budget, and the ones in recent batches are also on the accelerator up to its
own budget. Hot upload/rollback/retire, quarantine.

Start-up reads the index only (each task's state.json: name, current version, stored versions), never the weights,
so time to ready does not grow with the number of tasks. A request for a task that is not in memory loads it off
the event loop, once however many requests ask at the same moment, and then joins the next batch. A stored version
that no longer loads answers `TaskFailed` for that task alone; the failure is remembered until an upload, a
rollback or a retire replaces that version.

Swaps are atomic: a request resolves its task to an adapter object when it is admitted (the index names the
version, the load hands over that version's object) and keeps that object, so an upload never changes what an
in-flight request runs. Evicting a task from host memory only drops the registry's reference: rows already queued
hold the adapter object and still run.

Host memory holds loaded tasks within `host_budget_bytes`, in LRU order: a task loaded for a request stays if there
is room, or if it was asked for more often lately than the least recently used task it would push out (TinyLFU's
admission, see `_admit`); pinned tasks load at start and never leave it. Placement on the accelerator follows
vLLM's LoRA manager: the adapters used recently are also on the device, up to a byte budget (LRU), and pinned
tasks never leave it. On a CPU-only server those two tiers are one. `acquire` is called only from
the inference thread, so moving a module between devices never races a forward pass.

Quarantine: the inference thread reports each pass's failed and fully answered tasks; a served version that fails
`quarantine_after` passes in a row is held out (its requests are refused at admission) until an upload, a rollback
or a retire replaces it. The record is keyed by (task, version), so it survives the adapter being evicted from host
memory and loaded again. The state lives in memory: a restart serves every task again.

Replicas: several servers may share one store. `sync` makes this registry serve what the store holds now, whoever
changed it (another replica, `lpt`, a script using `AdapterStore`): it reads the store's generation file (one small
file, which also journals the last changes by task) and, only when it moved, reads just the tasks changed since; a
registry further behind than the journal compares each task's state.json stamp with the one it last saw. A changed task
that was in memory (or pinned) has its new version loaded before the index switches to it, so requests never wait on a
cold load because another replica uploaded; requests already admitted keep the version they resolved. A load that fails
because the version vanished meanwhile (retired or pruned by another replica) reconciles that task and tries again,
rather than failing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from lpt_serve.errors import AdapterError, LptServeError, StoreError, TaskFailed, TaskNotFound, Unavailable
from lpt_serve.format import CONFIG_NAME, WEIGHTS_NAME, validate_task_name
from lpt_serve.model.adapter import (
    AdapterConfig,
    TaskAdapter,
    build_adapter,
    expected_shapes,
    load_adapter,
    stored_itemsize,
    with_task_name,
)
from lpt_serve.model.backbone import Backbone
from lpt_serve.serving.store import AdapterStore, TaskRecord

log = logging.getLogger(__name__)


@dataclass
class TaskHealth:
    """One served version's failure streak, keyed by (task, version): a report about a version that has since been
    replaced can never be taken for the new one, and an evicted and reloaded adapter keeps its record."""

    version: int
    failures_in_a_row: int = 0
    last_failure: str = ""
    quarantined: bool = False


@dataclass(frozen=True)
class TaskEntry:
    """A task in the index: what the store committed, known without reading any adapter file."""

    task: str
    version: int
    versions: tuple[int, ...]
    directory: str  # the served version's directory

    @cached_property
    def path(self) -> Path:
        # Built when first asked (for a load): an index of 10,000 tasks need not make 10,000 Path objects.
        return Path(self.directory)

    def weights_bytes(self) -> int:
        """The stored weights' size: the host budget's estimate before the adapter is loaded."""
        try:
            return (self.path / WEIGHTS_NAME).stat().st_size
        except OSError:
            return 0


@dataclass(frozen=True)
class ServedTask:
    """The one shape of a served task inside the server: name, the version it serves, every stored version, and
    the loaded adapter (whose config says everything else)."""

    task: str
    version: int
    versions: tuple[int, ...]
    adapter: TaskAdapter

    @cached_property
    def nbytes(self) -> int:
        return self.adapter.nbytes()


class Registry:
    def __init__(self, backbone: Backbone, store: AdapterStore, *, device_budget_bytes: int = 512 << 20,
                 host_budget_bytes: int = 1 << 30, pinned: Iterable[str] = (), quarantine_after: int = 3,
                 on_load: Callable[[bool], None] | None = None) -> None:
        """`on_load(kept)` is called after each load a request asked for: kept in host memory, or used once."""
        self.backbone = backbone
        self.on_load = on_load
        self.store = store
        self.device = backbone.device
        self.offload = self.device.type != "cpu"
        self.device_budget_bytes = device_budget_bytes
        self.host_budget_bytes = host_budget_bytes
        self.pinned = set(pinned)
        self._index: dict[str, TaskEntry] = {}  # copy-on-write: readers never see a half-updated dict
        self._mutate = threading.Lock()  # one upload/rollback/retire at a time, in this process
        self._host_lock = threading.Lock()  # guards _host, _loading, _load_failures (event loop and threads)
        self._host: OrderedDict[str, ServedTask] = OrderedDict()  # loaded current versions, LRU order
        self._host_bytes = 0
        self._loading: dict[tuple[str, int], Future] = {}  # one load per (task, version) at a time
        # Loads for requests run on this one thread, one after another. A load is ~2 ms of mostly Python (parse,
        # check, build the modules); run on asyncio's default pool, five loads at once under Zipf traffic over
        # 10,000 tasks held the GIL against the inference threads between their native calls, and every pass
        # took ~1.7x as long. One by one they cost what they cost, and a queue of cold tasks waits its turn.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lpt-load")
        self._load_failures: dict[tuple[str, int], str] = {}
        self._versions: weakref.WeakKeyDictionary[TaskAdapter, int] = weakref.WeakKeyDictionary()
        self._labels: dict[tuple[str, int], tuple[str, ...]] = {}  # from the config file, for listings
        self._on_device: OrderedDict[int, ServedTask] = OrderedDict()  # id(adapter) -> task, LRU order
        # How often each task was asked for lately (see `_admit`), halved every `_aging_period()` requests.
        self._frequency: dict[str, int] = {}
        self._counted = 0
        # Set while the index is still being read at start (see `load_all`): requests look their task up alone.
        self._pending_index: Future | None = None
        self._touched: set[str] = set()  # tasks looked up or changed here while the index was read
        self._installed: Future = Future()  # settles once an index is served
        self.quarantine_after = quarantine_after
        self._health_lock = threading.Lock()  # the inference thread writes, the event loop reads
        self._health: dict[str, TaskHealth] = {}
        self._stamps: dict[str, tuple[int, int, int] | None] = {}  # state.json stamp last read, by task
        self.generation = -1  # the store generation this registry has caught up with (-1: not yet indexed)

    # --------------------------------------------------------------------------------------------- loading
    def _prepare(self, adapter: TaskAdapter) -> TaskAdapter:
        # Kept in CPU memory; `acquire` moves it to the accelerator when needed. Weights wider than the backbone's
        # dtype are narrowed once; a compact (fp16/bf16) adapter stays as stored, half the bytes, cast when it runs.
        return adapter.to_serving("cpu" if self.offload else self.device, self.backbone.dtype)

    def load_all(self, index: StoreIndex | Future | None = None) -> dict[str, str]:
        """Serve what the store has committed: `index` (read by `read_index`), the store's index read now (None),
        or, given the future of an index still being read, serve at once and take the index when it comes: a
        request meanwhile looks its task up in the store alone (one state.json and a listing), so the time to
        ready does not grow with the number of tasks. Then load the pinned tasks; one that does not load is
        logged, not fatal: its requests answer `TaskFailed`. Changes made after the index was read are caught by
        `sync`."""
        if isinstance(index, Future):
            if not index.done():
                with self._host_lock:
                    self._pending_index = index
                index.add_done_callback(self._install_when_read)
                return {}
            index = index.result()
        if index is None:
            index = read_index(self.store)
        self._install(index)
        errors = self._load_pinned()
        if not self._installed.done():
            self._installed.set_result(None)
        return errors

    def _install_when_read(self, read: Future) -> None:
        # On the thread that finished reading the index.
        try:
            index = read.result()
        except Exception:  # noqa: BLE001 - serving goes on; a second read may still succeed
            log.exception("reading the store's index failed; reading it again")
            try:
                index = read_index(self.store)
            except Exception:  # noqa: BLE001
                # Serve what was looked up so far, at generation -1: the store watcher's next sync compares every
                # task with the store, which is reading the index again, retried at each tick until it works.
                log.exception("reading the store's index failed again; the store watcher will read every task")
                index = StoreIndex(-1, {}, {})
        try:
            with self._mutate:
                self._install(index)
        except Exception:  # noqa: BLE001
            log.exception("serving the store's index failed; the store watcher will read every task")
            with self._host_lock:
                self._pending_index = None
            self.generation = -1
        # Pinned tasks load outside `_mutate`: a load that finds its version gone reconciles under it.
        self._load_pinned()
        if not self._installed.done():
            self._installed.set_result(None)

    def _install(self, index: StoreIndex) -> None:
        """Serve `index`. Tasks looked up or changed while it was being read are read again, after it, so the
        index never turns them back to what it saw."""
        self.generation = index.generation
        self._stamps = dict(index.stamps)
        entries = dict(index.entries)
        with self._host_lock:
            touched, self._touched = self._touched, set()
            if self._pending_index is None:
                self._host.clear()
                self._host_bytes = 0
                self._load_failures.clear()
                with self._health_lock:
                    self._health = {}
            else:
                # Serving began before this index: what requests loaded meanwhile stays.
                for task in touched:
                    if task in self._index:
                        entries[task] = self._index[task]
                    else:
                        entries.pop(task, None)
                self._pending_index = None
            self._index = entries
        if touched:
            self._reconcile(touched)

    def _load_pinned(self) -> dict[str, str]:
        errors: dict[str, str] = {}
        pinned = sorted(self.pinned & set(self._index))
        for task in pinned:
            try:
                self.get(task)
            except TaskFailed as exc:
                errors[task] = str(exc)
        log.info("indexed %d tasks; %d pinned in host memory", len(self._index), len(pinned) - len(errors))
        return errors

    @property
    def indexing(self) -> bool:
        """Whether the store's index is still being read (requests are served meanwhile; listings wait)."""
        return self._pending_index is not None

    async def indexed(self) -> None:
        """Return once the store's index is served: a listing before that would miss tasks."""
        # Shielded: a waiter cancelled (a client gone) must not cancel the future every other waiter shares.
        await asyncio.shield(asyncio.wrap_future(self._installed))

    def _look_up(self, task: str) -> TaskEntry | None:
        """While the index is read: one task's entry from the store, served from now on."""
        try:
            record = self.store.record(task)
        except (StoreError, LptServeError) as exc:  # an unreadable state.json, a name no task can have
            log.debug("task %r: %s", task, exc)
            record = None
        with self._host_lock:
            if self._pending_index is None:  # the index came meanwhile: it decides
                return self._index.get(task)
            self._touched.add(task)
            if record is None:
                return None
            entry = self._index.get(task) or _entry(record)
            if task not in self._index:
                self._index = {**self._index, task: entry}
            return entry

    @property
    def load_errors(self) -> dict[str, str]:
        """Why each stored version that was tried and failed does not load, by task."""
        with self._host_lock:
            return {task: reason for (task, version), reason in self._load_failures.items()
                    if (e := self._index.get(task)) is not None and e.version == version}

    def _claim(self, task: str) -> tuple[ServedTask | None, Future | None, TaskEntry | None]:
        """The loaded task; or the future of its load, with the entry to load when this caller must run it."""
        with self._host_lock:
            entry = self._index.get(task)
            looking_up = entry is None and self._pending_index is not None
        if looking_up and self._look_up(task) is not None:
            return self._claim(task)
        with self._host_lock:
            entry = self._index.get(task)
            if entry is None:
                raise TaskNotFound(f"task {task!r} is not served")
            self._count(task)
            served = self._host.get(task)
            if served is not None and served.version == entry.version:
                self._host.move_to_end(task)
                return served, None, None
            failure = self._load_failures.get((task, entry.version))
            if failure is not None:
                raise TaskFailed(failure)
            key = (task, entry.version)
            future = self._loading.get(key)
            if future is not None:
                return None, future, None
            future = self._loading[key] = Future()
            return None, future, entry

    def _load(self, entry: TaskEntry, future: Future) -> None:
        """Read one stored version into host memory and settle `future` with its ServedTask or TaskFailed; runs on
        the loader thread, where nobody awaits its own result, so whatever goes wrong settles `future`."""
        try:
            self._load_into(entry, future)
        except BaseException as exc:
            with self._host_lock:
                if self._loading.get((entry.task, entry.version)) is future:  # not a newer load of it
                    del self._loading[(entry.task, entry.version)]
            if not future.done():
                future.set_exception(exc)
            else:
                log.exception("after loading task %s v%d", entry.task, entry.version)
            if not isinstance(exc, Exception):
                raise

    def _load_into(self, entry: TaskEntry, future: Future) -> None:
        task = entry.task
        key = (task, entry.version)
        try:
            adapter = self._prepare(load_adapter(entry.path, self.backbone))
        except (AdapterError, StoreError, OSError) as exc:
            if not entry.path.is_dir():
                # Retired or pruned by another replica since we indexed it: not this version's fault, so nothing is
                # remembered; the caller reconciles the task and tries again.
                with self._host_lock:
                    self._loading.pop(key, None)
                future.set_exception(_Vanished(f"task {task!r} v{entry.version} left the store"))
                return
            reason = f"task {task!r} v{entry.version} is stored but no longer loads: {exc}"
            log.error("%s", reason)
            with self._host_lock:
                self._load_failures[key] = reason
                self._loading.pop(key, None)
            future.set_exception(TaskFailed(reason))
            return
        served = ServedTask(task, entry.version, entry.versions, adapter)
        self._versions[adapter] = entry.version
        with self._host_lock:
            self._loading.pop(key, None)
            current = self._index.get(task)
            kept = current is not None and current.version == entry.version and self._admit(task, served.nbytes)
            if kept:
                self._host_put(served)
                self._evict_host(keep=task)
        future.set_result(served)
        if self.on_load is not None:
            self.on_load(kept)

    # Host memory keeps the tasks asked for most often lately, not just the last ones asked for: TinyLFU's admission
    # (Einziger et al., as in Caffeine and Ristretto). Under Zipf traffic over 10,000 tasks with room for 500, plain
    # LRU let each rarely asked task push out one asked for every few seconds, and a third of requests loaded.
    def _count(self, task: str) -> None:
        # Under the host lock.
        self._frequency[task] = self._frequency.get(task, 0) + 1
        self._counted += 1
        if self._counted >= self._aging_period():
            # Halving forgets old popularity, so a task that became popular overtakes one that was.
            self._frequency = {t: n // 2 for t, n in self._frequency.items() if n > 1}
            self._counted = 0

    def _aging_period(self) -> int:
        return max(1000, 10 * len(self._host))  # TinyLFU's sample: ten requests per cached entry

    def _admit(self, task: str, nbytes: int) -> bool:
        """Under the lock: whether a task just loaded for a request stays in host memory. While there is room it
        does; when it would push out the least recently used task, only if it was asked for more often lately.
        A task not kept still answers the requests that asked for it, and a task asked for again and again soon
        outweighs the one it would replace."""
        held = self._host.get(task)
        if task in self.pinned or (self._host_bytes - (held.nbytes if held is not None else 0) + nbytes
                                   <= self.host_budget_bytes):
            return True
        victim = next((t for t in self._host if t != task and t not in self.pinned), None)
        return victim is None or self._frequency.get(task, 0) > self._frequency.get(victim, 0)

    def _evict_host(self, keep: str) -> None:
        """Under the lock: drop least recently used unpinned tasks while host memory is over budget. Rows already
        queued keep their adapter object; only the registry forgets it."""
        excess = self._host_bytes - self.host_budget_bytes
        if excess <= 0:
            return
        # Walk from the least recently used end only as far as needed: no copy of the whole map per load.
        victims = []
        for task, served in self._host.items():
            if excess <= 0:
                break
            if task == keep or task in self.pinned:
                continue
            victims.append(task)
            excess -= served.nbytes
        for task in victims:
            self._host_drop(task)
            log.debug("task %s left host memory (LRU)", task)

    def _host_put(self, served: ServedTask) -> None:
        # Under the host lock.
        self._host_drop(served.task)
        self._host[served.task] = served
        self._host_bytes += served.nbytes

    def _host_drop(self, task: str) -> None:
        # Under the host lock.
        served = self._host.pop(task, None)
        if served is not None:
            self._host_bytes -= served.nbytes

    def get(self, task: str) -> ServedTask:
        """The task's current version, loaded (blocking if it is not in memory: call off the event loop, or use
        `resolve`). TaskNotFound if not served, TaskFailed if its stored version does not load."""
        for attempt in range(2):
            served, future, to_load = self._claim(task)
            if served is not None:
                return served
            if to_load is not None:
                self._load(to_load, future)
            try:
                return future.result()
            except _Vanished:
                if attempt:
                    raise
                self.sync_task(task)
        raise AssertionError("unreachable")

    async def resolve(self, task: str) -> ServedTask:
        """As `get`, without blocking the event loop: a load runs in a worker thread, and every request that asks
        for the same task meanwhile awaits that one load."""
        for attempt in range(2):
            served, future, to_load = self._claim(task)
            if served is not None:
                return served
            if to_load is not None:
                # `_load` settles `future` whatever happens, so the request awaits that alone: one wake-up of the
                # event loop per load, not a second for the executor's own future.
                try:
                    self._loader.submit(self._load, to_load, future)
                except RuntimeError as exc:  # the loader is shut down (the server is stopping)
                    with self._host_lock:
                        self._loading.pop((to_load.task, to_load.version), None)
                    future.set_exception(Unavailable(f"task {task!r} cannot load now: {exc}"))
            try:
                # Shielded, for the same reason: a request cancelled meanwhile must not cancel the load's future
                # for the other requests waiting on it (nor make the load's own `set_result` fail).
                return await asyncio.shield(asyncio.wrap_future(future))
            except _Vanished:
                if attempt:
                    raise
                await asyncio.to_thread(self.sync_task, task)
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------------------------------------- lookup
    def entry(self, task: str) -> TaskEntry:
        entry = self._index.get(task)
        if entry is None and self._pending_index is not None:
            entry = self._look_up(task)
        if entry is None:
            raise TaskNotFound(f"task {task!r} is not served")
        return entry

    def entries(self) -> list[TaskEntry]:
        index = self._index
        return [index[t] for t in sorted(index)]

    def names(self) -> list[str]:
        return sorted(self._index)

    def served(self) -> list[ServedTask]:
        """The tasks loaded in memory (host or device), by name; `entries()` lists every task."""
        with self._host_lock:
            loaded = dict(self._host)
        return [loaded[t] for t in sorted(loaded)]

    def hit(self, task: str) -> ServedTask | None:
        """`loaded`, for a request: the task counts as asked for (see `_admit`) and as the most recently used."""
        with self._host_lock:
            entry = self._index.get(task)
            served = self._host.get(task)
            if entry is None or served is None or served.version != entry.version:
                return None
            self._count(task)
            self._host.move_to_end(task)
            return served

    def loaded(self, task: str) -> ServedTask | None:
        """The task's current version if it is in memory; never loads, counts nothing (listings use it)."""
        entry = self._index.get(task)
        served = self._host.get(task)
        if entry is None or served is None or served.version != entry.version:
            return None
        return served

    def location(self, served: ServedTask | TaskEntry) -> str:
        """Where a task lives now: "gpu" (and in host memory), "cpu" (host memory) or "disk" (the store only)."""
        if isinstance(served, TaskEntry):
            loaded = self.loaded(served.task)
            if loaded is None or loaded.version != served.version:
                return "disk"
            served = loaded
        if self.offload and id(served.adapter) in self._on_device:
            return "gpu"
        return "cpu" if self._host.get(served.task) is served else "disk"

    def labels(self, entry: TaskEntry) -> tuple[str, ...]:
        """The task's labels from its config file (small, read once per version); () if it cannot be read."""
        key = (entry.task, entry.version)
        labels = self._labels.get(key)
        if labels is None:
            try:
                labels = tuple(self.config(entry).labels)  # from memory when loaded, else the config file
            except (AdapterError, OSError, ValueError):
                labels = ()
            self._labels[key] = labels
        return labels

    def config(self, entry: TaskEntry) -> AdapterConfig:
        """The version's config, from memory if loaded, else from its file (never the weights)."""
        loaded = self.loaded(entry.task)
        if loaded is not None and loaded.version == entry.version:
            return loaded.adapter.config
        return AdapterConfig.from_json((entry.path / CONFIG_NAME).read_bytes())

    def estimated_size(self, config: AdapterConfig, weights: Path | None = None) -> tuple[int, int]:
        """(parameters, bytes) the adapter would take in memory, by arithmetic over its config and, given its
        weights file, the dtype stored there: a compact (fp16/bf16) adapter stays as stored (`_prepare`)."""
        numel = sum(math.prod(shape) for shape in expected_shapes(config).values())
        width = torch.empty((), dtype=self.backbone.dtype).element_size()
        stored = None if weights is None else stored_itemsize(weights)
        return numel, numel * (width if stored is None else min(width, stored))

    # ------------------------------------------------------------------------------------------- mutations
    def upload(self, task: str, config_bytes: bytes, weights_bytes: bytes) -> ServedTask:
        """Check against the backbone, commit to the store (atomic), then swap in. Blocking: call off the loop."""
        task = validate_task_name(task)
        config_bytes = with_task_name(config_bytes, task)
        adapter = self._prepare(build_adapter(config_bytes, weights_bytes, self.backbone))
        with self._mutate:
            record = self.store.commit(task, config_bytes, weights_bytes)
            served = ServedTask(task, record.current, record.versions, adapter)
            self._swap(_entry(record), served)
            self._after_local_change()
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
            self._swap(_entry(record), served)
            self._after_local_change()
        log.info("task %s rolled back to v%d", task, served.version)
        return served

    def retire(self, task: str) -> None:
        task = validate_task_name(task)
        with self._mutate:
            self.store.retire(task)
            with self._host_lock:
                if self._pending_index is not None:
                    self._touched.add(task)
                index = dict(self._index)
                index.pop(task, None)
                self._index = index
                self._host_drop(task)
                self._forget_load(task)
            self._forget_health(task)
            self._after_local_change()
        log.info("task %s retired", task)

    def _swap(self, entry: TaskEntry, served: ServedTask) -> None:
        self._versions[served.adapter] = served.version
        with self._host_lock:
            if self._pending_index is not None:
                self._touched.add(entry.task)
            index = dict(self._index)
            index[entry.task] = entry
            self._index = index
            self._forget_load(entry.task)
            self._host_put(served)
            self._evict_host(keep=entry.task)
        self._forget_health(entry.task)  # a new version (or the rolled-back one) starts with a clean record

    def _forget_load(self, task: str) -> None:
        # Under the host lock. A store version number can be reused after retire (a new task starts at v1).
        for key in [k for k in self._load_failures if k[0] == task]:
            del self._load_failures[key]
        for key in [k for k in self._labels if k[0] == task]:
            del self._labels[key]

    # --------------------------------------------------------------------------------------------- replicas
    def sync(self, *, full: bool = False) -> list[str]:
        """Serve what the store holds now. Cheap when nothing changed (one small file read); `full` compares every
        task's stamp even then (a change whose generation bump failed, or files edited by hand). Returns the tasks
        whose served version changed, appeared or left. Blocking: call off the event loop."""
        if self.indexing:
            return []  # the index, when it comes, catches up from the generation it was read at
        if self.store.generation() == self.generation and not full:
            return []
        with self._mutate:
            generation, changed = self._catch_up(full=full)
        if changed:
            log.info("store generation %d: now serving %s", generation,
                     ", ".join(self._describe(t) for t in changed[:20]) + (" ..." if len(changed) > 20 else ""))
        return changed

    def _after_local_change(self) -> None:
        # Under `_mutate`. Our own change bumped the store's generation: catch up now (our task reconciles to what we
        # just swapped in; any other task changed meanwhile is taken too), so /readyz reports the generation we serve
        # at once rather than after the next watch tick. The change itself is done: a failure here only logs.
        if self.indexing:
            return  # the index, when it comes, reads the changed task again (`_touched`)
        try:
            self._catch_up()
        except Exception:  # noqa: BLE001 - the change is committed and served here; never report it as failed
            log.exception("could not catch up with the store after a change (the next sync will)")

    def _catch_up(self, *, full: bool = False) -> tuple[int, list[str]]:
        """Under `_mutate`: reconcile what changed since our generation, then record the store's generation."""
        generation, named = self.store.changes_since(self.generation)
        if generation == self.generation and not full:
            return generation, []
        if named is not None and not full:
            candidates = named  # the store's journal names the tasks changed since our generation
        else:
            names = self.store.task_names()
            present = set(names)
            candidates = [t for t in names if self.store.state_stamp(t) != self._stamps.get(t)]
            candidates += [t for t in self._index if t not in present]
        changed = self._reconcile(candidates)
        self.generation = generation
        return generation, changed

    def sync_task(self, task: str) -> bool:
        """Reconcile one task with the store now; True if what it serves changed."""
        with self._mutate:
            return bool(self._reconcile([task]))

    def _describe(self, task: str) -> str:
        entry = self._index.get(task)
        return f"{task} v{entry.version}" if entry is not None else f"{task} (gone)"

    def _reconcile(self, tasks: Iterable[str]) -> list[str]:
        """Under `_mutate`: read each task's record and make the index agree, loading the new version first when
        the old one was in memory or the task is pinned."""
        updates: dict[str, TaskEntry | None] = {}
        for task in dict.fromkeys(tasks):
            stamp = self.store.state_stamp(task)
            try:
                record = self.store.record(task)
            except StoreError as exc:
                # Unreadable state (edited by hand): keep serving what we have, and say so once per change.
                log.warning("task %r: %s; still serving what was indexed before", task, exc)
                self._stamps[task] = stamp
                continue
            self._stamps[task] = stamp
            if record is None:
                self._stamps.pop(task, None)
            entry = None if record is None else _entry(record)
            if entry != self._index.get(task):
                updates[task] = entry
        if not updates:
            return []
        ready: dict[str, ServedTask] = {}
        for task, entry in updates.items():
            if entry is not None and (task in self.pinned or task in self._host):
                try:
                    adapter = self._prepare(load_adapter(entry.path, self.backbone))
                except (AdapterError, StoreError, OSError) as exc:
                    log.error("task %r v%d from the store does not load: %s", task, entry.version, exc)
                    continue  # a request will load it (and fail alone) like any cold task
                ready[task] = ServedTask(task, entry.version, entry.versions, adapter)
                self._versions[adapter] = entry.version
        with self._host_lock:
            index = dict(self._index)
            for task, entry in updates.items():
                if entry is None:
                    index.pop(task, None)
                else:
                    index[task] = entry
                self._forget_load(task)
                self._host_drop(task)
                if task in ready:
                    self._host_put(ready[task])
            self._index = index
            for task in ready:
                self._evict_host(keep=task)
        for task in updates:
            self._forget_health(task)
        return list(updates)

    # ------------------------------------------------------------------------------------------- quarantine
    def _forget_health(self, task: str) -> None:
        with self._health_lock:
            if self._health.pop(task, None) is not None:
                log.info("task %s: failure record cleared", task)

    def _served_version(self, adapter: TaskAdapter) -> int | None:
        """The version this adapter object is, if it is the version the index serves now; else None."""
        version = self._versions.get(adapter)
        entry = self._index.get(adapter.task)
        if version is None or entry is None or entry.version != version:
            return None
        return version

    def record_failure(self, adapter: TaskAdapter, reason: str) -> bool:
        """A pass in which this adapter failed; True if that put it in quarantine. Reports about versions no
        longer served are ignored."""
        version = self._served_version(adapter)
        if version is None:
            return False
        with self._health_lock:
            health = self._health.get(adapter.task)
            if health is None or health.version != version:
                health = self._health[adapter.task] = TaskHealth(version)
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
        version = self._versions.get(adapter)
        with self._health_lock:
            health = self._health.get(adapter.task)
            if health is not None and health.version == version and not health.quarantined:
                del self._health[adapter.task]

    def quarantine_reason(self, adapter: TaskAdapter) -> str | None:
        """Why this adapter is held out of every batch, or None if it is not."""
        version = self._versions.get(adapter)
        return None if version is None else self.quarantine_reason_of(adapter.task, version)

    def quarantine_reason_of(self, task: str, version: int) -> str | None:
        """As `quarantine_reason`, by name and version: asks nothing of the adapter, so it never loads one."""
        health = self._health.get(task)
        if health is None or health.version != version or not health.quarantined:
            return None
        return f"it failed {health.failures_in_a_row} forward passes in a row (last: {health.last_failure})"

    # ------------------------------------------------------------------------------------------- placement
    def acquire(self, adapters: Iterable[TaskAdapter]) -> None:
        """Make sure every adapter of the next batch is on the device; evict least recently used ones beyond budget."""
        if not self.offload:
            return
        needed = {id(a): a for a in adapters}
        with self._host_lock:
            by_adapter = {id(s.adapter): s for s in self._host.values()}
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
        # Versions no longer served, and tasks evicted from host memory, hold no device memory.
        for key in [k for k in self._on_device if k not in by_adapter and k not in needed]:
            self._on_device.pop(key).adapter.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


class _Vanished(TaskNotFound):
    """The indexed version left the store while it was being loaded (another replica retired or pruned it)."""


@dataclass(frozen=True)
class StoreIndex:
    """What a store had committed when read: its generation, an entry per servable task, and the stamp of every
    task's state.json (of the very file its entry was read from)."""

    generation: int
    entries: dict[str, TaskEntry]
    stamps: dict[str, tuple[int, int, int] | None]


def read_index(store: AdapterStore) -> StoreIndex:
    """The store's index from its state.json files alone, never the weights. Needs no backbone, so a starting
    server reads it on a thread of its own (`service.open_store`) while it already serves."""
    # The generation is read first: a change made while we read is then caught by the next `sync`.
    generation = store.generation()
    entries: dict[str, TaskEntry] = {}
    stamps: dict[str, tuple[int, int, int] | None] = {}
    for scanned in store.scan():
        stamps[scanned.task] = scanned.stamp
        if scanned.error is not None:
            log.warning("skipping task %r: %s", scanned.task, scanned.error)
        elif scanned.record is not None:
            entries[scanned.task] = _entry(scanned.record)
    return StoreIndex(generation, entries, stamps)


def _entry(record: TaskRecord) -> TaskEntry:
    return TaskEntry(record.task, record.current, record.versions, f"{record.task_dir}/v{record.current}")
