"""What an upload may ask of the server: every per-task knob bounded against the served backbone, the weights'
names and shapes read from the safetensors header before anything is built, and rows that fit the backbone's
positions by construction."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from lpt_serve.errors import AdapterError
from lpt_serve.model import adapter as adapter_module
from lpt_serve.model.adapter import (
    MAX_CONFIG_BYTES,
    MAX_LABELS,
    MAX_PROMPT_LENGTH,
    MAX_TEMPLATE_CHARS,
    AdapterConfig,
    TaskAdapter,
    TensorSpec,
    build_adapter,
    check_adapter,
    expected_shapes,
    label_word_ids,
    max_template_tokens,
    read_header,
    value_problems,
)
from lpt_serve.model.engine import classify_rows, encode_texts
from tests.helpers import adapter_files, make_adapter
from tests.tiny import WORDS


def _edited(config_bytes: bytes, **changes) -> bytes:
    return json.dumps(json.loads(config_bytes) | changes).encode()


def _refusal(config_bytes: bytes, weights: bytes, backbone) -> list[str]:
    with pytest.raises(AdapterError) as info:
        build_adapter(config_bytes, weights, backbone)
    return info.value.problems


@pytest.fixture
def linear_files(tiny_backbone, tmp_path) -> tuple[bytes, bytes]:
    return adapter_files(make_adapter(tiny_backbone, "t", prompt_layer=2), tmp_path / "linear")


@pytest.fixture
def verbalizer_files(tiny_mlm_backbone, tmp_path) -> tuple[bytes, bytes]:
    adapter = make_adapter(tiny_mlm_backbone, "v", prompt_layer=2, head="verbalizer", template="{text} it was <mask>",
                           label_words=["bad", "good"])
    return adapter_files(adapter, tmp_path / "verbalizer")


# ----------------------------------------------------------------------------------------------- each bound
@pytest.mark.parametrize(
    "changes,expected",
    [
        # 600 words: the template alone would take every position (the tiny backbone has 64; half is 32).
        ({"template": " ".join(["film"] * 600) + " {text}"}, "template is 600 tokens; at most 32 (half of"),
        ({"template": "film " * 33 + "{text}"}, "template is 33 tokens; at most 32"),
        ({"template": "x" * (MAX_TEMPLATE_CHARS + 1) + "{text}"}, "template: String should have at most 4096"),
        ({"template": "film " * 6 + "{text}", "max_length": 8}, "max_length 8 leaves no room for text"),
        ({"prompt_length": MAX_PROMPT_LENGTH + 1}, "prompt_length: Input should be less than or equal to 64"),
        ({"bottleneck": 4 * 32 + 1}, "bottleneck 129 is over 128 (4 x the backbone's hidden size 32)"),
        ({"bottleneck": 10**6}, "bottleneck 1000000 is over 128"),
        ({"labels": [f"l{i}" for i in range(MAX_LABELS + 1)]}, "labels: List should have at most 1000 items"),
        ({"labels": ["a", "b" * 201]}, "labels.1: String should have at most 200 characters"),
        ({"labels": ["a", ""]}, "labels.1: String should have at least 1 character"),
        # pydantic's lax mode took all of these as numbers
        ({"prompt_layer": True}, "prompt_layer: Input should be a valid integer"),
        ({"prompt_length": 5.0}, "prompt_length: Input should be a valid integer"),
        ({"bottleneck": "16"}, "bottleneck: Input should be a valid integer"),
        ({"max_length": False}, "max_length: Input should be a valid integer"),
        ({"format_version": True}, "format_version: Input should be a valid integer"),
        ({"dropout": True}, "dropout: Input should be a valid number"),
        ({"labels": ["a", 7]}, "labels.1: Input should be a valid string"),
        ({"template": 5}, "template: Input should be a valid string"),
    ],
)
def test_each_bound_is_refused_by_name(tiny_backbone, linear_files, changes, expected):
    config_bytes, weights = linear_files
    problems = _refusal(_edited(config_bytes, **changes), weights, tiny_backbone)
    assert any(expected in p for p in problems), problems


def test_a_large_config_is_refused_before_it_is_parsed(tiny_backbone, linear_files):
    config_bytes, weights = linear_files
    # Not even JSON: the size alone decides, so a huge upload costs no parse.
    problems = _refusal(b"[" * (MAX_CONFIG_BYTES + 1), weights, tiny_backbone)
    assert problems == [f"adapter_config.json is {MAX_CONFIG_BYTES + 1} bytes; at most {MAX_CONFIG_BYTES} "
                        "(the training record belongs in a summary, not the whole log)"]
    big_record = _edited(config_bytes, training={"log": "x" * MAX_CONFIG_BYTES})
    assert "at most 262144" in _refusal(big_record, weights, tiny_backbone)[0]
    deep = b'{"training": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _refusal(deep, weights, tiny_backbone) == ["adapter_config.json nests too deeply to parse"]


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"label_words": ["bad", "g" * 51]}, "label_words.1: String should have at most 50 characters"),
        ({"template": "{text} <mask> or <mask>"}, "template holds 2 mask tokens once tokenized"),
        ({"label_words": ["bad", "goodish"]}, "label word 'goodish' is not a single token"),
    ],
)
def test_verbalizer_bounds(tiny_mlm_backbone, verbalizer_files, changes, expected):
    config_bytes, weights = verbalizer_files
    problems = _refusal(_edited(config_bytes, **changes), weights, tiny_mlm_backbone)
    assert any(expected in p for p in problems), problems


def test_the_bounds_admit_what_training_makes(tiny_mlm_backbone, verbalizer_files):
    config_bytes, weights = verbalizer_files
    longest = " ".join(["film"] * (max_template_tokens(tiny_mlm_backbone) - 2)) + " {text} <mask>"
    build_adapter(_edited(config_bytes, template=longest), weights, tiny_mlm_backbone)
    demo = Path(__file__).parents[2] / "adapters_store" / "mr" / "v1" / "adapter_config.json"
    AdapterConfig.from_json(demo.read_bytes())  # the shipped demo adapters stay valid


# -------------------------------------------------------------------------------------- header before build
@pytest.mark.parametrize("generator", ["npg", "mppg", "appg", "static"])
@pytest.mark.parametrize("head", ["linear", "verbalizer"])
def test_expected_shapes_are_what_the_adapter_saves(tiny_mlm_backbone, generator, head):
    overrides = {"generator": generator, "prompt_length": 7, "bottleneck": 9, "labels": ["a", "b", "c"]}
    if generator == "static":
        overrides["method"] = "prompt"
    if head == "verbalizer":
        overrides |= {"head": head, "template": "{text} <mask>", "label_words": ["bad", "good", "great"]}
    config = AdapterConfig(task="t", prompt_layer=1, backbone=tiny_mlm_backbone.fingerprint.as_dict(), **overrides)
    word_ids, _ = label_word_ids(config, tiny_mlm_backbone.tokenizer)
    built = {k: tuple(v.shape) for k, v in TaskAdapter(config, word_ids).state_dict().items()}
    assert expected_shapes(config) == built


def test_the_header_is_read_without_the_tensors(tiny_backbone):
    data = save({"a": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.int64)}, metadata={"format": "pt"})
    specs = read_header(data)
    assert {k: (v.dtype, v.shape) for k, v in specs.items()} == {"a": ("F32", (3, 4)), "b": ("I64", (2,))}


def _with_header(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"\x01\x02", "too short for the header's length"),
        (struct.pack("<Q", 1 << 40) + b"{}", "its header claims 1099511627776 bytes"),
        (struct.pack("<Q", 100) + b"{}", "its header runs past the end of the file"),
        (_with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\0" * 12),
         "tensor 'a' holds 12 bytes, not the size of a F32 tensor of shape [2]"),
        (_with_header({"a": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}),
         "tensor 'a' has a malformed header entry"),
        (_with_header({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
         "tensor 'a' has a malformed header entry"),
        (_with_header({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
         "tensor 'a' has unknown dtype 'Q9'"),
    ],
)
def test_inconsistent_headers_are_refused(data, expected):
    with pytest.raises(AdapterError) as info:
        read_header(data)
    assert expected in str(info.value)


def test_integer_tensors_are_refused_from_the_header(tiny_backbone, linear_files):
    config_bytes, weights = linear_files
    tensors = load(weights)
    tensors["head.classifier.bias"] = tensors["head.classifier.bias"].to(torch.int32)
    problems = _refusal(config_bytes, save(tensors), tiny_backbone)
    assert problems == ["tensor 'head.classifier.bias' has dtype I32, expected a floating point type"]


def _peak_rss_growth(work) -> int:
    """Bytes the process' peak resident memory grew by during `work` (Linux: the peak is reset first)."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc/self/status (Linux)")

    def kib(field: str) -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = kib("VmRSS")
    work()
    return kib("VmHWM") - before


