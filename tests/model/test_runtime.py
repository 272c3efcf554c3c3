"""The encoder runtimes: ONNX Runtime computes what torch and transformers compute, its graph cache is keyed by the
weights and survives damage, and it never stands where gradients must flow."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModel

from lpt_serve.errors import BackboneError
from lpt_serve.model.backbone import Backbone
from lpt_serve.model.runtime import (
    EMBEDDINGS_FILE,
    MANIFEST_FILE,
    SUPERSEDED_AFTER_S,
    USED_FILE,
    TorchRuntime,
    UnpaddedLayerGraph,
    additive_mask,
    layer_file,
    padding_free_misfit,
    rounded_rows,
    unpadded_misfit,
)
from tests.tiny import make_tiny_bert

TEXTS = [
    "a good film",
    "the movie was not very good and it is bad",
    "terrible",
    "is it a film or a movie? it was very, very bad.",
]


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def ort_backbone(tiny_folder, onnx_cache) -> Backbone:
    return Backbone.load(tiny_folder, device="cpu", dtype="float32", runtime="onnxruntime", onnx_cache_dir=onnx_cache)


@pytest.fixture(scope="session")
def torch_backbone(tiny_folder) -> Backbone:
    return Backbone.load(tiny_folder, device="cpu", dtype="float32", runtime="torch")


def load_ort(folder, cache_dir) -> Backbone:
    return Backbone.load(folder, device="cpu", dtype="float32", runtime="onnxruntime", onnx_cache_dir=cache_dir)


def graph_files(backbone: Backbone) -> list[str]:
    return [EMBEDDINGS_FILE, *(layer_file(i) for i in range(backbone.num_layers))]


# ---------------------------------------------------------------------------------------------- equality
def test_plain_forward_on_onnxruntime_equals_transformers_and_torch(ort_backbone, torch_backbone, tiny_folder):
    assert ort_backbone.runtime.name == "onnxruntime" and torch_backbone.runtime.name == "torch"
    reference = AutoModel.from_pretrained(tiny_folder, add_pooling_layer=False, attn_implementation="eager").eval()
    batch = ort_backbone.tokenize(TEXTS)
    with torch.inference_mode():
        ours = ort_backbone(batch["input_ids"], batch["attention_mask"])
        on_torch = torch_backbone(batch["input_ids"], batch["attention_mask"])
        theirs = reference(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[real], on_torch[real], atol=1e-4, rtol=1e-4)


def test_split_forward_on_onnxruntime_composes_at_every_layer(ort_backbone, torch_backbone):
    batch = ort_backbone.tokenize(TEXTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.bool()
    with torch.inference_mode():
        full = ort_backbone(ids, mask)
        for k in range(ort_backbone.num_layers + 1):
            lower = ort_backbone.lower(ids, mask, upto=k)
            torch.testing.assert_close(lower[real], torch_backbone.lower(ids, mask, upto=k)[real], atol=1e-4,
                                       rtol=1e-4)
            upper = ort_backbone.run_layers(lower, mask, k, ort_backbone.num_layers)
            torch.testing.assert_close(upper, full, atol=1e-5, rtol=1e-5)


def test_layers_compute_real_tokens_only_and_pass_padding_through(ort_backbone, torch_backbone):
    # The mixed pass's layout: empty prompt slots first for some rows, padding at the end for others.
    assert ort_backbone.runtime.forms == ("unpadded",) * ort_backbone.num_layers
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 11, ort_backbone.hidden_size, generator=gen)
    mask = torch.ones(4, 11, dtype=torch.long)
    mask[0, :5] = 0  # no prompt
    mask[1, 2:5] = 0  # a 2-token prompt in 5 slots
    mask[2, 8:] = 0
    mask[3, :5] = 0
    mask[3, 7:] = 0
    real = mask.bool()
    with torch.inference_mode():
        ours = ort_backbone.run_layers(hidden, mask, 1, ort_backbone.num_layers)
        theirs = torch_backbone.run_layers(hidden, mask, 1, ort_backbone.num_layers)
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    # A padded position is never computed: what went in comes out, finite, so masked pooling stays exact.
    torch.testing.assert_close(ours[~real], hidden[~real], atol=0, rtol=0)


def modules_forward(backbone: Backbone, hidden: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    """The layers as transformers runs them: every position, padded or not."""
    bias = additive_mask(mask, hidden.dtype)
    for layer in backbone.layers[start:]:
        out = layer(hidden, attention_mask=bias)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def test_the_torch_runtime_runs_padding_free_without_gradients_and_as_the_modules_with_them(torch_backbone):
    assert all(torch_backbone.runtime.unpadded)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 9, torch_backbone.hidden_size, generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0  # empty prompt slots
    mask[1, 6:] = 0  # padding at the end
    real = mask.bool()
    with torch.inference_mode():
        free = torch_backbone.run_layers(hidden, mask, 1, torch_backbone.num_layers)
        reference = modules_forward(torch_backbone, hidden, mask, 1)
    torch.testing.assert_close(free[real], reference[real], atol=1e-5, rtol=1e-5)
    # Padded positions are not computed: what went in comes out (the modules would have changed them).
    torch.testing.assert_close(free[~real], hidden[~real], atol=0, rtol=0)
    assert not torch.allclose(reference[~real], hidden[~real])
    # With gradients (the trainer) the modules run as they are, padded positions and all.
    with torch.enable_grad():
        trained = torch_backbone.run_layers(hidden.clone().requires_grad_(True), mask, 1, torch_backbone.num_layers)
    torch.testing.assert_close(trained.detach(), reference, atol=1e-5, rtol=1e-5)


def test_in_half_precision_on_the_cpu_the_padding_free_path_keeps_to_few_matrix_shapes(tiny_folder):
    # oneDNN builds a kernel per new shape in bf16 on the CPU: the packed tokens are topped up with zero rows to
    # one of a few counts, which must change nothing a real or padded position gets.
    seen: list[int] = []

    def run(dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        backbone = Backbone.load(tiny_folder, device="cpu", dtype=dtype, runtime="torch")
        assert all(backbone.runtime.unpadded)
        gen = torch.Generator().manual_seed(11)
        hidden = torch.randn(3, 9, backbone.hidden_size, generator=gen).to(backbone.dtype)
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[0, :4] = 0
        mask[1, 6:] = 0
        hook = backbone.layers[0].attention.self.query.register_forward_pre_hook(
            lambda module, args: seen.append(args[0].shape[0]))
        with torch.inference_mode():
            free = backbone.run_layers(hidden, mask, 0, backbone.num_layers)
        hook.remove()
        with torch.inference_mode():
            reference = modules_forward(backbone, hidden, mask, 0)
        return hidden, mask.bool(), free, reference

    hidden, real, free, reference = run("bfloat16")
    count = int(real.sum())
    assert seen == [rounded_rows(count)] and rounded_rows(count) > count
    torch.testing.assert_close(free[real].float(), reference[real].float(), atol=6e-2, rtol=6e-2)
    torch.testing.assert_close(free[~real], hidden[~real], atol=0, rtol=0)
    seen.clear()
    run("float32")
    assert seen == [count]  # fp32 (MKL, no kernel per shape) takes its rows as they are


def test_rounded_rows_are_few_and_waste_little():
    counts = range(1, 16385)
    rounded = [rounded_rows(c) for c in counts]
    assert all(r >= c for c, r in zip(counts, rounded, strict=True))
    assert all(r <= c * 1.125 for c, r in zip(counts, rounded, strict=True) if c > 128)
    assert rounded == sorted(rounded) and len(set(rounded)) <= 64


def test_the_padding_free_path_runs_what_wraps_the_layers_submodules(tiny_folder):
    # LoRA (the trainer's baseline) wraps query and value after the backbone is built; evaluation runs without
    # gradients, so the padding-free path must apply it as the modules do.
    from peft import LoraConfig, inject_adapter_in_model

    backbone = Backbone.load(tiny_folder, device="cpu", dtype="float32", runtime="torch")
    plain = Backbone.load(tiny_folder, device="cpu", dtype="float32", runtime="torch")
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]), backbone.encoder)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in backbone.encoder.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give the adapter something to add
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    hidden = torch.randn(3, 9, backbone.hidden_size, generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    real = mask.bool()
    with torch.inference_mode():
        free = backbone.run_layers(hidden, mask, 0, backbone.num_layers)
        without_lora = plain.run_layers(hidden, mask, 0, plain.num_layers)
    with torch.enable_grad():
        modules = backbone.run_layers(hidden, mask, 0, backbone.num_layers)
    torch.testing.assert_close(free[real], modules.detach()[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(free[real], without_lora[real], atol=1e-3)


def test_a_layer_of_bert_shape_that_computes_otherwise_runs_as_it_is():
    # XLM-RoBERTa-XL's layers have BERT's submodules but normalise before attention (pre-LN).
    from transformers import XLMRobertaXLConfig, XLMRobertaXLModel

    torch.manual_seed(0)
    config = XLMRobertaXLConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=100)
    layer = XLMRobertaXLModel(config, add_pooling_layer=False).eval().encoder.layer[0]
    assert unpadded_misfit(layer) is None  # the structure alone would let it through
    assert "probe" in padding_free_misfit(layer)
    runtime = TorchRuntime(nn.Identity(), [layer])
    hidden, mask = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.inference_mode():
        ours = runtime.run_layers(hidden, mask, 0, 1)
        out = layer(hidden, attention_mask=additive_mask(mask, hidden.dtype))
    theirs = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(ours, theirs)


def test_gradients_flow_through_the_layers_on_torch(ort_backbone, torch_backbone):
    # The trainer's pass: hidden states that require grad (prompts inserted) must reach the loss through the layers.
    batch = ort_backbone.tokenize(TEXTS[:2])
    mask = batch["attention_mask"]
    with torch.no_grad():
        start = ort_backbone.lower(batch["input_ids"], mask, upto=1)
    grads = []
    for backbone in (ort_backbone, torch_backbone):
        hidden = start.clone().requires_grad_(True)
        backbone.run_layers(hidden, mask, 1, backbone.num_layers).sum().backward()
        grads.append(hidden.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_unfreeze_leaves_onnxruntime_for_good(tiny_folder, onnx_cache):
    backbone = load_ort(tiny_folder, onnx_cache)
    assert backbone.runtime.name == "onnxruntime"
    backbone.unfreeze()  # full fine-tuning: the exported graphs would hold stale weights
    assert backbone.runtime.name == "torch"
    assert backbone.use_runtime("auto") == "torch"
    with pytest.raises(BackboneError, match="stale"):
        backbone.use_runtime("onnxruntime")


def test_a_layer_the_unpadded_form_cannot_take_or_gets_wrong_is_exported_padded(tiny_folder, torch_backbone,
                                                                              tmp_path, monkeypatch):
    assert unpadded_misfit(torch_backbone.layers[0]) is None
    assert "not a BERT-style layer" in unpadded_misfit(torch.nn.Linear(4, 4))

    # An unpadded graph that computes the wrong thing (a layer whose attention differs from BERT's would): the probe
    # catches it, and the layer is exported the plain way, which matches.
    def wrong(self, hidden, mask):
        return hidden * 2

    monkeypatch.setattr(UnpaddedLayerGraph, "forward", wrong)
    backbone = load_ort(tiny_folder, tmp_path)
    assert backbone.runtime.forms == ("padded",) * backbone.num_layers
    batch = backbone.tokenize(TEXTS)
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        ours = backbone(batch["input_ids"], batch["attention_mask"])
        theirs = torch_backbone(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    manifest = json.loads((backbone.runtime.cache_dir / MANIFEST_FILE).read_text())
    assert {manifest["files"][layer_file(i)]["form"] for i in range(backbone.num_layers)} == {"padded"}


def test_torch_steps_down_to_one_thread_while_onnxruntime_computes(tiny_folder, onnx_cache):
    # torch's thread count is process-wide, and other tests hold onnxruntime backbones: a process of its own.
    script = textwrap.dedent(f"""
        import torch
        from lpt_serve.model.backbone import Backbone
        torch.set_num_threads(2)
        backbone = Backbone.load({str(tiny_folder)!r}, device="cpu", dtype="float32", runtime="onnxruntime",
                                 onnx_cache_dir={str(onnx_cache)!r})
        print(backbone.runtime.threads, torch.get_num_threads())
        backbone.use_runtime("torch")
        print(torch.get_num_threads())
        backbone.use_runtime("onnxruntime", cache_dir={str(onnx_cache)!r}, torch_threads=None)
        print(backbone.runtime.threads, torch.get_num_threads())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    on_ort, back_on_torch, left_alone = out.stdout.split("\n")[:3]
    assert on_ort == "2 1"  # ORT gets the cores torch had; torch keeps one for the prompts and heads
    assert back_on_torch == "2"
    assert left_alone == "2 2"


