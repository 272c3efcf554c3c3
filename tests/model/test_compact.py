"""Compact adapters: weights stored in fp16 or bf16 load and serve, stay in their stored dtype in memory (half the
bytes), and are cast to the pass's dtype when they run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load, save

from lpt_serve.cli import main as lpt
from lpt_serve.errors import AdapterError
from lpt_serve.format import CONFIG_NAME, WEIGHTS_NAME
from lpt_serve.model import engine
from lpt_serve.model.adapter import (
    all_finite,
    build_adapter,
    compact_adapter,
    compact_weights,
    load_adapter,
    read_header,
)
from lpt_serve.model.engine import classify_rows, encode_texts
from tests.helpers import adapter_files, make_adapter

TEXTS = ["a good film", "it was not very good and it is bad", "terrible", "42 !"]
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
HEADER_NAMES = {"fp16": "F16", "bf16": "BF16"}


def _body_bytes(weights: Path) -> int:
    """The tensors' bytes in a safetensors file: all of it but the 8-byte length and the JSON header."""
    data = weights.read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


def _nbytes(adapter) -> int:
    return sum(t.numel() * t.element_size() for t in adapter.state_dict().values())


@pytest.fixture(scope="module")
def saved(tiny_mlm_backbone, tmp_path_factory) -> dict[str, Path]:
    """Adapters of every generator and head kind, saved in fp32."""
    bb = tiny_mlm_backbone
    root = tmp_path_factory.mktemp("fp32")
    adapters = [
        make_adapter(bb, "npg", seed=1, generator="npg", prompt_layer=2, prompt_length=5),
        make_adapter(bb, "mppg", seed=2, generator="mppg", prompt_layer=1, prompt_length=3, labels=["a", "b", "c"]),
        make_adapter(bb, "static", seed=3, method="prompt", generator="static", prompt_layer=0, prompt_length=4),
        make_adapter(bb, "verb", seed=4, prompt_layer=2, prompt_length=2, head="verbalizer",
                     template="{text} . it was <mask> .", label_words=["bad", "good"]),
    ]
    return {a.task: a.save(root / a.task) for a in adapters}


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compact_adapters_load_serve_and_stay_compact(tiny_mlm_backbone, saved, tmp_path, dtype):
    bb = tiny_mlm_backbone
    for task, folder in saved.items():
        full = load_adapter(folder, bb)
        out = compact_adapter(folder, dtype, tmp_path / f"{task}-{dtype}")
        header = read_header((out / WEIGHTS_NAME).read_bytes())
        assert {spec.dtype for spec in header.values()} == {HEADER_NAMES[dtype]}
        assert (out / CONFIG_NAME).read_bytes() == (folder / CONFIG_NAME).read_bytes()
        assert _body_bytes(out / WEIGHTS_NAME) * 2 == _body_bytes(folder / WEIGHTS_NAME)

        compact = load_adapter(out, bb)
        assert compact.storage_dtypes == {HALF[dtype]}  # kept as stored, not widened on load
        assert _nbytes(compact) * 2 == _nbytes(full)
        encoded = encode_texts(bb, TEXTS, full.config.template)
        got = classify_rows(bb, [compact] * len(TEXTS), encoded)
        want = classify_rows(bb, [full] * len(TEXTS), encoded)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, atol=2e-2, rtol=0)  # the rounding of the weights, no more
        assert compact.storage_dtypes == {HALF[dtype]}  # running it cast a copy, not the stored weights


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compact_and_full_tasks_group_and_answer_as_alone(tiny_mlm_backbone, tmp_path, monkeypatch, dtype):
    bb = tiny_mlm_backbone
    monkeypatch.setattr(engine, "GROUP_MIN_TASKS", 2)
    monkeypatch.setattr(engine, "GROUP_ON_CPU", True)
    tasks = []
    for i in range(4):
        folder = make_adapter(bb, f"t{i}", seed=i, prompt_layer=2).save(tmp_path / f"t{i}")
        tasks.append(load_adapter(compact_adapter(folder, dtype, tmp_path / f"t{i}-c") if i % 2 else folder, bb))
    adapters = tasks * 2
    encoded = encode_texts(bb, ["good film"] * len(adapters))
    mixed = classify_rows(bb, adapters, encoded)
    for adapter, enc, probs in zip(adapters, encoded, mixed, strict=True):
        torch.testing.assert_close(probs, classify_rows(bb, [adapter], [enc])[0], atol=1e-5, rtol=0)


def test_half_precision_files_made_elsewhere_load(tiny_backbone, tmp_path):
    bb = tiny_backbone
    config, weights = adapter_files(make_adapter(bb, "elsewhere", seed=5), tmp_path / "a")
    halves = {k: t.to(torch.bfloat16) for k, t in load(weights).items()}
    adapter = build_adapter(config, save(halves, metadata={"format": "pt"}), bb)
    assert adapter.storage_dtypes == {torch.bfloat16}
    mixed = load(weights) | {"head.classifier.weight": load(weights)["head.classifier.weight"].half()}
    adapter = build_adapter(config, save(mixed, metadata={"format": "pt"}), bb)  # one tensor compact: still fine
    assert adapter.storage_dtypes == {torch.float32, torch.float16}
    classify_rows(bb, [adapter], encode_texts(bb, ["fine"]))