def test_a_huge_bottleneck_is_refused_without_allocating_it(tiny_backbone, linear_files, monkeypatch):
    config_bytes, weights = linear_files
    # NPG's up-projection alone would be 5 * 32 * 10**6 floats: 640 MB, and the old check built it.
    huge = _edited(config_bytes, bottleneck=10**6)

    def refuse():
        with pytest.raises(AdapterError, match="bottleneck 1000000 is over 128"):
            build_adapter(huge, weights, tiny_backbone)

    assert _peak_rss_growth(refuse) < 50 * 2**20
    # Even with the bound lifted, the shapes are compared from the header by arithmetic: nothing of that size is made.
    monkeypatch.setattr(adapter_module, "MAX_BOTTLENECK_PER_HIDDEN", 10**9)

    def refuse_by_shape():
        with pytest.raises(AdapterError, match=r"'generator.up.weight' has shape \[160, 16\], expected \[160, 10+\]"):
            build_adapter(huge, weights, tiny_backbone)

    assert _peak_rss_growth(refuse_by_shape) < 50 * 2**20


def test_weights_must_stay_finite_in_the_serving_dtype():
    weights = {"w": torch.tensor([1.0, 1e5]), "big": torch.tensor([3e38])}
    assert value_problems(weights, torch.float32) == []  # finite: only the forward pass can tell (see isolation)
    problems = value_problems(weights, torch.float16)
    assert problems == [f"tensor {n!r} holds values beyond torch.float16's range (+-6.55e+04), the dtype this server "
                        "runs adapters in" for n in ("w", "big")]


