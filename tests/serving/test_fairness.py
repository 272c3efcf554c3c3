"""Fair batches: a flood of big requests on one task does not hold back small requests of another.

The forward pass is a stand-in that takes time per row (as a real one does): these tests are about which rows the
batcher puts into which pass, not about the model.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from lpt_serve.model.engine import Encoded
from lpt_serve.serving.batcher import Batcher

FLOOD_REQUESTS, FLOOD_ROWS, BATCH = 6, 256, 32


class SlowPass:
    """Records the pass each row ran in; each pass takes 1 ms per row, like a forward pass on a busy device."""

    def __init__(self) -> None:
        self.passes = 0
        self.ran_in: dict[int, int] = {}  # id(encoded row) -> pass number

    def __call__(self, adapters, encoded):
        self.passes += 1
        for e in encoded:
            self.ran_in[id(e)] = self.passes
        time.sleep(0.001 * len(encoded))
        return [[0.5, 0.5] for _ in encoded]


def rows(task: str, n: int, tokens: int) -> tuple[list, list[Encoded]]:
    return [SimpleNamespace(task=task)] * n, [Encoded(tuple(range(tokens)), False) for _ in range(n)]


async def test_a_flood_on_one_task_leaves_another_task_a_place_in_the_next_pass():
    forward = SlowPass()
    batcher = Batcher(forward, max_batch_size=BATCH, max_batch_tokens=BATCH * 64, max_wait_ms=0, max_queue=4096)
    batcher.start()
    try:
        flood = [batcher.submit(*rows("flood", FLOOD_ROWS, 60), timeout_s=60) for _ in range(FLOOD_REQUESTS)]
        waits = []
        for _ in range(10):
            await asyncio.sleep(0.02)
            adapters, encoded = rows("small", 1, 8)
            queued_during = forward.passes
            [row] = batcher.submit(adapters, encoded, timeout_s=60)
            await row.future
            # The pass running when it arrived, then at most the next one: never the flood's 48 passes.
            waits.append(forward.ran_in[id(encoded[0])] - queued_during)
        assert max(waits) <= 2, waits
        await asyncio.gather(*(r.future for request in flood for r in request))
    finally:
        await batcher.stop()
    assert forward.passes >= FLOOD_REQUESTS * FLOOD_ROWS // BATCH  # the flood still ran, in full batches


async def test_waiting_requests_share_a_pass_round_robin():
    forward = SlowPass()
    batcher = Batcher(forward, max_batch_size=8, max_batch_tokens=8 * 64, max_wait_ms=50, max_queue=4096)
    big = batcher.submit(*rows("big", 20, 10), timeout_s=60)
    small = [batcher.submit(*rows(f"t{i}", 2, 10), timeout_s=60) for i in range(3)]
    batcher.start()
    try:
        await asyncio.gather(*(r.future for request in [big, *small] for r in request))
    finally:
        await batcher.stop()
    first_pass = {forward.ran_in[id(r.encoded)] for request in small for r in request}
    # 8 rows: the anchor and one more of the big request, and both rows of each of the three small ones.
    assert first_pass == {1}
    assert sum(forward.ran_in[id(r.encoded)] == 1 for r in big) == 2


async def test_rows_nearest_in_length_to_the_oldest_row_go_first_within_a_request():
    forward = SlowPass()
    batcher = Batcher(forward, max_batch_size=4, max_batch_tokens=4 * 100, max_wait_ms=50, max_queue=64)
    adapters, encoded = rows("t", 1, 40)
    lengths = [90, 41, 12, 39, 70, 45]
    others = [Encoded(tuple(range(n)), False) for n in lengths]
    batcher.submit(adapters, encoded, timeout_s=60)
    mixed = batcher.submit([SimpleNamespace(task="t")] * len(others), others, timeout_s=60)
    batcher.start()
    try:
        await asyncio.gather(*(r.future for r in mixed))
    finally:
        await batcher.stop()
    assert sorted(n for n, e in zip(lengths, others, strict=True) if forward.ran_in[id(e)] == 1) == [39, 41, 45]
