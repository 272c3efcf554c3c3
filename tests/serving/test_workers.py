"""Several inference workers: passes overlap, every row gets its own answer, and stopping finishes them all."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from lpt_serve.model.engine import Encoded, classify_rows, encode_texts
from lpt_serve.serving.batcher import Batcher
from lpt_serve.serving.service import Service, ServiceConfig, plan_inference
from lpt_serve.serving.store import AdapterStore
from tests.helpers import make_adapter


def rows(task: str, n: int) -> tuple[list, list[Encoded]]:
    return [SimpleNamespace(task=task)] * n, [Encoded((i, 1, 2), False) for i in range(n)]


class Rendezvous:
    """A pass that returns only once `parties` passes are running at the same time (or fails after 5 s)."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=5)
        self.threads: set[str] = set()

    def __call__(self, adapters, encoded):
        self.threads.add(threading.current_thread().name)
        self.barrier.wait()
        return [[float(e.input_ids[0]), 0.0] for e in encoded]


@pytest.mark.parametrize("workers", [1, 2])
async def test_passes_overlap_only_with_more_than_one_worker(workers):
    forward = Rendezvous(2)
    batcher = Batcher(forward, max_batch_size=1, max_wait_ms=0, workers=workers)
    batcher.start()
    try:
        submitted = [batcher.submit(*rows("t", 1), timeout_s=30) for _ in range(2)]
        results = await asyncio.gather(*(r.future for request in submitted for r in request),
                                       return_exceptions=True)
    finally:
        await batcher.stop()
    if workers == 2:
        assert results == [[0.0, 0.0], [0.0, 0.0]] and len(forward.threads) == 2
    else:  # one pass at a time: the first pass waits for a second that cannot start, and fails alone
        assert isinstance(results[0], threading.BrokenBarrierError)


async def test_stop_finishes_the_passes_in_flight_on_every_worker():
    release = threading.Event()

    def held(adapters, encoded):
        release.wait(5)
        return [[1.0, 0.0] for _ in encoded]

    batcher = Batcher(held, max_batch_size=1, max_wait_ms=0, workers=3)
    batcher.start()
    submitted = [batcher.submit(*rows("t", 1), timeout_s=30) for _ in range(5)]
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0.05)
    release.set()
    await stopping
    assert [r.future.result() for request in submitted for r in request] == [[1.0, 0.0]] * 5


async def test_two_workers_answer_every_row_as_it_is_answered_alone(tiny_backbone, tmp_path):
    store = AdapterStore(tmp_path / "store")
    tasks = [f"t{i}" for i in range(4)]
    for i, task in enumerate(tasks):
        store.commit_dir(task, make_adapter(tiny_backbone, task, seed=i, prompt_layer=1 + i % 2).save(tmp_path / task))
    service = Service(ServiceConfig(store=tmp_path / "store", inference_workers=2, max_batch_size=4, max_wait_ms=1,
                                    warmup=False, sync_interval_s=0), backbone=tiny_backbone)
    await service.start()
    assert service.batcher.workers == 2
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(40)]
    try:
        served = {task: await service.resolve(task) for task in tasks}
        answers = await asyncio.gather(*(service.classify([(served[tasks[i % 4]], text)])
                                         for i, text in enumerate(texts)))
        passes = list(service.batcher.history)
    finally:
        await service.stop()
    assert len(passes) >= len(texts) // 4  # many passes, on two threads
    for i, (text, [prediction]) in enumerate(zip(texts, answers, strict=True)):
        adapter = served[tasks[i % 4]].adapter
        alone = classify_rows(tiny_backbone, [adapter], encode_texts(tiny_backbone, [text]))[0]
        torch.testing.assert_close(torch.tensor(list(prediction.scores.values())), alone, atol=1e-5, rtol=1e-5)


def test_the_cpu_runs_two_passes_on_half_the_cores_each(monkeypatch, tmp_path):
    from lpt_serve.serving import service as service_module

    monkeypatch.setattr(service_module, "cpu_threads", lambda: 8)
    base = {"store": tmp_path, "device": "cpu", "dtype": "float32"}
    assert plan_inference(ServiceConfig(**base, runtime="auto")) == (2, 4)
    assert plan_inference(ServiceConfig(**base, runtime="torch")) == (2, 4)
    assert plan_inference(ServiceConfig(store=tmp_path, device="cpu", dtype="bfloat16", runtime="torch")) == (2, 4)
    assert plan_inference(ServiceConfig(**base, runtime="auto", inference_workers=4)) == (4, 2)
    assert plan_inference(ServiceConfig(**base, runtime="auto", runtime_threads=3)) == (2, 3)
    monkeypatch.setattr(service_module, "cpu_threads", lambda: 1)
    assert plan_inference(ServiceConfig(**base, runtime="auto")) == (1, None)


