"""The LPT core on a tiny random BERT: split forward, generators, heads, mixed-task forward, adapter format."""

from __future__ import annotations

import io
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AutoModel, AutoModelForMaskedLM

from lpt_serve.model.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterConfig,
    AdapterError,
    TaskAdapter,
    build_adapter,
    check_adapter,
    load_adapter,
    module_tensors,
)
from lpt_serve.model.backbone import Backbone, additive_mask
from lpt_serve.model.engine import classify_rows, encode_texts, pad_rows
from lpt_serve.model.generators import NaivePromptGenerator, PoolingPromptGenerator, adaptive_bins
from lpt_serve.model.heads import VerbalizerHead
from tests.helpers import adapter_files, make_adapter

TEXTS = [
    "a good film",
    "the movie was not very good and it is bad",
    "terrible",
    "great great great film",
    "it",
    "is it a film or a movie? it was very, very bad.",
]


# ------------------------------------------------------------------------------------------------- backbone
def test_plain_forward_equals_transformers(tiny_backbone, tiny_folder):
    reference = AutoModel.from_pretrained(tiny_folder, add_pooling_layer=False, attn_implementation="eager").eval()
    batch = tiny_backbone.tokenize(TEXTS)
    ours = tiny_backbone(batch["input_ids"], batch["attention_mask"])
    theirs = reference(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_split_forward_composes(tiny_backbone):
    batch = tiny_backbone.tokenize(TEXTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    full = tiny_backbone(ids, mask)
    lower = tiny_backbone.lower(ids, mask, upto=2)
    upper = tiny_backbone.run_layers(lower, mask, 2, tiny_backbone.num_layers)
    torch.testing.assert_close(upper, full)


def test_backbone_is_frozen_and_eval(tiny_backbone):
    assert not tiny_backbone.training
    assert all(not p.requires_grad for p in tiny_backbone.parameters())
    tiny_backbone.train()  # asking does not unfreeze: dropout would make the cached lower layers wrong
    assert not tiny_backbone.encoder.training


def test_additive_mask_blocks_padding():
    mask = torch.tensor([[1, 1, 0]])
    ext = additive_mask(mask, torch.float32)
    assert ext.shape == (1, 1, 1, 3)
    assert ext[0, 0, 0, 0] == 0 and ext[0, 0, 0, 2] == torch.finfo(torch.float32).min


# ----------------------------------------------------------------------------------------------- generators
@pytest.mark.parametrize("pooling,reference", [("max", nn.AdaptiveMaxPool1d), ("avg", nn.AdaptiveAvgPool1d)])
@pytest.mark.parametrize("slots", [1, 3, 5, 8])
def test_ppg_pooling_matches_pytorch_per_row(pooling, reference, slots):
    torch.manual_seed(0)
    gen = PoolingPromptGenerator(hidden_size=12, prompt_length=slots, bottleneck=6, pooling=pooling, dropout=0.0)
    lengths = [1, 2, 5, 7, 11, 16]  # ragged, some shorter than the slot count
    hidden = torch.randn(len(lengths), 16, 12)
    mask = torch.zeros(len(lengths), 16, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        hidden[i, n:] = 1e3  # padding must never leak into the pool
    out = gen(hidden, mask)
    assert out.shape == (len(lengths), slots, 12)
    pool = reference(slots)
    for i, n in enumerate(lengths):
        projected = gen.down(hidden[i, :n])  # [n, d]
        pooled = pool(projected.T.unsqueeze(0)).squeeze(0).T  # [L, d]
        expected = gen.up(torch.relu(pooled))
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)


def test_adaptive_bins_follow_floor_ceil_rule():
    bins = adaptive_bins(torch.tensor([7]), 3, 9)[0]
    # slot i covers [floor(i*7/3), ceil((i+1)*7/3)) = [0,3), [2,5), [4,7)
    assert bins.nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [1, 2], [1, 3], [1, 4], [2, 4], [2, 5], [2, 6]]


def test_npg_uses_first_token_only():
    torch.manual_seed(0)
    gen = NaivePromptGenerator(hidden_size=8, prompt_length=4, bottleneck=3, dropout=0.0)
    hidden = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    out = gen(hidden, mask)
    hidden2 = hidden.clone()
    hidden2[:, 1:] = torch.randn(2, 4, 8)
    assert out.shape == (2, 4, 8)
    torch.testing.assert_close(gen(hidden2, mask), out)


def test_parameter_counts_match_the_paper():
    # The paper's counts: h = 1024, d = 128, L = 5 -> NPG 791,680; PPG 263,296 (independent of L).
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(NaivePromptGenerator(1024, 5, 128)) == 791_680
    assert count(PoolingPromptGenerator(1024, 5, 128, "max")) == 263_296
    assert count(PoolingPromptGenerator(1024, 50, 128, "avg")) == 263_296


# --------------------------------------------------------------------------------------------------- heads
def test_verbalizer_reads_the_mlm_head_at_mask(tiny_mlm_backbone, tiny_mlm_folder):
    bb = tiny_mlm_backbone
    reference = AutoModelForMaskedLM.from_pretrained(tiny_mlm_folder, attn_implementation="eager").eval()
    encoded = encode_texts(bb, ["a good film", "it was terrible and bad"], "{text} . it was <mask> .")
    ids, mask = pad_rows([e.input_ids for e in encoded], 0)
    positions = torch.tensor([e.mask_position for e in encoded])
    assert all(ids[i, p] == bb.tokenizer.mask_token_id for i, p in enumerate(positions.tolist()))
    word_ids = [bb.tokenizer.convert_tokens_to_ids(w) for w in ("bad", "good")]
    head = VerbalizerHead(word_ids)
    with torch.no_grad():
        hidden = bb(ids, mask)
        ours = head(hidden, mask, mask.new_zeros(2, 0), positions, bb)
        theirs = reference(input_ids=ids, attention_mask=mask).logits[torch.arange(2), positions][:, word_ids]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_verbalizer_needs_an_mlm_head(tiny_backbone):
    config = AdapterConfig(
        task="v",
        labels=["neg", "pos"],
        head="verbalizer",
        template="{text} it was <mask>",
        label_words=["bad", "good"],
        prompt_layer=1,
        prompt_length=2,
        backbone=tiny_backbone.fingerprint.as_dict(),
    )
    problems = check_adapter(config, {}, tiny_backbone)
    assert any("MLM head" in p for p in problems)


# ------------------------------------------------------------------------------------------- mixed forward
def _task_zoo(bb: Backbone) -> list:
    """Tasks that differ in everything a row can differ in: generator, layer, length, labels, head kind."""
    return [
        make_adapter(bb, "npg-l2", seed=1, generator="npg", prompt_layer=2, prompt_length=5),
        make_adapter(bb, "mppg-l1", seed=2, generator="mppg", prompt_layer=1, prompt_length=3, labels=["a", "b", "c"]),
        make_adapter(bb, "appg-l3", seed=3, generator="appg", prompt_layer=3, prompt_length=7),
        make_adapter(bb, "static", seed=4, method="prompt", generator="static", prompt_layer=0, prompt_length=4),
        make_adapter(
            bb, "cls-pool", seed=5, prompt_layer=2, prompt_length=1, pooling="cls", labels=["w", "x", "y", "z"]
        ),
        make_adapter(
            bb,
            "verb",
            seed=6,
            prompt_layer=2,
            prompt_length=2,
            head="verbalizer",
            template="{text} . it was <mask> .",
            label_words=["bad", "good"],
        ),
    ]


@pytest.fixture(scope="module")
def zoo(tiny_mlm_backbone):
    return _task_zoo(tiny_mlm_backbone)


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def mixed_backbone(request, tiny_mlm_folder, tmp_path_factory) -> Backbone:
    return Backbone.load(tiny_mlm_folder, device="cpu", dtype="float32", runtime=request.param,
                         onnx_cache_dir=tmp_path_factory.mktemp("onnx-cache"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mixed_batch_row_equals_row_alone(mixed_backbone, zoo, data):
    bb = mixed_backbone
    word = st.sampled_from(["good", "bad", "film", "not", "very", "it", "was", "zq", "!", "42"])
    text = st.lists(word, min_size=1, max_size=20).map(" ".join)
    rows = data.draw(st.lists(st.tuples(st.sampled_from(range(len(zoo))), text), min_size=1, max_size=12))
    adapters = [zoo[i] for i, _ in rows]
    encoded = [encode_texts(bb, [t], a.config.template)[0] for a, (_, t) in zip(adapters, rows, strict=True)]
    mixed = classify_rows(bb, adapters, encoded)
    for adapter, enc, probs in zip(adapters, encoded, mixed, strict=True):
        alone = classify_rows(bb, [adapter], [enc])[0]
        assert probs.shape == (len(adapter.labels),)
        torch.testing.assert_close(probs, alone, atol=1e-5, rtol=0)


def test_identical_rows_share_the_lower_layers(tiny_mlm_backbone, zoo, monkeypatch):
    bb = tiny_mlm_backbone
    linear = [a for a in zoo if a.config.template is None]
    seen = []
    original = bb.lower

    def spy(ids, mask, upto, token_type_ids=None):
        seen.append((ids.shape[0], upto))
        return original(ids, mask, upto, token_type_ids)

    monkeypatch.setattr(bb, "lower", spy)
    encoded = encode_texts(bb, ["the same text"] * len(linear) + ["another one"])
    probs = classify_rows(bb, [*linear, linear[0]], encoded)
    assert seen == [(2, min(a.config.prompt_layer for a in linear))]  # two distinct texts, one lower pass
    assert len(probs) == len(linear) + 1


def test_truncation_keeps_the_template(tiny_mlm_backbone):
    bb = tiny_mlm_backbone
    long_text = " ".join(["good"] * 500)
    [enc] = encode_texts(bb, [long_text], "{text} . it was <mask> .")
    assert enc.truncated and len(enc.input_ids) == bb.max_length
    assert enc.input_ids[enc.mask_position] == bb.tokenizer.mask_token_id
    [short] = encode_texts(bb, ["good"], "{text} . it was <mask> .")
    assert not short.truncated


# ---------------------------------------------------------------------------------------------- the format
def test_save_load_round_trip(tiny_mlm_backbone, zoo, tmp_path):
    bb = tiny_mlm_backbone
    for adapter in zoo:
        folder = adapter.save(tmp_path / adapter.task)
        config = json.loads((folder / CONFIG_NAME).read_text())
        assert config["backbone"]["vocab_hash"] == bb.fingerprint.vocab_hash
        loaded = load_adapter(folder, bb)
        for (k, v), (k2, v2) in zip(adapter.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert k == k2
            torch.testing.assert_close(v, v2)
        enc = encode_texts(bb, ["a good film"], adapter.config.template)
        torch.testing.assert_close(classify_rows(bb, [loaded], enc)[0], classify_rows(bb, [adapter], enc)[0])


def test_loads_of_one_structure_share_nothing(tiny_mlm_backbone, zoo, tmp_path):
    """Loads copy one module tree per adapter structure: each load must still be its own adapter, built as
    `TaskAdapter(config)` builds it (same modules, sizes, dropout, eval mode), with its own config and containers."""
    bb = tiny_mlm_backbone
    for adapter in zoo:
        reference = TaskAdapter(adapter.config, adapter.head.label_word_ids.tolist()
                                if adapter.config.head == "verbalizer" else None).eval()
        first = load_adapter(adapter.save(tmp_path / f"{adapter.task}-1"), bb)
        second_adapter = make_adapter(bb, "other", seed=99, **adapter.config.model_dump(
            exclude={"task", "labels", "backbone", "format_version", "training"}), labels=adapter.config.labels)
        second = load_adapter(second_adapter.save(tmp_path / f"{adapter.task}-2"), bb)
        for loaded, source in ((first, adapter), (second, second_adapter)):
            assert repr(loaded) == repr(reference)
            assert [type(m) for m in loaded.modules()] == [type(m) for m in reference.modules()]
            assert not any(m.training for m in loaded.modules())
            assert not any(p.requires_grad or p.is_meta for p in loaded.parameters())
            assert loaded.config == source.config
        assert first.task == adapter.task and second.task == "other"
        assert not {id(p) for p in first.parameters()} & {id(p) for p in second.parameters()}
        assert not {id(m) for m in first.modules()} & {id(m) for m in second.modules()}
        # A hook or a new submodule on one adapter must not reach another adapter of the same structure.
        first.generator.register_forward_hook(lambda *args: None)
        first.head.extra = nn.Identity()
        assert not second.generator._forward_hooks and "extra" not in second.head._modules
        second.generator.register_forward_hook(lambda *args: None)
        assert len(first.generator._forward_hooks) == 1
        enc = encode_texts(bb, ["a good film"], adapter.config.template)
        torch.testing.assert_close(classify_rows(bb, [second], enc)[0], classify_rows(bb, [second_adapter], enc)[0])


def test_an_adapters_tensors_are_its_parameters_and_buffers(zoo):
    for adapter in zoo:
        expected = [*adapter.parameters(), *adapter.buffers()]
        assert {id(t) for t in module_tensors(adapter)} == {id(t) for t in expected}
        assert len(module_tensors(adapter)) == len(expected)
        assert {id(t) for t in module_tensors(adapter, buffers=False)} == {id(p) for p in adapter.parameters()}
        assert adapter.nbytes() == sum(t.numel() * t.element_size() for t in expected)
    shared = nn.Sequential(nn.Linear(2, 2))
    shared.append(shared[0])  # one module twice: its tensors once
    assert len(module_tensors(shared)) == 2


def test_a_change_of_dropout_or_size_builds_another_structure(tiny_backbone, tmp_path):
    for overrides in ({}, {"dropout": 0.3}, {"bottleneck": 8}, {"prompt_length": 3}, {"pooling": "cls"}):
        adapter = make_adapter(tiny_backbone, "t", **overrides)
        loaded = load_adapter(adapter.save(tmp_path / str(overrides)), tiny_backbone)
        assert repr(loaded) == repr(TaskAdapter(adapter.config)), overrides
        assert loaded.head.pooling == adapter.config.pooling


def _reworked(config_bytes: bytes, **changes) -> bytes:
    data = json.loads(config_bytes)
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            data[outer][inner] = value
        else:
            data[key] = value
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"backbone.hidden_size": 64}, "hidden size is 64"),
        ({"backbone.num_layers": 12}, "layer count is 12"),
        ({"backbone.vocab_hash": "sha256:0000"}, "vocabulary differs"),
        ({"backbone.name": "roberta-large"}, "trained on backbone 'roberta-large'"),
        ({"prompt_layer": 4}, "prompt layer 4 is out of range 0..3"),
        ({"prompt_length": 9}, "tensor 'generator.up.weight' has shape"),
        ({"labels": ["a", "b", "c"]}, "tensor 'head.classifier.weight' has shape"),
        ({"labels": ["a"]}, "labels"),
        ({"generator": "mppg"}, "shape"),
        ({"generator": "bogus"}, "generator"),
    ],
)
def test_mismatches_are_named(tiny_backbone, tmp_path, changes, expected):
    adapter = make_adapter(tiny_backbone, "t", prompt_layer=2)
    config_bytes, weights = adapter_files(adapter, tmp_path)
    with pytest.raises(AdapterError) as info:
        build_adapter(_reworked(config_bytes, **changes), weights, tiny_backbone)
    assert expected in str(info.value)


