"""The service: texts in, typed predictions out. It owns the backbone, the store, the registry, the micro-batcher
and the metrics, and knows nothing of HTTP: the edge (`lpt_serve.api`) turns requests into calls here and
domain errors into statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from lpt_serve.errors import DeadlineExceeded, InputTooLarge, InvalidInput, TaskQuarantined, Unavailable
from lpt_serve.model.adapter import TaskAdapter
from lpt_serve.model.backbone import (
    Backbone,
    cpu_threads,
    release_torch_threads,
    resolve_device,
    share_torch_threads,
)
from lpt_serve.model.engine import Encoded, encode_texts
from lpt_serve.serving.batcher import Batcher
from lpt_serve.serving.isolation import answer_rows
from lpt_serve.serving.metrics import Metrics
from lpt_serve.serving.registry import Registry, ServedTask, read_index
from lpt_serve.serving.store import AdapterStore

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long a start waits for the store's index before it serves without it (a few thousand tasks are read by then).
INDEX_WAIT_S = 0.25

# Requests up to this many characters are tokenised on the event loop: the fast tokenizer takes tens of
# microseconds for them, less than handing the work to a thread and back. Longer ones go to a worker thread (the
# tokenizer releases the GIL), so a large request never stalls the loop.
INLINE_TOKENIZE_CHARS = 2048


@dataclass(frozen=True)
class ServiceConfig:
    """What the service needs to know; the edge fills it from its settings."""

    store: Path
    seed_from: Path | None = None
    backbone: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    runtime: str = "torch"
    onnx_cache_dir: Path | None = None
    runtime_threads: int | None = None
    # Passes run at once, each on a share of the cores; None picks (see `plan_inference`).
    inference_workers: int | None = None
    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    max_queue: int = 2048
    request_timeout_s: float = 30.0
    max_texts_per_request: int = 256
    max_text_chars: int = 100_000
    max_request_tokens: int = 65_536
    max_length: int | None = None
    device_budget_mb: float = 512.0
    host_budget_mb: float = 1024.0  # adapters kept loaded in host memory (LRU); the rest load from the store on use
    pinned_tasks: Sequence[str] = field(default_factory=tuple)
    metrics_max_tasks: int = 100  # tasks with their own metric series; the rest are counted as task="_other"
    metrics_tasks: Sequence[str] = field(default_factory=tuple)  # always their own series (within the cap)
    warmup: bool = True
    quarantine_after: int = 3  # failed passes in a row before a task is held out until an upload or rollback
    keep_versions: int | None = 5  # stored versions kept per task, the served one included; None keeps all
    # Replicas sharing the store: how often to check its generation (0 turns watching off), and how often to compare
    # every task's state even when the generation did not move (hand edits, a failed bump).
    sync_interval_s: float = 0.5
    full_sync_interval_s: float = 60.0
    # Benchmarks only: each pass lasts this long, the real forward inside it and the rest asleep, freeing the cores
    # as a pass on an accelerator would (its time is the device's, not the host's), so that several replicas on one
    # small machine measure routing and convergence rather than a shared CPU.
    simulated_pass_ms: float = 0.0


@dataclass(frozen=True)
class Prediction:
    """One row's answer: the label with the highest probability, its probability, and every label's."""

    task: str
    version: int
    label: str
    score: float
    scores: dict[str, float]
    truncated: bool


def prediction(served: ServedTask, encoded: Encoded, probabilities: Sequence[float]) -> Prediction:
    labels = served.adapter.labels
    scores = dict(zip(labels, (float(p) for p in probabilities), strict=True))
    best = max(labels, key=scores.__getitem__)
    return Prediction(served.task, served.version, best, scores[best], scores, encoded.truncated)


def _starting() -> Unavailable:
    return Unavailable("the server is starting; retry shortly", retry_after=1)


def plan_inference(config: ServiceConfig, backbone: Backbone | None = None) -> tuple[int, int | None]:
    """(inference workers, intra-op threads per pass): for the config's device before the backbone loads,
    for `backbone`'s once it has (one handed to the service may differ from the config).

    On the CPU, two passes at once, each on half the cores, beat one pass on all of them: separate batches
    keep both cores busy, where one pass's small ops leave the second thread waiting. 2 cores, 16 tasks, batch 32:
    ONNX Runtime 1.66x the raw transformers forward against 1.23x; torch over HTTP (passes of 11-16 rows) 1.37x
    against 1.04x (`bench.runtime`, README), in process at batch 32 1.58x against 1.34x; with 64-row passes one
    torch pass on 2 threads did as well or better (1.86x against 1.66x). bf16 on the CPU (torch) gains the same way:
    468 rows/s for two passes on one thread each against 370 for one pass on two. On torch the threads per pass
    are torch's own count, process-wide (the service turns it down while it runs). A GPU runs one pass at a time
    (one device queue is shared by every pass of the process).
    """
    cores = cpu_threads()
    workers = config.inference_workers
    if workers is None:
        device = backbone.device if backbone is not None else resolve_device(config.device)
        workers = 2 if device.type == "cpu" and cores >= 2 else 1  # any dtype (fp32 and bf16 measured)
    threads = config.runtime_threads or (max(1, cores // workers) if workers > 1 else None)
    return workers, threads


def load_backbone(config: ServiceConfig) -> Backbone:
    _, threads = plan_inference(config)
    return Backbone.load(config.backbone, device=config.device, dtype=config.dtype, runtime=config.runtime,
                         onnx_cache_dir=config.onnx_cache_dir, runtime_threads=threads)


def inference_workers(config: ServiceConfig, backbone: Backbone) -> tuple[int, int | None]:
    """(workers, torch threads per pass, or None to leave torch's count alone) for the loaded backbone. Several
    torch passes on the CPU would each run torch's full thread count on the same cores, so the service turns
    torch's count down to each pass's share while it runs."""
    workers, threads = plan_inference(config, backbone)
    if workers > 1 and backbone.runtime.name == "torch" and backbone.device.type == "cpu":
        return workers, threads
    return workers, None


@dataclass(frozen=True)
class OpenedStore:
    """A store opened for serving, and its index, being read on a thread of its own."""

    store: AdapterStore
    index: Future  # of a StoreIndex


def open_store(config: ServiceConfig) -> OpenedStore:
    """Open the store (made and seeded when new), then recover it and read its index on a thread of its own. The
    server is ready without waiting for either (see `Registry.load_all`): each walks every task directory, ~1 s of
    CPU for 10,000 tasks on a small machine."""
    # AdapterStore makes the directory, or says in one sentence why it cannot; a read-only store still opens.
    store = AdapterStore(config.store, keep_versions=config.keep_versions, recover=False)
    if config.seed_from is not None:
        seeded = store.seed(config.seed_from)
        if seeded:
            log.warning("the store %s was new: seeded it with the demo tasks %s", store.root, ", ".join(seeded))
    index: Future = Future()

    def read() -> None:
        try:
            store.recover_at_open()
            index.set_result(read_index(store))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the index
            index.set_exception(exc)

    threading.Thread(target=read, name="lpt-index", daemon=True).start()
    return OpenedStore(store, index)


async def _given_or(value: T | None, make: Callable[[ServiceConfig], T], config: ServiceConfig) -> T:
    return value if value is not None else await asyncio.to_thread(make, config)


class Service:
    """Backbone, registry, batcher, metrics and readiness, started and stopped together."""

    def __init__(self, config: ServiceConfig, backbone: Backbone | None = None,
                 opened: OpenedStore | None = None) -> None:
        """`backbone` and `opened` (the store, opened by `open_store`) are made by `start` when not given."""
        self.config = config
        self.backbone = backbone
        self._opened = opened
        self._indexing: asyncio.Task | None = None
        # A server process sets this: once started (and again once the index is in), everything allocated so far
        # lives as long as the process, so the cyclic GC stops scanning it. Without it a full collection walked
        # ~450k objects of torch, transformers and the app (~175 ms with the GIL held, every few seconds under
        # loads) and took a fifth of the throughput of Zipf traffic over 10,000 tasks. Not for tests and
        # notebooks, which start services again and again: frozen garbage is never collected.
        self.freeze_gc = False
        self.metrics = Metrics(max_tasks=config.metrics_max_tasks, allow=config.metrics_tasks)
        self.store: AdapterStore | None = None
        self.registry: Registry | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self._watcher: asyncio.Task | None = None

    # ------------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        c = self.config
        # Made here when not given (tests, notebooks): the backbone, and the store, whose recovery and index
        # `open_store` starts on a thread of its own.
        backbone, opened = await asyncio.gather(
            _given_or(self.backbone, load_backbone, c), _given_or(self._opened, open_store, c))
        self.backbone, self.store, self._opened = backbone, opened.store, None
        self.registry = Registry(self.backbone, self.store, device_budget_bytes=int(c.device_budget_mb * 2**20),
                                 host_budget_bytes=int(c.host_budget_mb * 2**20), pinned=c.pinned_tasks,
                                 quarantine_after=c.quarantine_after, on_load=self._count_load)
        # A small store is indexed in milliseconds: wait that long, so it is served as it always was, indexed at
        # ready. A large one is served while its index is read (see `Registry.load_all`).
        await asyncio.to_thread(futures.wait, [opened.index], timeout=INDEX_WAIT_S)
        await asyncio.to_thread(self.registry.load_all, opened.index)
        if self.registry.indexing:
            self._indexing = asyncio.create_task(self._when_indexed(), name="lpt-index-wait")
        else:
            self._indexed_now()
        workers, torch_threads = inference_workers(c, self.backbone)
        if torch_threads is not None:  # before the batcher's threads exist: torch applies it to new threads
            share_torch_threads(self, torch_threads)
        self.batcher = Batcher(self._run_batch, max_batch_size=c.max_batch_size, max_batch_tokens=c.max_batch_tokens,
                               max_wait_ms=c.max_wait_ms, max_queue=c.max_queue, metrics=self.metrics,
                               workers=workers)
        log.info("inference: %d pass(es) at a time on %s", workers, self.backbone.runtime.name)
        self.batcher.start()
        if c.warmup:
            await self._warmup()
        if c.sync_interval_s > 0:
            self._watcher = asyncio.create_task(self._watch_store(), name="lpt-store-watch")
        self.ready = True
        self._freeze_gc()
        if self.registry.indexing:
            log.info("ready on %s (%s); the store's index is still being read: requests look their task up in the "
                     "store meanwhile", self.backbone.device, self.backbone.dtype)
        else:
            log.info("ready: %d tasks on %s (%s)", len(self.registry.names()), self.backbone.device,
                     self.backbone.dtype)

    async def _when_indexed(self) -> None:
        await self.registry.indexed()
        self._freeze_gc()  # the index's entries, too, live as long as the process
        self._indexed_now()

    def _freeze_gc(self) -> None:
        if self.freeze_gc:
            gc.collect()  # what is garbage now would never be collected once frozen
            gc.freeze()

    def _indexed_now(self) -> None:
        self.metrics.tasks_served.set(len(self.registry.names()))
        self.metrics.store_generation.set(self.registry.generation)
        if not self.registry.names():
            log.warning("serving no tasks: the store %s is empty; upload one with `lpt upload TASK DIR`",
                        self.store.root)

    def _count_load(self, kept: bool) -> None:
        self.metrics.adapter_loads.labels("true" if kept else "false").inc()

    async def _warmup(self) -> None:
        served = self.registry.served()
        if served:
            encoded = encode_texts(self.backbone, ["warm up"], served[0].adapter.config.template)
            await self.batcher.run_now([served[0].adapter], encoded)
        else:
            ids = self.backbone.tokenize(["warm up"])
            await asyncio.to_thread(self._plain_forward, ids)

    def _plain_forward(self, ids) -> None:
        with torch.inference_mode():
            self.backbone(ids["input_ids"].to(self.backbone.device), ids["attention_mask"].to(self.backbone.device))

    async def _watch_store(self) -> None:
        """Keep serving what the shared store holds: poll its generation, reconcile when it moves (see
        `Registry.sync`). A failing check is logged and retried at the next tick; serving goes on meanwhile."""
        c = self.config
        last_full = time.monotonic()
        while True:
            await asyncio.sleep(c.sync_interval_s)
            full = time.monotonic() - last_full >= c.full_sync_interval_s
            try:
                changed = await asyncio.to_thread(self.registry.sync, full=full)
            except Exception:
                log.exception("checking the store %s for changes failed; retrying in %.1fs", self.store.root,
                              c.sync_interval_s)
                continue
            if full:
                last_full = time.monotonic()
            self.metrics.store_generation.set(self.registry.generation)
            if changed:
                self.metrics.adapter_events.labels("sync").inc(len(changed))
                self.metrics.tasks_served.set(len(self.registry.names()))

    async def stop(self) -> None:
        self.ready = False
        for background in (self._watcher, self._indexing):
            if background is not None:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background
        self._watcher = self._indexing = None
        if self.batcher is not None:
            await self.batcher.stop(timeout=self.config.request_timeout_s)
        release_torch_threads(self)  # the passes are over: torch's thread count back to what others ask for

    def _run_batch(self, adapters: Sequence[TaskAdapter],
                   encoded: Sequence[Encoded]) -> list[list[float] | BaseException]:
        """On the inference thread: hold out quarantined tasks, place the others' adapters, run one mixed pass in
        which a failing task answers `TaskFailed` and the rest are served, and keep each task's failure streak."""
        registry = self.registry
        started = time.perf_counter()
        answers: list[list[float] | BaseException | None] = [None] * len(adapters)
        live = []
        for i, adapter in enumerate(adapters):
            reason = registry.quarantine_reason(adapter)
            if reason is not None:  # quarantined while its rows waited in the queue
                answers[i] = TaskQuarantined(f"task {adapter.task!r} is quarantined: {reason}")
            else:
                live.append(i)
        if live:
            live_adapters = [adapters[i] for i in live]
            registry.acquire(live_adapters)
            outcome = answer_rows(self.backbone, live_adapters, [encoded[i] for i in live])
            for i, answer in zip(live, outcome.answers, strict=True):
                answers[i] = answer
            for adapter, fault in outcome.failed.values():
                registry.record_failure(adapter, fault.describe())
            for adapter in outcome.answered.values():
                registry.record_success(adapter)
        if self.config.simulated_pass_ms > 0:
            time.sleep(max(0.0, self.config.simulated_pass_ms / 1000 - (time.perf_counter() - started)))
        return answers  # type: ignore[return-value]

    # -------------------------------------------------------------------------------------------- classify
    async def resolve(self, task: str) -> ServedTask:
        """The adapter version a request will run, fixed at admission: the index names the version, then its
        adapter is loaded if it is not in memory (TaskNotFound if not served, TaskQuarantined if it keeps failing:
        its requests never enter a batch, TaskFailed if its stored version no longer loads)."""
        if not self.ready or self.registry is None:
            raise _starting()
        self._refuse_if_quarantined(task, self.registry.entry(task).version)  # held out: not worth a load
        served = self.registry.hit(task) or await self.registry.resolve(task)
        self._refuse_if_quarantined(task, served.version)  # the version the load handed over
        return served

    def _refuse_if_quarantined(self, task: str, version: int) -> None:
        reason = self.registry.quarantine_reason_of(task, version)
        if reason is not None:
            raise TaskQuarantined(f"task {task!r} v{version} is quarantined: {reason}")

    async def resolve_many(self, tasks: Sequence[str]) -> list[ServedTask]:
        """`resolve` for each task, in order, the cold ones loading side by side; the first failing task (in
        request order) decides the error."""
        names = list(dict.fromkeys(tasks))
        outcomes = await asyncio.gather(*(self.resolve(t) for t in names), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        by_name = dict(zip(names, outcomes, strict=True))
        return [by_name[t] for t in tasks]

    def resolve_registry(self) -> Registry:
        if self.registry is None:
            raise _starting()
        return self.registry

    def check_texts(self, texts: Sequence[str]) -> None:
        c = self.config
        if len(texts) > c.max_texts_per_request:
            raise InputTooLarge(
                f"{len(texts)} texts in one request; at most {c.max_texts_per_request} (LPT_MAX_TEXTS_PER_REQUEST)")
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidInput(f"text {i} is empty; send at least one non-space character")
            if len(text) > c.max_text_chars:
                raise InputTooLarge(
                    f"text {i} has {len(text)} characters; at most {c.max_text_chars} (LPT_MAX_TEXT_CHARS)")

    async def classify(self, pairs: Sequence[tuple[ServedTask, str]]) -> list[Prediction]:
        """Tokenize per task, queue every row, wait for all of them or the deadline. Cancelling this (the client
        went away) drops the rows that have not run yet."""
        if not self.ready or self.batcher is None:
            raise _starting()
        self.check_texts([text for _, text in pairs])
        timeout = self.config.request_timeout_s
        started = time.monotonic()
        if sum(len(text) for _, text in pairs) <= INLINE_TOKENIZE_CHARS:
            encoded = self._encode(pairs)
        else:
            encoded = await asyncio.to_thread(self._encode, pairs)
        tokens = sum(len(e.input_ids) for e in encoded)
        if tokens > self.config.max_request_tokens:
            # Characters bound the tokenizer's work; tokens bound the pass's (long texts are cut to the backbone's
            # positions first, so this counts what would really run).
            raise InputTooLarge(f"the request holds {tokens} tokens after truncation; at most "
                                f"{self.config.max_request_tokens} (LPT_MAX_REQUEST_TOKENS): split it")
        rows = self.batcher.submit([served.adapter for served, _ in pairs], encoded, timeout)
        futures = [r.future for r in rows]
        try:
            remaining = timeout - (time.monotonic() - started)
            _, pending = await asyncio.wait(futures, timeout=max(0.0, remaining))
            if pending:
                raise DeadlineExceeded(f"no answer within {timeout:.0f}s (LPT_REQUEST_TIMEOUT_S)")
            # One status per request: the first failed row decides it. Reading every row's error keeps asyncio
            # from logging the others as never retrieved.
            failure = next((e for e in [f.exception() for f in futures] if e is not None), None)
            if failure is not None:
                raise failure
            results = [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()  # a no-op on finished rows; drops the others before their pass
        elapsed = time.monotonic() - started
        out = [prediction(served, enc, probs) for (served, _), enc, probs in zip(pairs, encoded, results, strict=True)]
        for task, n in Counter(served.task for served, _ in pairs).items():
            label = self.metrics.task_label(task)
            self.metrics.rows.labels(label).inc(n)
            self.metrics.request_latency.labels(label).observe(elapsed)
        return out

    def _encode(self, pairs: Sequence[tuple[ServedTask, str]]) -> list[Encoded]:
        # Tokenize once per (template, max length): the common case is one task, one call to the fast tokenizer.
        groups: dict[tuple[str | None, int | None], list[int]] = {}
        for i, (served, _) in enumerate(pairs):
            cfg = served.adapter.config
            limits = [x for x in (cfg.max_length, self.config.max_length) if x is not None]
            groups.setdefault((cfg.template, min(limits) if limits else None), []).append(i)
        encoded: list[Encoded | None] = [None] * len(pairs)
        for (template, limit), idx in groups.items():
            for i, e in zip(idx, encode_texts(self.backbone, [pairs[i][1] for i in idx], template, limit), strict=True):
                encoded[i] = e
        return encoded  # type: ignore[return-value]

    # -------------------------------------------------------------------------------------------- adapters
    async def upload(self, task: str, config_bytes: bytes, weights_bytes: bytes) -> ServedTask:
        served = await asyncio.to_thread(self.registry.upload, task, config_bytes, weights_bytes)
        self._adapters_changed("upload")
        return served

    async def rollback(self, task: str) -> ServedTask:
        served = await asyncio.to_thread(self.registry.rollback, task)
        self._adapters_changed("rollback")
        return served

    async def retire(self, task: str) -> None:
        await asyncio.to_thread(self.registry.retire, task)
        self._adapters_changed("retire")

    def _adapters_changed(self, event: str) -> None:
        self.metrics.adapter_events.labels(event).inc()
        self.metrics.tasks_served.set(len(self.registry.names()))

    def queue_depth(self) -> int:
        depth = self.batcher.depth if self.batcher is not None else 0
        self.metrics.queue_depth.set(depth)
        return depth