# ------------------------------------------------------------------------------------ rows fit by construction
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_accepted_template_gives_rows_that_fit_and_run(tiny_mlm_backbone, data):
    bb = tiny_mlm_backbone
    words = st.lists(st.sampled_from(WORDS + ["!", "zq"]), max_size=40).map(" ".join)
    template = f"{data.draw(words)} {{text}} {data.draw(words)} <mask> ."
    max_length = data.draw(st.none() | st.integers(8, 100))
    config = AdapterConfig(task="t", labels=["a", "b"], prompt_layer=1, prompt_length=data.draw(st.integers(1, 64)),
                           bottleneck=4, head="verbalizer", template=template, label_words=["bad", "good"],
                           max_length=max_length, backbone=bb.fingerprint.as_dict())
    if check_adapter(config, {k: TensorSpec("F32", shape) for k, shape in expected_shapes(config).items()}, bb):
        return  # refused: nothing of it is ever encoded
    adapter = TaskAdapter(config, label_word_ids(config, bb.tokenizer)[0]).eval()
    texts = [data.draw(words) or "x", " ".join(["good"] * 200), "[MASK] " * 70]
    encoded = encode_texts(bb, texts, template, max_length)
    for row in encoded:
        assert len(row.input_ids) <= bb.max_length
        assert row.input_ids[row.mask_position] == bb.tokenizer.mask_token_id
    # The template's mask, never one typed in the text: it is the last mask of the row.
    assert encoded[2].mask_position == max(i for i, t in enumerate(encoded[2].input_ids)
                                           if t == bb.tokenizer.mask_token_id)
    probs = classify_rows(bb, [adapter] * len(encoded), encoded)
    assert all(bool(torch.isfinite(p).all()) for p in probs)
