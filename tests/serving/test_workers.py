"""Several inference workers: passes overlap, every row gets its own answer, and stopping finishes them all."""

from __future__ import annotations

import asyncio
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


def test_onnxruntime_on_the_cpu_runs_two_passes_on_half_the_cores_each(monkeypatch, tmp_path):
    from lpt_serve.serving import service as service_module

    monkeypatch.setattr(service_module, "cpu_threads", lambda: 8)
    base = {"store": tmp_path, "device": "cpu", "dtype": "float32"}
    assert plan_inference(ServiceConfig(**base, runtime="auto")) == (2, 4)
    assert plan_inference(ServiceConfig(**base, runtime="torch")) == (1, None)
    assert plan_inference(ServiceConfig(**base, runtime="auto", inference_workers=4)) == (4, 2)
    assert plan_inference(ServiceConfig(**base, runtime="auto", runtime_threads=3)) == (2, 3)
    monkeypatch.setattr(service_module, "cpu_threads", lambda: 1)
    assert plan_inference(ServiceConfig(**base, runtime="auto")) == (1, None)


async def test_a_free_worker_lets_rows_gather_while_another_pass_runs():
    """Staggered passes: rows arriving one by one during a pass share the next pass instead of each taking one."""
    sizes: list[int] = []

    def slow(adapters, encoded):
        sizes.append(len(encoded))
        time.sleep(0.4)
        return [[1.0, 0.0] for _ in encoded]

    batcher = Batcher(slow, max_batch_size=8, max_wait_ms=0, workers=2)
    batcher.start()
    try:
        [warm] = batcher.submit(*rows("t", 1), timeout_s=30)  # one pass, so that the batcher knows a pass's time
        await warm.future
        first = batcher.submit(*rows("t", 1), timeout_s=30)
        later = []
        for _ in range(3):  # 20, 40, 60 ms into the first pass: well before half of it (200 ms)
            await asyncio.sleep(0.02)
            later += batcher.submit(*rows("t", 1), timeout_s=30)
        await asyncio.gather(*(r.future for r in first + later))
    finally:
        await batcher.stop()
    assert sizes == [1, 1, 3], sizes
