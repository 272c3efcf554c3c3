"""encode_texts calls the Rust tokenizer directly (no truncation, no padding): its ids must be the ones
transformers' own tokenizer call gives, template and special tokens included, and it must not disturb that call."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lpt_serve.model.engine import encode_texts
from tests.tiny import WORDS

TEXT = st.lists(st.sampled_from([*WORDS, "[MASK]", "[SEP]", "zz", "!", "é", "  "]), min_size=1, max_size=120).map(
    " ".join)


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=5), limit=st.sampled_from([None, 8, 16]))
def test_ids_equal_the_tokenizer_call(tiny_backbone, texts, limit):
    tok = tiny_backbone.tokenizer
    template = "it was <mask> . {text}"
    encoded = encode_texts(tiny_backbone, texts, template, limit)
    around = tok("", add_special_tokens=True)["input_ids"]
    prefix = tok("it was [MASK] .", add_special_tokens=False)["input_ids"]
    budget = min(limit or tiny_backbone.max_length, tiny_backbone.max_length) - len(around) - len(prefix)
    for text, row in zip(texts, encoded, strict=True):
        body = tok(text, add_special_tokens=False)["input_ids"]
        assert row.input_ids == (*around[:1], *prefix, *body[:budget], *around[1:])
        assert row.truncated == (len(body) > budget)
        assert row.input_ids[row.mask_position] == tok.mask_token_id


def test_the_tokenizers_own_truncation_is_left_alone(tiny_backbone):
    tok = tiny_backbone.tokenizer
    encode_texts(tiny_backbone, ["good " * 200])
    # transformers' call with truncation still truncates: encode_texts used its own copy of the Rust tokenizer.
    assert len(tok("good " * 200, truncation=True, max_length=10)["input_ids"]) == 10
