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
    parse_weights,
    read_config,
    read_header,
    read_weights,
    stored_values_finite,
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
        # The tensors must tile the data section: a parse that views the file's bytes relies on it.
        (_with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
         "its tensors leave a gap in the data"),
        (_with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
         "its tensors overlap in the data"),
        (_with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
         "4 bytes after the last tensor belong to none"),
        (struct.pack("<Q", 4) + '{}'.encode("utf-16-le"), "its header is not UTF-8 JSON"),
        (_with_header({"__metadata__": {"format": 1}}), "its __metadata__ must map names to strings"),
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


# ------------------------------------------------------------------------------------------ reading weights
def _mixed_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
            "bf16": torch.randn(2, 3, generator=g).bfloat16(), "f64": torch.randn(4, generator=g).double(),
            "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}


@pytest.mark.parametrize("weights", [
    _mixed_weights(),
    {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4)},  # one dtype
    {"w": torch.ones(3), "ids": torch.arange(5)},  # an integer tensor: the library's parse
], ids=["mixed", "fp32", "with-integers"])
def test_weights_parse_as_the_safetensors_library_parses_them(weights):
    data = save(weights, metadata={"format": "pt"})
    expected = load(data)
    for buffer in (data, bytearray(data), memoryview(bytearray(data))):
        parsed = parse_weights(buffer)
        assert parsed.keys() == expected.keys()
        for name, tensor in expected.items():
            assert parsed[name].dtype == tensor.dtype and parsed[name].shape == tensor.shape
            assert torch.equal(parsed[name], tensor), name


def test_floating_weights_are_views_of_the_buffer_they_were_read_into(tmp_path):
    """No copy per tensor: every floating point tensor of a file read by `read_weights` lies inside its buffer."""
    path = tmp_path / "w.safetensors"
    path.write_bytes(save({"a": torch.randn(16, 8), "b": torch.randn(8).half()}, metadata={"format": "pt"}))
    buffer = read_weights(path)
    assert bytes(buffer) == path.read_bytes()
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    for tensor in parse_weights(buffer).values():
        assert start <= tensor.data_ptr() < tensor.data_ptr() + tensor.nbytes <= start + len(buffer)


def test_a_header_that_leaves_tensors_unaligned_parses_as_the_library_does():
    weights = {"a": torch.randn(3), "b": torch.randn(2).double()}
    data = save(weights, metadata={"format": "pt"})
    size = int.from_bytes(data[:8], "little")
    header = data[8:8 + size].rstrip(b" ") + b" "  # padded to an odd length: every tensor starts unaligned
    if len(header) % 2 == 0:
        header += b" "
    shifted = len(header).to_bytes(8, "little") + header + data[8 + size:]
    assert all(offset % 2 for _, offset in adapter_module._layout(shifted).values())
    for name, tensor in parse_weights(shifted).items():
        assert torch.equal(tensor, weights[name])


def test_a_weights_file_is_read_whole_whatever_its_size_said(tmp_path, monkeypatch):
    """The size `read_weights` allocates for comes from fstat; a file longer or shorter than it said (never in a
    store, whose files are written once) is still read as it is."""
    path = tmp_path / "w.safetensors"
    data = save(_mixed_weights(), metadata={"format": "pt"})
    path.write_bytes(data)
    real = adapter_module.os.fstat
    for lie in (-100, +100):
        monkeypatch.setattr(adapter_module.os, "fstat",
                            lambda fd, lie=lie: type("Stat", (), {"st_size": real(fd).st_size + lie})())
        assert bytes(read_weights(path)) == data
    monkeypatch.setattr(adapter_module.os, "fstat", real)


def test_files_are_read_whole_through_short_reads(tmp_path, monkeypatch):
    """Network and FUSE file systems may hand back fewer bytes than asked for: reading goes on to the end."""
    weights, config = tmp_path / "w.safetensors", tmp_path / "c.json"
    data = save(_mixed_weights(), metadata={"format": "pt"})
    weights.write_bytes(data)
    config.write_bytes(b'{"task": "' + b"x" * 300 + b'"}')
    real_readv, real_read = adapter_module.os.readv, adapter_module.os.read
    monkeypatch.setattr(adapter_module.os, "readv", lambda fd, buffers: real_readv(fd, [buffers[0][:100]]))
    monkeypatch.setattr(adapter_module.os, "read", lambda fd, n: real_read(fd, min(n, 100)))
    assert bytes(read_weights(weights)) == data
    assert read_config(config) == config.read_bytes()


def test_a_config_file_is_read_up_to_one_byte_past_its_cap(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b" " * (3 * MAX_CONFIG_BYTES))
    assert len(read_config(path)) == MAX_CONFIG_BYTES + 1  # enough for the size check to refuse it
    path.write_bytes(b'{"a": 1}')
    assert read_config(path) == b'{"a": 1}'


@pytest.mark.parametrize("name", ["f32", "f16", "bf16", "f64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, -1])
def test_the_stored_values_check_finds_every_non_finite_value(name, bad, where):
    weights = _mixed_weights()
    flat = weights[name].view(-1)
    flat[where] = bad
    data = save(weights, metadata={"format": "pt"})
    layout = adapter_module._layout(data)
    assert stored_values_finite(data, layout) is False
    fine = save(_mixed_weights())
    assert stored_values_finite(fine, adapter_module._layout(fine)) is True
    # One dtype, one span over the whole data section: a value in the last tensor's last place is still read.
    one = {"a": torch.ones(4, dtype=weights[name].dtype), "b": torch.ones(3, dtype=weights[name].dtype)}
    one["b"][where] = bad
    data = save(one)
    assert stored_values_finite(data, adapter_module._layout(data)) is False
    assert value_problems(parse_weights(data), torch.float32) == ["tensor 'b' holds NaN or infinite values"]