async def test_closed_loop_clients_keep_both_workers_busy_with_passes_of_their_share():
    """32 closed-loop clients (each sends its next row as soon as its answer comes) on 2 workers, a pass costing a
    fixed part plus a part per row: passes settle at about half the clients each, running side by side. Neither
    one pass of 32 with a worker idle, nor ever smaller passes (each row taking the free worker as it arrives)."""
    sizes: list[int] = []
    running = 0
    overlapped = 0
    lock = threading.Lock()

    def timed_pass(adapters, encoded):
        nonlocal running, overlapped
        with lock:
            running += 1
            overlapped += running > 1
            sizes.append(len(encoded))
        time.sleep(0.02 + 0.002 * len(encoded))
        with lock:
            running -= 1
        return [[1.0, 0.0] for _ in encoded]

    batcher = Batcher(timed_pass, max_batch_size=64, max_wait_ms=2, workers=2)
    batcher.start()
    stop = time.monotonic() + 2.0

    async def client(i: int) -> None:
        while time.monotonic() < stop:
            [row] = batcher.submit(*rows(f"t{i % 16}", 1), timeout_s=30)
            await row.future
            await asyncio.sleep(0.001)  # the answer's way back and the next request's way in

    try:
        await asyncio.gather(*(client(i) for i in range(32)))
    finally:
        await batcher.stop()
    settled = sizes[len(sizes) // 4:]
    mean = sum(settled) / len(settled)
    assert 10 <= mean <= 22, sizes
    assert overlapped >= len(sizes) // 2, (overlapped, len(sizes))


class SecondLongPasses:
    """Passes of 1 s each, their (rows, start time) recorded."""

    def __init__(self) -> None:
        self.starts: list[tuple[int, float]] = []

    def __call__(self, adapters, encoded):
        self.starts.append((len(encoded), time.monotonic()))
        time.sleep(1.0)
        return [[1.0, 0.0] for _ in encoded]


async def warmed_two_worker_batcher(forward: SecondLongPasses) -> Batcher:
    """Two workers, after one pass: the batcher knows a pass's time, so the stagger deadline is 0.5 s."""
    batcher = Batcher(forward, max_batch_size=8, max_wait_ms=0, workers=2)
    batcher.start()
    [warm] = batcher.submit(*rows("t", 1), timeout_s=30)
    await warm.future
    return batcher


async def test_a_free_worker_starts_once_its_share_has_arrived():
    """A pass of 1 row runs; 1 more row arrives: that is half the rows in the system, so the free worker starts
    with it at once instead of waiting for the stagger deadline (half a pass's time after the last start)."""
    forward = SecondLongPasses()
    batcher = await warmed_two_worker_batcher(forward)
    try:
        first = batcher.submit(*rows("t", 1), timeout_s=30)
        await asyncio.sleep(0.02)
        second = batcher.submit(*rows("t", 1), timeout_s=30)
        await asyncio.gather(*(r.future for r in first + second))
    finally:
        await batcher.stop()
    starts = forward.starts
    assert [n for n, _ in starts] == [1, 1, 1]
    # The stagger deadline would be 0.5 s after the first pass started; the share arrived 0.02 s in.
    assert starts[2][1] - starts[1][1] < 0.3, starts


async def test_an_odd_number_of_rows_on_two_idle_workers_starts_at_once():
    """3 rows, 2 idle workers: a pass of 2 and a pass of 1, both at once. The second worker's share is the one row
    left; it must not wait for a second row that is not coming (until the stagger deadline, half a pass later)."""
    forward = SecondLongPasses()
    batcher = await warmed_two_worker_batcher(forward)
    try:
        request = batcher.submit(*rows("t", 3), timeout_s=30)
        await asyncio.gather(*(r.future for r in request))
    finally:
        await batcher.stop()
    starts = forward.starts
    assert sorted(n for n, _ in starts[1:]) == [1, 2]
    assert abs(starts[2][1] - starts[1][1]) < 0.3, starts


async def test_two_free_workers_split_the_waiting_rows_into_two_passes_of_equal_size():
    """32 one-row requests waiting, 2 workers free: two passes of 16 at the same time, not 32 on one worker while
    the other idles."""
    forward = Rendezvous(2)
    sizes: list[int] = []

    def counted(adapters, encoded):
        sizes.append(len(encoded))
        return forward(adapters, encoded)

    batcher = Batcher(counted, max_batch_size=64, max_wait_ms=50, workers=2)
    batcher.start()
    try:
        submitted = [batcher.submit(*rows(f"t{i % 4}", 1), timeout_s=30) for i in range(32)]
        results = await asyncio.gather(*(r.future for request in submitted for r in request))
    finally:
        await batcher.stop()
    assert sorted(sizes) == [16, 16] and len(forward.threads) == 2
    assert len(results) == 32



def test_two_torch_passes_share_the_cores_and_the_services_give_torch_its_threads_back(tiny_folder, tmp_path):
    # In a process of its own: torch's thread count is process-wide, and other tests' backbones hold it down.
    script = textwrap.dedent(f"""
        import asyncio, torch
        from lpt_serve.model.backbone import Backbone
        from lpt_serve.serving.service import Service, ServiceConfig

        async def main():
            backbone = Backbone.load({str(tiny_folder)!r}, device="cpu", dtype="float32", runtime="torch")
            torch.set_num_threads(3)
            services = [Service(ServiceConfig(store={str(tmp_path / "store")!r} + str(i), runtime="torch",
                                              device="cpu", dtype="float32", inference_workers=2, runtime_threads=1,
                                              warmup=False, sync_interval_s=0), backbone=backbone) for i in range(2)]
            for service in services:
                await service.start()
            print(services[0].batcher.workers, torch.get_num_threads())
            await services[0].stop()
            print(torch.get_num_threads())  # the other service still runs its two passes
            await services[1].stop()
            print(torch.get_num_threads())

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    running, one_stopped, both_stopped = out.stdout.split("\n")[:3]
    # Two passes at once, each on one torch thread (not two passes on three threads each), while either service
    # runs; the three again once both have stopped.
    assert running.split() == ["2", "1"]
    assert one_stopped == "1"
    assert both_stopped == "3"