def test_missing_and_extra_tensors_are_named(tiny_backbone, tmp_path):
    from safetensors.torch import load, save

    adapter = make_adapter(tiny_backbone, "t")
    config_bytes, weights = adapter_files(adapter, tmp_path)
    tensors = load(weights)
    tensors.pop("head.classifier.bias")
    tensors["surprise"] = torch.zeros(3)
    with pytest.raises(AdapterError) as info:
        build_adapter(config_bytes, save(tensors), tiny_backbone)
    assert "tensor 'head.classifier.bias' is missing" in info.value.problems
    assert any("'surprise'" in p for p in info.value.problems)


def test_pickles_are_refused_without_unpickling(tiny_backbone, tmp_path):
    adapter = make_adapter(tiny_backbone, "t")
    config_bytes, _ = adapter_files(adapter, tmp_path)
    buffer = io.BytesIO()
    torch.save(adapter.state_dict(), buffer)
    with pytest.raises(AdapterError, match="pickle"):
        build_adapter(config_bytes, buffer.getvalue(), tiny_backbone)
    with pytest.raises(AdapterError, match="not a valid safetensors"):
        build_adapter(config_bytes, b"\x00" * 64, tiny_backbone)


def test_nan_weights_are_refused(tiny_backbone, tmp_path):
    from safetensors.torch import load, save

    config_bytes, weights = adapter_files(make_adapter(tiny_backbone, "t"), tmp_path)
    tensors = load(weights)
    tensors["head.classifier.bias"][0] = float("nan")
    with pytest.raises(AdapterError, match="NaN"):
        build_adapter(config_bytes, save(tensors), tiny_backbone)


def test_weights_file_is_safetensors_with_format_metadata(tiny_backbone, tmp_path):
    from safetensors import safe_open

    folder = make_adapter(tiny_backbone, "t").save(tmp_path / "a")
    with safe_open(folder / WEIGHTS_NAME, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    text = (folder / CONFIG_NAME).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