# ----------------------------------------------------------------------------------------------- the cache
def test_a_second_load_reuses_the_exported_graphs(tiny_folder, tmp_path):
    first = load_ort(tiny_folder, tmp_path)
    names = graph_files(first)
    assert sorted(first.runtime.exported) == sorted(names)
    folder = first.runtime.cache_dir
    files = [*names, MANIFEST_FILE]
    stamps = {n: (folder / n).stat().st_mtime_ns for n in files}
    second = load_ort(tiny_folder, tmp_path)
    assert second.runtime.exported == ()
    assert second.runtime.cache_dir == folder
    assert {n: (folder / n).stat().st_mtime_ns for n in files} == stamps  # nothing written: a read-only cache works


@pytest.mark.parametrize("damage", ["truncated", "garbage", "deleted", "unlisted", "swapped"])
def test_a_damaged_graph_file_is_exported_again(tiny_folder, ort_backbone, onnx_cache, torch_backbone, tmp_path,
                                                damage):
    # A copy of the session's intact cache, so only the damaged file costs an export.
    shutil.copytree(onnx_cache, tmp_path, dirs_exist_ok=True)
    folder = tmp_path / ort_backbone.runtime.cache_dir.name
    victim = folder / layer_file(1)
    if damage == "truncated":  # a crash mid-write (of a file not written atomically) looks like this
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "garbage":  # same size, other bytes
        victim.write_bytes(bytes(victim.stat().st_size))
    elif damage == "deleted":
        victim.unlink()
        (folder / f".{victim.name}.123.456.tmp").write_bytes(b"half an export")  # a crashed exporter's leftover
    elif damage == "unlisted":  # the file landed but the manifest that vouches for it did not
        (folder / MANIFEST_FILE).write_text("{")
    else:  # bytes the manifest vouches for that compute another layer: only the probe against torch can tell
        data = (folder / layer_file(0)).read_bytes()
        victim.write_bytes(data)
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        manifest["files"][victim.name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    again = load_ort(tiny_folder, tmp_path)
    expected = graph_files(ort_backbone) if damage == "unlisted" else [victim.name]
    assert sorted(again.runtime.exported) == sorted(expected)
    batch = again.tokenize(TEXTS)
    with torch.inference_mode():
        ours = again(batch["input_ids"], batch["attention_mask"])
        theirs = torch_backbone(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    assert load_ort(tiny_folder, tmp_path).runtime.exported == ()  # and the repaired entry is trusted again


def test_different_weights_with_the_same_fingerprint_never_share_graphs(tmp_path):
    folders = [make_tiny_bert(tmp_path / name / "tiny", seed=seed) for name, seed in (("a", 0), ("b", 1))]
    cache = tmp_path / "cache"
    ort_a, ort_b = (load_ort(f, cache) for f in folders)
    assert ort_a.fingerprint == ort_b.fingerprint
    assert ort_a.runtime.cache_dir != ort_b.runtime.cache_dir
    assert ort_b.runtime.exported  # b found nothing of a's to reuse
    batch = ort_a.tokenize(TEXTS)
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        for folder, ort_backbone in zip(folders, (ort_a, ort_b), strict=True):
            reference = Backbone.load(folder, device="cpu", dtype="float32", runtime="torch")
            ours = ort_backbone(batch["input_ids"], batch["attention_mask"])
            theirs = reference(batch["input_ids"], batch["attention_mask"])
            torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


def test_an_export_removes_the_same_weights_exported_by_other_versions_a_day_old(tiny_folder, tmp_path):
    cache = tmp_path / "cache"
    folder = load_ort(tiny_folder, cache).runtime.cache_dir
    key = json.loads((folder / MANIFEST_FILE).read_text())["key"]
    day_old = time.time() - SUPERSEDED_AFTER_S - 60

    def entry(name: str, entry_key: dict, mtime: float) -> Path:
        path = cache / name
        path.mkdir()
        (path / layer_file(0)).write_bytes(b"x" * 1000)
        (path / MANIFEST_FILE).write_text(json.dumps({"key": entry_key, "files": {}}))
        os.utime(path / MANIFEST_FILE, (mtime, mtime))
        return path

    superseded = entry("tiny-old-ort", {**key, "onnxruntime": "1.0.0"}, day_old)
    recent = entry("tiny-new-torch", {**key, "torch": "9.9.9"}, time.time())  # a rolling upgrade's other half
    in_use = entry("tiny-old-torch", {**key, "torch": "1.0.0"}, day_old)
    (in_use / USED_FILE).touch()  # exported long ago, but a replica started from it an hour ago
    busy = entry("tiny-busy", {**key, "opset": 1}, day_old)
    other_weights = entry("tiny-other", {**key, "weights_sha256": "0" * 64}, day_old)
    foreign = cache / "not-ours"
    foreign.mkdir()
    leftover = cache / ".tiny-older.1.2.removing"  # a removal cut short
    leftover.mkdir()
    # A start from the cache removes nothing...
    assert load_ort(tiny_folder, cache).runtime.exported == ()
    assert superseded.exists()
    # ...an export does, but not an entry another process is exporting into.
    shutil.rmtree(folder)
    with (busy / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert load_ort(tiny_folder, cache).runtime.exported
    assert not superseded.exists() and not leftover.exists()
    assert all(p.exists() for p in (recent, in_use, busy, other_weights, foreign, folder))
    assert not [p for p in cache.iterdir() if p.name.endswith(".removing")]


# ---------------------------------------------------------------------------------------------- choosing
def test_auto_chooses_onnxruntime_for_fp32_on_the_cpu(tiny_folder, onnx_cache):
    backbone = Backbone.load(tiny_folder, device="cpu", dtype="float32", runtime="auto", onnx_cache_dir=onnx_cache)
    assert backbone.runtime.name == "onnxruntime"


def test_onnxruntime_refuses_half_precision_and_auto_keeps_torch(tiny_folder, onnx_cache):
    with pytest.raises(BackboneError, match="float32 only"):
        Backbone.load(tiny_folder, device="cpu", dtype="bfloat16", runtime="onnxruntime", onnx_cache_dir=onnx_cache)
    backbone = Backbone.load(tiny_folder, device="cpu", dtype="bfloat16", runtime="auto", onnx_cache_dir=onnx_cache)
    assert backbone.runtime.name == "torch"


def test_a_missing_onnxruntime_is_named_or_skipped(tiny_folder, onnx_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when it is not installed
    with pytest.raises(BackboneError, match="onnxruntime is not installed"):
        Backbone.load(tiny_folder, device="cpu", dtype="float32", runtime="onnxruntime", onnx_cache_dir=onnx_cache)
    backbone = Backbone.load(tiny_folder, device="cpu", dtype="float32", runtime="auto", onnx_cache_dir=onnx_cache)
    assert backbone.runtime.name == "torch"


def test_an_unknown_runtime_is_refused(tiny_folder):
    with pytest.raises(BackboneError, match="unknown runtime 'tensorrt'"):
        Backbone.load(tiny_folder, device="cpu", dtype="float32", runtime="tensorrt")


def test_an_unwritable_cache_is_named_and_auto_keeps_torch(tiny_folder, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should go")
    with pytest.raises(BackboneError, match="ONNX cache"):
        load_ort(tiny_folder, blocker)
    backbone = Backbone.load(tiny_folder, device="cpu", dtype="float32", runtime="auto", onnx_cache_dir=blocker)
    assert backbone.runtime.name == "torch"


# ------------------------------------------------------------------------------------------ the real model
@pytest.mark.slow
def test_onnxruntime_equals_torch_on_the_real_backbone(tmp_path_factory):
    cache = tmp_path_factory.mktemp("onnx-real")
    on_ort = Backbone.load(device="cpu", dtype="float32", runtime="onnxruntime", onnx_cache_dir=cache)
    on_torch = Backbone.load(device="cpu", dtype="float32", runtime="torch")
    assert on_ort.fingerprint == on_torch.fingerprint and on_ort.num_layers == 6
    batch = on_ort.tokenize([
        "a moving, beautifully acted and deeply funny film",
        "The central bank raised interest rates again as company profits and share prices fell.",
        "this is awful, I hate waiting in line for hours",
        "ok",
    ])
    with torch.inference_mode():
        ours = on_ort(batch["input_ids"], batch["attention_mask"])
        theirs = on_torch(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