def test_fp16_refuses_weights_beyond_its_range_and_bf16_keeps_them(tiny_backbone, tmp_path):
    bb = tiny_backbone
    adapter = make_adapter(bb, "wide", seed=6)
    with torch.no_grad():
        adapter.head.classifier.bias.fill_(1e5)
    folder = adapter.save(tmp_path / "wide")
    with pytest.raises(AdapterError) as info:
        compact_adapter(folder, "fp16", tmp_path / "wide-fp16")
    assert info.value.problems == ["tensor 'head.classifier.bias' holds values beyond torch.float16's range "
                                   "(+-6.55e+04): use bf16, which keeps fp32's range"]
    assert not (tmp_path / "wide-fp16").exists()
    out = compact_adapter(folder, "bf16", tmp_path / "wide-bf16")
    assert load_adapter(out, bb).head.classifier.bias.dtype == torch.bfloat16
    with pytest.raises(AdapterError, match="compact dtype must be one of fp16, bf16"):
        compact_weights({}, torch.float64)


def test_a_reloaded_compact_adapter_saves_compact(tiny_backbone, tmp_path):
    bb = tiny_backbone
    folder = make_adapter(bb, "again", seed=7).save(tmp_path / "again")
    compact = load_adapter(compact_adapter(folder, "bf16", tmp_path / "again-bf16"), bb)
    resaved = compact.save(tmp_path / "resaved")
    assert {s.dtype for s in read_header((resaved / WEIGHTS_NAME).read_bytes()).values()} == {"BF16"}


values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -0.0, 1e-40]))


@given(st.lists(values, min_size=1, max_size=20), st.sampled_from([torch.float16, torch.bfloat16, torch.float32,
                                                                   torch.float64]))
def test_the_bitwise_finiteness_check_agrees_with_torch(numbers, dtype):
    tensor = torch.tensor(numbers, dtype=torch.float32).to(dtype)
    assert all_finite(tensor) == bool(torch.isfinite(tensor).all())
    assert all_finite(tensor[::2]) == bool(torch.isfinite(tensor[::2]).all())  # not contiguous


# ---------------------------------------------------------------------------------------------- lpt compact
def test_lpt_compact_writes_a_copy_beside_the_source(tiny_backbone, tmp_path, capsys):
    folder = make_adapter(tiny_backbone, "cli", seed=8).save(tmp_path / "cli")
    assert lpt(["compact", str(folder), "--dtype", "fp16"]) == 0
    report = json.loads(capsys.readouterr().out)
    out = tmp_path / "cli-fp16"
    assert report["out"] == str(out) and report["dtype"] == "fp16"
    assert report["weights_bytes"] == (out / WEIGHTS_NAME).stat().st_size < report["source_weights_bytes"]
    assert load_adapter(out, tiny_backbone).storage_dtypes == {torch.float16}

    assert lpt(["compact", str(folder), "--dtype", "bf16", "--out", str(tmp_path / "x")]) == 0
    assert {s.dtype for s in read_header((tmp_path / "x" / WEIGHTS_NAME).read_bytes()).values()} == {"BF16"}


def test_lpt_compact_names_what_is_wrong(tmp_path, capsys):
    assert lpt(["compact", str(tmp_path / "missing"), "--dtype", "bf16"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert lpt(["compact", str(tmp_path / "empty"), "--dtype", "bf16"]) == 2
    assert "is not an adapter directory" in capsys.readouterr().err


def test_serving_placement_keeps_compact_weights_and_narrows_wide_ones(tiny_backbone, tmp_path):
    bb = tiny_backbone
    folder = make_adapter(bb, "placed", seed=9).save(tmp_path / "placed")
    compact = load_adapter(compact_adapter(folder, "bf16", tmp_path / "placed-bf16"), bb)
    assert compact.to_serving("cpu", torch.float32).storage_dtypes == {torch.bfloat16}  # half the bytes stay half
    full = load_adapter(folder, bb)
    assert full.to_serving("cpu", torch.float32).storage_dtypes == {torch.float32}
    assert full.to_serving("cpu", torch.bfloat16).storage_dtypes == {torch.bfloat16}  # as a bf16 server did before
    fp16 = load_adapter(compact_adapter(folder, "fp16", tmp_path / "placed-fp16"), bb)
    assert fp16.to_serving("cpu", torch.bfloat16).storage_dtypes == {torch.float16}  # same width: kept, cast when run


@pytest.mark.parametrize("dtype", ["bf16", None])
def test_a_listed_task_not_in_memory_reports_the_bytes_it_takes_once_loaded(tiny_backbone, tmp_path, dtype):
    from lpt_serve.serving.registry import Registry
    from lpt_serve.serving.store import AdapterStore

    folder = make_adapter(tiny_backbone, "sized", seed=4).save(tmp_path / "sized")
    if dtype is not None:
        folder = compact_adapter(folder, dtype, tmp_path / f"sized-{dtype}")
    store = AdapterStore(tmp_path / "store")
    store.commit_dir("sized", folder)
    registry = Registry(tiny_backbone, store)
    registry.load_all()
    entry = registry.entry("sized")
    assert registry.loaded("sized") is None
    estimate = registry.estimated_size(registry.config(entry), entry.path / WEIGHTS_NAME)
    served = registry.get("sized")
    assert estimate == (served.adapter.num_parameters(), served.nbytes)
