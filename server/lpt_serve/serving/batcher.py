"""Micro-batcher: packs rows of many tasks into one forward pass, run off the event loop.

A batch starts with the oldest waiting row and fills until `max_batch_size` rows, `max_batch_tokens` padded
tokens, or `max_wait_ms` after that row arrived. Rows closest in length to the oldest one join first, which
limits padding while the oldest row is always served next (no starvation). Rows whose client has gone or
whose deadline passed are dropped before the pass. `workers` inference threads run the passes (one by default);
a batch is taken only when a thread is free, so while all of them work, the next batch gathers. On shutdown the
queue drains and the passes in flight finish before the loop ends.

With several workers a pass takes its fair share of the rows in the system: the rows waiting and the rows of the
passes running, divided by the workers. The share sizes passes alike (32 clients on 2 workers: two passes of 16
at a time, not one of 32 while the other worker idles), and a free worker starts as soon as its share has arrived;
until then rows gather, but no longer than a share of a pass's time after the last pass started (staggered passes
rather than ever smaller ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lpt_serve.errors import DeadlineExceeded, Overloaded, Unavailable
from lpt_serve.model.adapter import TaskAdapter
from lpt_serve.model.engine import Encoded, padded_positions
from lpt_serve.serving.metrics import Metrics

log = logging.getLogger(__name__)

# Runs one mixed pass on the inference thread: one adapter and one encoded row in, per row one probability list out,
# or the exception that row's request must raise (its task failed or is quarantined; the other rows still answer).
RunBatch = Callable[[Sequence[TaskAdapter], Sequence[Encoded]], list[list[float] | BaseException]]


@dataclass(eq=False)
class Row:
    adapter: TaskAdapter
    encoded: Encoded
    future: asyncio.Future
    enqueued: float
    deadline: float
    request: int = 0  # rows of one request share this number (their fair share is counted per request)

    @property
    def tokens(self) -> int:
        return len(self.encoded.input_ids)


@dataclass
class BatchRecord:
    """What one pass held: for tests, the dashboard and the logs."""

    rows: int
    tasks: dict[str, int]
    padded_tokens: int  # positions the pass computed: rows x longest row, summed over the engine's length buckets
    seconds: float
    padding: float = 0.0  # the padded share of those positions
    started: float = field(default_factory=time.time)


class Batcher:
    def __init__(self, run_batch: RunBatch, *, max_batch_size: int = 64, max_batch_tokens: int = 16384,
                 max_wait_ms: float = 5.0, max_queue: int = 2048, metrics: Metrics | None = None,
                 history: int = 256, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self.history: deque[BatchRecord] = deque(maxlen=history)
        self._queue: list[Row] = []
        self._arrived = asyncio.Event()
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lpt-infer")
        self._free = asyncio.Semaphore(workers)  # inference threads without a pass
        self._in_flight: set[asyncio.Task] = set()
        self._running = 0  # passes on the inference threads now (counted from when they are taken)
        self._running_rows = 0  # rows in those passes
        self._last_start = 0.0  # when the latest pass started (monotonic)
        self._pass_seconds = 0.0  # moving average of a pass's wall time
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._rows_per_second = 0.0
        self._request_numbers = itertools.count(1)

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="lpt-batcher")

    async def stop(self, timeout: float = 30.0) -> None:
        """Refuse new rows, finish what is queued and in flight, then end the loop."""
        self._stopping = True
        self._arrived.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
                if self._in_flight:
                    await asyncio.wait(self._in_flight, timeout=timeout)
            except TimeoutError:
                log.warning("batcher did not drain within %.0fs; cancelling %d rows", timeout, len(self._queue))
                self._task.cancel()
        for row in self._queue:
            if not row.future.done():
                row.future.set_exception(Unavailable("the server is shutting down", retry_after=1))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    async def run_now(self, adapters: Sequence[TaskAdapter],
                      encoded: Sequence[Encoded]) -> list[list[float] | BaseException]:
        """One pass on the inference thread outside the queue (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, adapters, encoded)

    @property
    def depth(self) -> int:
        return len(self._queue)

    # ---------------------------------------------------------------------------------------------- submit
    def submit(self, adapters: Sequence[TaskAdapter], encoded: Sequence[Encoded], timeout_s: float) -> list[Row]:
        """Queue one request's rows; await `row.future` for each row's probabilities."""
        if self._stopping:
            raise Unavailable("the server is shutting down; retry on another replica", retry_after=1)
        if len(self._queue) + len(adapters) > self.max_queue:
            wait = len(self._queue) / self._rows_per_second if self._rows_per_second > 0 else 1.0
            raise Overloaded(f"the queue is full ({len(self._queue)} rows waiting); retry later",
                             retry_after=max(1.0, math.ceil(wait)))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        request = next(self._request_numbers)
        rows = [Row(a, e, loop.create_future(), now, now + timeout_s, request)
                for a, e in zip(adapters, encoded, strict=True)]
        self._queue.extend(rows)
        self._set_depth()
        self._arrived.set()
        return rows

    # ------------------------------------------------------------------------------------------------ loop
    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))

    def _full(self) -> bool:
        if len(self._queue) >= self.max_batch_size:
            return True
        longest = max(r.tokens for r in self._queue)
        return len(self._queue) * longest >= self.max_batch_tokens

    def _share(self, *, round_up: bool = True) -> int:
        """Rows of a worker's fair share: those waiting and those in the passes running, over the workers. Rounded
        up, it is what a pass takes; rounded down, what must have arrived before a free worker starts (3 rows on 2
        idle workers: a pass of 2 and one of 1 at once, not a second worker waiting for a row that is not coming)."""
        rows = len(self._queue) + self._running_rows
        share = math.ceil(rows / self.workers) if round_up else rows // self.workers
        return max(1, min(self.max_batch_size, share))

    def _share_arrived(self) -> bool:
        return len(self._queue) >= self._share(round_up=False)

    def _take(self, limit: int) -> list[Row]:
        """At most `limit` rows for the next pass, shared fairly between the waiting requests.

        The oldest row (the anchor) always goes first, so nothing starves. Then, round by round, every waiting
        request gives one row, its row nearest in length to the anchor (less padding), until the size or token
        limit. A request of 256 long texts therefore cannot hold back a one-text request of another task queued
        behind it: the next pass takes a row of each.
        """
        anchor = self._queue[0]
        by_request: dict[int, list[Row]] = {}
        for row in self._queue[1:]:
            by_request.setdefault(row.request, []).append(row)
        for rows in by_request.values():
            rows.sort(key=lambda r: abs(r.tokens - anchor.tokens))
        # The anchor's own request takes its round after the others: it has just had its turn.
        turns = deque(sorted(by_request, key=lambda request: request == anchor.request))
        chosen, longest = [anchor], anchor.tokens
        while turns and len(chosen) < limit:
            request = turns.popleft()
            rows = by_request[request]
            fits = next((i for i, r in enumerate(rows)
                         if (len(chosen) + 1) * max(longest, r.tokens) <= self.max_batch_tokens), None)
            if fits is None:
                continue  # none of its rows fits this pass any more
            row = rows.pop(fits)
            chosen.append(row)
            longest = max(longest, row.tokens)
            if rows:
                turns.append(request)
        taken = set(map(id, chosen))
        self._queue = [r for r in self._queue if id(r) not in taken]
        self._set_depth()
        return chosen

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # A batch is taken only when an inference thread is free: until then, rows keep gathering.
            await self._free.acquire()
            if not self._queue:
                self._free.release()
                continue
            fill_until = self._queue[0].enqueued + self.max_wait
            while not self._full() and not self._stopping:
                now = time.monotonic()
                # Passes are staggered: while another runs, a free worker lets rows gather until its share has
                # arrived, or a share of a pass's time after the last start. Taking whatever is queued at once
                # would split the traffic into ever smaller passes (2 cores, 32 one-text clients: 4 rows a pass,
                # and less throughput than one worker). With no pass running, the wait stays max_wait. Both are
                # read again at each wake-up: a pass that ends (it sets `_arrived`) changes them.
                stagger_until = fill_until
                if self._running:
                    stagger_until = max(fill_until, self._last_start + self._pass_seconds / self.workers)
                if now >= stagger_until or (now >= fill_until and self._share_arrived()):
                    break
                self._arrived.clear()
                wake = fill_until if now < fill_until else stagger_until
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), wake - now)
            batch = self._live(self._take(self._share()))
            if not batch:
                self._free.release()
                continue
            # Counted now, not when the pass task first runs: the next free worker's share depends on it.
            self._running += 1
            self._running_rows += len(batch)
            self._last_start = time.monotonic()
            # The pass runs as a task; the slot it holds (`_free`) keeps one worker's passes one at a time.
            task = loop.create_task(self._pass(loop, batch), name="lpt-pass")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _pass(self, loop: asyncio.AbstractEventLoop, batch: list[Row]) -> None:
        """Run one batch on an inference thread and answer its rows; frees the thread's slot when done."""
        try:
            started = time.monotonic()
            adapters = [r.adapter for r in batch]
            encoded = [r.encoded for r in batch]
            try:
                probs, cpu_s = await loop.run_in_executor(self._executor, self._run_timed, adapters, encoded)
            except Exception as exc:  # a pass that failed as a whole fails its rows, never the loop
                log.exception("forward pass of %d rows failed", len(batch))
                for row in batch:
                    if not row.future.done():
                        row.future.set_exception(exc)
                return
            elapsed = time.monotonic() - started
            self._record(batch, elapsed, started, cpu_s)
            for row, p in zip(batch, probs, strict=True):
                if row.future.done():
                    continue
                if isinstance(p, BaseException):
                    row.future.set_exception(p)
                else:
                    row.future.set_result(p)
        finally:
            self._running -= 1
            self._running_rows -= len(batch)
            self._free.release()
            self._arrived.set()  # a worker waiting for its share: the share just changed

    def _run_timed(self, adapters: Sequence[TaskAdapter],
                   encoded: Sequence[Encoded]) -> tuple[list[list[float] | BaseException], float]:
        # On the inference thread: its CPU time beside the pass's wall time tells contention from work.
        started = time.thread_time()
        probs = self.run_batch(adapters, encoded)
        return probs, time.thread_time() - started

    def _live(self, batch: list[Row]) -> list[Row]:
        now = time.monotonic()
        live = []
        for row in batch:
            if row.future.done():  # cancelled: the client went away or the handler gave up
                self._drop("cancelled")
            elif now >= row.deadline:
                row.future.set_exception(DeadlineExceeded("the request's deadline passed while it waited for a batch"))
                self._drop("deadline")
            else:
                live.append(row)
        return live

    def _drop(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.dropped.labels(reason).inc()

    def _record(self, batch: list[Row], elapsed: float, started: float, cpu_s: float = 0.0) -> None:
        tasks = Counter(r.adapter.task for r in batch)
        lengths = [r.tokens for r in batch]
        positions = padded_positions(lengths)  # what the engine computes, bucketed by length as it does
        padding = 1.0 - sum(lengths) / positions
        record = BatchRecord(len(batch), dict(tasks), positions, elapsed, padding=padding)
        self.history.append(record)
        self._pass_seconds = elapsed if self._pass_seconds == 0 else 0.8 * self._pass_seconds + 0.2 * elapsed
        rate = len(batch) / max(elapsed, 1e-6)
        self._rows_per_second = rate if self._rows_per_second == 0 else 0.8 * self._rows_per_second + 0.2 * rate
        if self.metrics is not None:
            m = self.metrics
            m.forward_latency.observe(elapsed)
            m.forward_cpu.inc(cpu_s)
            m.batch_rows.observe(len(batch))
            m.batch_tasks.observe(len(tasks))
            m.batch_padding.observe(padding)
            for row in batch:
                m.queue_latency.labels(m.task_label(row.adapter.task)).observe(started - row.enqueued)
        log.debug("batch of %d rows, %d tasks, %.1f ms", len(batch), len(tasks), elapsed * 1000)
