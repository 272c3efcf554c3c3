"""Length buckets: a batch is split into runs of similar length, each padded to its own longest row."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from lpt_serve.model.engine import classify_rows, encode_texts, length_buckets, padded_positions
from tests.helpers import make_adapter


def cost(buckets: list[list[int]], lengths: list[int], overhead: int) -> int:
    return sum(len(b) * max(lengths[i] for i in b) + overhead for b in buckets)


@given(st.lists(st.integers(1, 80), max_size=40), st.integers(0, 200))
def test_buckets_partition_the_rows_by_length(lengths, overhead):
    buckets = length_buckets(lengths, overhead)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert all(b for b in buckets)
    # Runs of the sorted lengths: every row of a bucket is at least as long as every row of the bucket before.
    for before, after in itertools.pairwise(buckets):
        assert max(lengths[i] for i in before) <= min(lengths[i] for i in after)


@given(st.lists(st.integers(1, 60), min_size=1, max_size=9), st.integers(0, 120))
def test_buckets_are_the_cheapest_split(lengths, overhead):
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    cheapest = min(
        cost([order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))], lengths, overhead)
        for k in range(len(order))
        for cuts in itertools.combinations(range(1, len(order)), k)
    )
    assert cost(length_buckets(lengths, overhead), lengths, overhead) == cheapest


def test_short_and_long_rows_stop_sharing_one_padded_width():
    lengths = [10] * 16 + [60] * 16
    assert padded_positions(lengths) == 16 * 10 + 16 * 60  # two buckets, no padding at all
    assert padded_positions(lengths, overhead=10_000) == 32 * 60  # one pass when a pass costs more than padding


def test_a_batch_runs_as_one_pass_per_bucket_and_answers_as_one(tiny_backbone, monkeypatch):
    adapter = make_adapter(tiny_backbone, "t", prompt_layer=2)
    texts = ["good"] * 6 + ["it was a very very good and not a bad film, the film is good, very good"] * 6
    encoded = encode_texts(tiny_backbone, texts)
    lowers = []
    original = type(tiny_backbone).lower
    monkeypatch.setattr(type(tiny_backbone), "lower", lambda self, ids, *a, **k: lowers.append(ids.shape) or
                        original(self, ids, *a, **k))
    together = classify_rows(tiny_backbone, [adapter] * 12, encoded)
    assert len(lowers) == 2  # the short rows and the long rows, each at its own width
    alone = [classify_rows(tiny_backbone, [adapter], [e])[0] for e in encoded]
    for a, b in zip(together, alone, strict=True):
        assert (a - b).abs().max() < 1e-5
