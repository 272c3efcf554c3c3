"""Who computes the frozen encoder: torch (the reference; gradients; CUDA; half precision) or ONNX Runtime (fp32 on
the CPU).

The split forward needs two things of a runtime: `embed(input_ids, token_type_ids)` and
`run_layers(hidden, mask, start, stop)` with a [B, S] 0/1 mask. ONNX Runtime gets one graph for the embeddings and
one per encoder layer (the mixed pass inserts prompts between layers, so a layer is the unit), each with dynamic
batch and sequence axes, exported once and cached on disk:

    <cache dir>/<model name>-<key>/embeddings.onnx, layer_00.onnx, ..., manifest.json

Where ONNX Runtime gains: not in arithmetic (its fp32 GEMMs and torch's run at the same speed on one core, and its
fused contrib Attention op measured slower than the plain ops), but in work skipped and in threading. A BERT-style
layer is exported "unpadded" (`UnpaddedLayerGraph`): everything that works token by token (Q/K/V, the attention
output, the feed-forward, both layer norms: ~95% of a layer's arithmetic) runs on the real tokens only, gathered
from the padded batch; only the attention scores are computed on the padded [B, S] layout. Padded positions, and
the empty prompt slots of the mixed pass, cost next to nothing. ONNX Runtime's thread pool also lets the calling
thread take over work a descheduled worker has not started, where torch's OpenMP threads wait for each other at
every op: on a shared machine that is the larger difference (see `Backbone.use_runtime`).

The key covers the backbone's fingerprint, a hash of its weights and config (two fine-tunes with the same
fingerprint never share files), and the versions of everything that shapes the graph (export format, graph form,
opset, torch, transformers, onnxruntime). Files are written to a temporary name and renamed, and the manifest
records each file's sha256, so a crash mid-export or a damaged file means a re-export of that file, never a bad
session. Every session, fresh or cached, is checked against torch on a probe batch before it serves.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from lpt_serve.errors import BackboneError
from lpt_serve.format import Fingerprint
from lpt_serve.paths import APP_NAME

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")
# Bump when the exported graphs change meaning (wrapper modules, input names): old cache entries are then ignored.
EXPORT_FORMAT = 3
# How a layer's graph is built (`UnpaddedLayerGraph`, the plain `LayerGraph` where a layer lacks BERT's structure);
# part of the cache key, so a change here never meets graphs built the old way.
GRAPH_FORM = "unpadded-v1"
OPSET = 17
EMBEDDINGS_FILE = "embeddings.onnx"
MANIFEST_FILE = "manifest.json"
# A cache entry of the same weights exported by another version (ours, torch's, ORT's...) neither written nor
# used this long is removed after a new export: each upgrade would otherwise leave a whole copy of the encoder behind.
SUPERSEDED_AFTER_S = 24 * 3600
USED_FILE = ".used"  # touched at every start from an entry (when the cache is writable): when it was last used
# ORT vs torch on the probe batch; measured differences are ~5e-6 on MiniLM, a wrong graph is off by 1e-2 or more.
PROBE_TOLERANCE = 1e-4


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 0/1 mask -> [B, 1, 1, S] additive mask (0 keeps, dtype-min drops), the form every attention kernel takes.

    transformers 5 removed `get_extended_attention_mask`, so we build it here.
    """
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def layer_file(index: int) -> str:
    return f"layer_{index:02d}.onnx"


def default_onnx_cache_dir() -> Path:
    """~/.cache/lpt-serve/onnx on Linux (the per-user cache directory): exported graphs are rebuildable."""
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME)) / "onnx"


def missing_onnx_packages() -> list[str]:
    """The packages of the onnxruntime path that are not installed (onnx is needed to export)."""
    missing = []
    for module in ("onnxruntime", "onnx"):
        if module in sys.modules:  # imported already, or blocked (None)
            found = sys.modules[module] is not None
        else:
            # Found, not imported: only an export needs onnx, and a cache hit never exports.
            found = importlib.util.find_spec(module) is not None
        if not found:
            missing.append(module)
    return missing


# ---------------------------------------------------------------------------------------------- interface
class EncoderRuntime(Protocol):
    """Runs the frozen encoder's embeddings and layers; the Backbone dispatches its split forward to one of these."""

    name: str

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor: ...

    def run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, start: int, stop: int) -> torch.Tensor: ...


class TorchRuntime:
    """The encoder's own modules in torch eager: the reference, the only one with gradients, CUDA and half precision.

    Without gradients, in eval mode, a span of BERT-style layers runs padding-free: the real tokens are packed once
    for the span, and every layer's token-wise work (Q/K/V, the attention output, the feed-forward, both layer
    norms) runs on them alone, through the layer's own submodules (so a LoRA wrapped around one is applied); only
    attention sees the padded layout, through `scaled_dot_product_attention` (memory-efficient kernels on a GPU).
    What `UnpaddedLayerGraph` is for ONNX Runtime, with the packing kept across the span's layers. A layer takes
    this path only if it passes `unpadded_misfit` and then computes what its own forward computes on a probe batch
    (as ORT's graphs are probed): layers shaped like BERT's that compute otherwise (pre-LN, rotary, other attention)
    run as they are. So do training and every other layer kind.
    """

    name = "torch"

    def __init__(self, embeddings: nn.Module, layers: Sequence[nn.Module]) -> None:
        self.embeddings = embeddings
        self.layers = layers
        self.unpadded = [padding_free_misfit(layer) is None for layer in layers]

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        layers = self.layers[start:stop]
        if (layers and not torch.is_grad_enabled() and all(self.unpadded[start:stop])
                and not any(layer.training for layer in layers)):
            return _run_unpadded(layers, hidden, mask)
        ext = additive_mask(mask, hidden.dtype)
        for layer in layers:
            out = layer(hidden, attention_mask=ext)
            # transformers 4.x layers return a tuple, 5.x a tensor.
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def _run_unpadded(layers: Sequence[nn.Module], hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BERT-style `layers` on the real tokens of `hidden` [B, S, H] under `mask` [B, S]; a padded position's output is
    its input (as in `UnpaddedLayerGraph`: nothing downstream reads it)."""
    batch, seq, width = hidden.shape
    flat = hidden.reshape(batch * seq, width)
    real = mask.reshape(-1).nonzero().squeeze(1)  # [T]: the real tokens' places in the flattened batch
    tokens = flat.index_select(0, real)
    count = tokens.shape[0]
    if hidden.device.type == "cpu" and hidden.dtype in (torch.bfloat16, torch.float16):
        # oneDNN builds a kernel for every new matrix shape in half precision on the CPU (a linear on rows it has
        # not seen took ~3x its time), and a server's passes bring a new token count nearly every time: zero rows
        # up to a few counts keep the shapes few and the kernels cached. Rows past `count` are never read.
        extra = rounded_rows(count) - count
        if extra:
            tokens = torch.cat([tokens, tokens.new_zeros(extra, width)])
    bias = additive_mask(mask, hidden.dtype)
    for layer in layers:
        tokens = _unpadded_layer(layer, tokens, real, bias, batch, seq)
    return flat.index_copy(0, real, tokens[:count]).reshape(batch, seq, width)


def rounded_rows(count: int) -> int:
    """`count` rounded up to a multiple of an eighth of its power of two, at least 16: 64 shapes up to 16k tokens,
    at most 1/8 more rows than needed past 128."""
    step = max(16, 1 << max(0, count.bit_length() - 4))
    return -(-count // step) * step


def _unpadded_layer(layer: nn.Module, tokens: torch.Tensor, real: torch.Tensor, bias: torch.Tensor, batch: int,
                    seq: int) -> torch.Tensor:
    attention = layer.attention.self
    heads, head_size = int(attention.num_attention_heads), int(attention.attention_head_size)
    width = heads * head_size
    count = real.shape[0]  # `tokens` may hold zero rows past the real ones (`_run_unpadded`)
    # Q, K and V of the real tokens, scattered into the padded layout the attention kernel takes (zeros elsewhere:
    # the mask hides those keys, and their queries' outputs are never gathered).
    qkv = torch.stack([attention.query(tokens), attention.key(tokens), attention.value(tokens)])
    padded = tokens.new_zeros(3, batch * seq, width)
    padded[:, real] = qkv[:, :count]
    q, k, v = padded.view(3, batch, seq, heads, head_size).transpose(2, 3).unbind(0)  # each [B, heads, S, size]
    scale = float(getattr(attention, "scaling", head_size ** -0.5))
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    context = context.transpose(1, 2).reshape(batch * seq, width).index_select(0, real)
    if tokens.shape[0] > count:
        context = torch.cat([context, context.new_zeros(tokens.shape[0] - count, width)])
    attended = layer.attention.output(context, tokens)  # dense, dropout, LayerNorm(x + residual)
    return layer.output(layer.intermediate(attended), attended)


def padding_free_misfit(layer: nn.Module) -> str | None:
    """Why `layer` cannot run padding-free in torch; None when it can: it passes `unpadded_misfit`, and on the probe
    batch (fp32, a copy where the layer is not) its real positions equal its own forward's within the probe
    tolerance. transformers keeps pre-LN, rotary and other attention variants in layers of BERT's shape, which
    the structural check alone would let through."""
    misfit = unpadded_misfit(layer)
    if misfit is not None:
        return misfit
    weight = next(layer.parameters())
    probe = layer if weight.dtype == torch.float32 else copy.deepcopy(layer).float()
    width = int(layer.attention.self.query.in_features)
    hidden, mask = _example_inputs(LayerGraph(probe), width, vocab=1, seed=2)
    hidden, mask = hidden.to(weight.device), mask.to(weight.device)
    was_training = probe.training
    probe.eval()
    try:
        with torch.no_grad():
            got = _run_unpadded([probe], hidden, mask)
            expected = LayerGraph(probe)(hidden, mask)
    except Exception as exc:  # a layer whose submodules take other arguments
        return f"its submodules do not run as a BERT layer's ({type(exc).__name__}: {exc})"
    finally:
        probe.train(was_training)
    real = mask.bool()
    if not torch.allclose(got[real], expected[real], atol=PROBE_TOLERANCE, rtol=PROBE_TOLERANCE):
        return "it computes other than a BERT layer on a probe batch (pre-LN, rotary or other attention)"
    return None


# ----------------------------------------------------------------------------------------- exported graphs
class EmbeddingsGraph(nn.Module):
    """What `embeddings.onnx` computes: token ids and segment ids [B, S] -> hidden [B, S, H]."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)


class LayerGraph(nn.Module):
    """What `layer_NN.onnx` computes: hidden [B, S, H] and the 0/1 mask [B, S] -> hidden; the additive mask is made
    inside the graph, so callers hand over the same mask they give torch. This form (the layer exported as it is,
    every position computed) serves a layer that `UnpaddedLayerGraph` cannot take, and is the reference the probe
    checks every graph against."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.layer(hidden, attention_mask=additive_mask(mask, hidden.dtype))
        return out[0] if isinstance(out, tuple) else out


def unpadded_misfit(layer: nn.Module) -> str | None:
    """Why `layer` cannot be exported as an `UnpaddedLayerGraph`; None when it can: a BERT-style encoder layer
    (BERT, RoBERTa, ELECTRA, ERNIE, ...) with absolute positions, no cross-attention, and Q/K/V of one width."""
    attention = getattr(getattr(layer, "attention", None), "self", None)
    if attention is None or not all(hasattr(layer, n) for n in ("intermediate", "output")) or not hasattr(
            layer.attention, "output"):
        return "not a BERT-style layer (attention.self, attention.output, intermediate, output)"
    projections = [getattr(attention, n, None) for n in ("query", "key", "value")]
    if not all(isinstance(p, nn.Linear) and p.bias is not None for p in projections):
        return "its query, key and value are not biased linear maps"
    heads, head_size = getattr(attention, "num_attention_heads", None), getattr(attention, "attention_head_size", None)
    if not isinstance(heads, int) or not isinstance(head_size, int) or any(
            p.out_features != heads * head_size for p in projections):
        return "its heads do not split query, key and value evenly"
    if getattr(layer, "is_decoder", False) or hasattr(layer, "crossattention"):
        return "it is a decoder layer"
    if getattr(attention, "position_embedding_type", "absolute") != "absolute":
        return "its attention uses relative positions"
    return None


class UnpaddedLayerGraph(nn.Module):
    """What `layer_NN.onnx` computes for a BERT-style layer (see `unpadded_misfit`): on every real position what
    `LayerGraph` computes, with the token-wise work done on the real tokens only.

    The real tokens are gathered from the padded [B, S] layout; Q/K/V (one GEMM), the attention output, the
    feed-forward and both layer norms run on them alone, and only the attention scores see the padded layout (they
    need it, and at S ~ 30-70 they are a few percent of the arithmetic). A padded position's output is its input,
    unchanged: no real position reads it (the mask hides it from every query), and nothing downstream does (pooling
    and the generators weigh positions by the mask), so it need not be computed. Measured on MiniLM, one core, batch
    32 at 40% padding: 1.35x torch's layer; at 6% padding, 1.05x.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        attention = layer.attention.self
        self.heads = int(attention.num_attention_heads)
        self.head_size = int(attention.attention_head_size)
        self.scaling = float(getattr(attention, "scaling", self.head_size ** -0.5))
        # One GEMM for Q, K and V instead of three: 3-4% faster on MiniLM. Its weights are a copy, made for the
        # export and dropped with this module.
        q, k, v = attention.query, attention.key, attention.value
        self.qkv = nn.Linear(q.in_features, 3 * q.out_features, dtype=q.weight.dtype, device=q.weight.device)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        self.attention_output = layer.attention.output  # dense, dropout, LayerNorm(x + residual)
        self.intermediate = layer.intermediate
        self.output = layer.output

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, seq, width = hidden.shape
        flat = hidden.reshape(batch * seq, width)
        real = mask.reshape(-1).nonzero().squeeze(1)  # [T]: where the real tokens lie in the flattened batch
        tokens = flat.index_select(0, real)  # [T, H]
        qkv = self.qkv(tokens)  # [T, 3H]
        padded = qkv.new_zeros(batch * seq, qkv.shape[1]).index_put((real,), qkv)
        q, k, v = padded.view(batch, seq, 3, self.heads, self.head_size).permute(2, 0, 3, 1, 4).unbind(0)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling + additive_mask(mask, hidden.dtype)
        context = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(batch * seq, -1).index_select(0, real)
        attended = self.attention_output(context, tokens)
        out = self.output(self.intermediate(attended), attended)
        return flat.index_put((real,), out).reshape(batch, seq, width)


INPUTS = {EmbeddingsGraph: ("input_ids", "token_type_ids"), LayerGraph: ("hidden", "mask"),
          UnpaddedLayerGraph: ("hidden", "mask")}
OUTPUT = "hidden_out"
LAYER_INPUTS = INPUTS[LayerGraph]


def _example_inputs(graph: nn.Module, width: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A small batch for tracing and for the probe. Its mask has the mixed pass's shapes: a full row, a row padded
    at the end, and a row whose first positions are empty prompt slots. No axis is 0 or 1, which the exporter would
    specialise on."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(graph, EmbeddingsGraph):
        ids = torch.randint(0, vocab, (2, 7), generator=gen)
        return ids, torch.zeros_like(ids)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, :3] = 0
    mask[2, 8:] = 0
    return torch.randn(3, 9, width, generator=gen), mask


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    # The exporter warns about dynamic_shapes style, training mode, missing torchvision ops and more: none of it
    # concerns a user of a frozen encoder. Its real failures raise.
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _graph_settings(config: Any) -> dict[str, Any]:
    """The model config minus what does not shape the encoder's graphs (where the folder was, the head classes)."""
    settings = config.to_dict() if hasattr(config, "to_dict") else {}
    for irrelevant in ("architectures", "_name_or_path", "transformers_version", "name_or_path"):
        settings.pop(irrelevant, None)
    settings["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    return settings


@contextlib.contextmanager
def _eager_attention(config: Any) -> Iterator[None]:
    """The layers read `config._attn_implementation` at every call; export them with the plain (eager) attention.

    Measured on MiniLM: the TorchScript exporter over eager attention gives graphs that match torch within 1e-4 and,
    run in ONNX Runtime, as fast as torch's SDPA layers (CPU time, one core); over SDPA it gives wrong outputs (errors
    of 1-6), and the dynamo exporter's SDPA graphs run slower than torch. (`UnpaddedLayerGraph` writes its attention
    out itself; this is for the embeddings and the plain `LayerGraph`.)
    """
    before = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


_EXPORT_LOCK = threading.Lock()


def export_graph(graph: nn.Module, config: Any, width: int, vocab: int) -> bytes:
    """The serialised ONNX model of `graph` (one of the classes in INPUTS) with its own weights."""
    names = INPUTS[type(graph)]
    axes = {0: "batch", 1: "sequence"}
    buffer = io.BytesIO()
    # One export at a time: the attention switch is on the shared config.
    with _EXPORT_LOCK, _quiet_export(), _eager_attention(config), torch.no_grad():
        torch.onnx.export(graph.eval(), _example_inputs(graph, width, vocab), buffer, input_names=list(names),
                          output_names=[OUTPUT], dynamic_axes={name: axes for name in (*names, OUTPUT)},
                          dynamo=False, opset_version=OPSET)
    return buffer.getvalue()


# -------------------------------------------------------------------------------------------------- cache
def weights_digest(modules: Sequence[nn.Module], config: Any) -> str:
    """sha256 of the exported modules' tensors (names, dtypes, shapes, bytes) and the model config; not of the
    folder's path, so the same model moved or reinstalled finds its graphs again."""
    digest = hashlib.sha256()
    digest.update(json.dumps(_graph_settings(config), sort_keys=True, default=str).encode())
    for i, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            digest.update(f"{i}:{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return digest.hexdigest()


def cache_key(fingerprint: Fingerprint, weights_sha256: str) -> dict[str, Any]:
    import onnxruntime
    import transformers

    return {
        "export_format": EXPORT_FORMAT, "graph_form": GRAPH_FORM, "opset": OPSET, "fingerprint": fingerprint.as_dict(),
        "weights_sha256": weights_sha256, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "onnx": importlib.metadata.version("onnx"),
    }


def cache_entry_dir(root: Path, key: dict[str, Any]) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key["fingerprint"]["name"]).strip("._-")[:60] or "backbone"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return root / f"{slug}-{digest}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prune_superseded(root: Path, key: dict[str, Any], *, keep: Path,
                     older_than_s: float = SUPERSEDED_AFTER_S) -> list[Path]:
    """Remove the entries under `root` that hold the same weights (fingerprint and hash) as `key` under another key
    (an older export format, torch, ORT...) and were neither written nor used for `older_than_s`; answer them.

    The age guard keeps the two versions of a rolling upgrade from deleting each other's exports at every start; an
    entry another process is exporting into (its lock held) is left. An entry is renamed away before it is removed,
    so no reader sees it half gone; leftovers of a removal cut short go at the next prune; anything unreadable stays.
    """
    removed: list[Path] = []
    try:
        children = list(root.iterdir())
    except OSError:
        return removed
    for leftover in (c for c in children if c.name.endswith(".removing") and c.is_dir() and not c.is_symlink()):
        shutil.rmtree(leftover, ignore_errors=True)
    now = time.time()
    for entry in children:
        if entry == keep or entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            other = json.loads((entry / MANIFEST_FILE).read_text(encoding="utf-8")).get("key")
            last = max(p.stat().st_mtime for p in (entry / MANIFEST_FILE, entry / USED_FILE) if p.exists())
        except (OSError, ValueError, AttributeError):
            continue  # not an entry of ours, or one being written
        if (not isinstance(other, dict) or other == key or now - last < older_than_s
                or other.get("fingerprint") != key["fingerprint"]
                or other.get("weights_sha256") != key["weights_sha256"]):
            continue
        doomed = root / f".{entry.name}.{os.getpid()}.{time.monotonic_ns()}.removing"
        try:
            size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
            with _entry_lock(entry, wait=False) as free:
                if not free:
                    continue  # being exported into right now
                entry.rename(doomed)
            shutil.rmtree(doomed)
        except OSError as exc:
            log.warning("could not remove the superseded ONNX export %s: %s", entry, exc)
            continue
        log.info("removed the superseded ONNX export %s (%.1f MB; exported for %s)", entry, size / 1e6,
                 {k: other.get(k) for k in ("export_format", "onnxruntime", "torch", "transformers")})
        removed.append(entry)
    return removed


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else {}


def _is_intact(folder: Path, name: str, manifest: dict[str, Any]) -> bool:
    entry = manifest.get("files", {}).get(name)
    path = folder / name
    if not isinstance(entry, dict) or not path.is_file() or path.stat().st_size != entry.get("bytes"):
        return False
    return _file_sha256(path) == entry.get("sha256")


@contextlib.contextmanager
def _entry_lock(folder: Path, *, wait: bool = True) -> Iterator[bool]:
    """One exporter per cache entry at a time, across processes (several server workers starting together). With
    `wait=False`, yields False at once instead of waiting when another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: files are still written atomically, two exporters just duplicate work
        yield True
        return
    with (folder / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -------------------------------------------------------------------------------------------- onnxruntime
class OnnxRuntime:
    """The encoder as ONNX Runtime sessions: one for the embeddings, one per layer; fp32 on the CPU only.

    Inputs and outputs are bound by pointer (IOBinding): ORT reads the torch tensors' memory and writes into
    tensors allocated by torch, no copies either way. (A session run costs ~0.07 ms over its arithmetic, measured;
    so one graph per layer costs well under 1% of a pass, and spans of layers in one graph would not pay.)
    """

    name = "onnxruntime"

    def __init__(self, sessions: Sequence[Any], hidden_size: int, *, cache_dir: Path, exported: Sequence[str],
                 threads: int, forms: Sequence[str] = ()) -> None:
        self.embeddings_session, *layer_sessions = sessions
        self.layer_sessions = list(layer_sessions)
        self.hidden_size = hidden_size
        self.cache_dir = cache_dir
        self.exported = tuple(exported)  # the files this load had to export (empty: everything came from the cache)
        self.threads = threads
        self.forms = tuple(forms)  # per layer: "unpadded" or "padded" (see UnpaddedLayerGraph)

    # ------------------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, embeddings: nn.Module, layers: Sequence[nn.Module], *, fingerprint: Fingerprint, config: Any,
              cache_dir: str | Path | None = None, threads: int | None = None, spinning: bool = False,
              progress: bool = True) -> OnnxRuntime:
        """Sessions for `embeddings` and `layers` (fp32, CPU), exported to the cache first where it lacks them.

        Raises BackboneError when onnxruntime/onnx are missing, the weights are not fp32 on the CPU, the
        cache directory cannot be written, or an exported graph does not match torch.
        """
        missing = missing_onnx_packages()
        if missing:
            raise BackboneError(f"the onnxruntime runtime needs {', '.join(missing)}, which is not installed: run "
                                "`pip install onnxruntime onnx`, or use the torch runtime")
        try:
            import onnxruntime  # noqa: F401  (installed yet broken, e.g. a missing system library)
        except ImportError as exc:
            raise BackboneError(f"onnxruntime is installed but cannot be imported ({exc}): reinstall it, or use the "
                                "torch runtime") from exc
        params = [p for m in (embeddings, *layers) for p in m.parameters()]
        if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
            found = {f"{p.dtype} on {p.device}" for p in params}
            raise BackboneError(f"the onnxruntime runtime serves float32 weights on the CPU, not {', '.join(found)}: "
                                "use dtype float32 on device cpu, or the torch runtime")
        started = time.perf_counter()
        root = Path(cache_dir) if cache_dir is not None else default_onnx_cache_dir()
        key = cache_key(fingerprint, weights_digest([embeddings, *layers], config))
        folder = cache_entry_dir(root, key)
        threads = int(threads or torch.get_num_threads())
        vocab = int(embeddings.word_embeddings.num_embeddings)
        builder = _GraphBuilder(embeddings, layers, folder=folder, key=key, config=config,
                                width=int(fingerprint.hidden_size), vocab=vocab, threads=threads, spinning=spinning,
                                progress=progress)
        try:
            sessions = builder.sessions()
        except OSError as exc:
            raise BackboneError(f"cannot use the ONNX cache {folder}: {exc}; pass another cache directory, or use "
                                "the torch runtime") from exc
        finally:
            builder.close()
        with contextlib.suppress(OSError):  # a read-only cache serves all the same
            (folder / USED_FILE).touch()
        if builder.exported:  # only an export can supersede an entry; a start from the cache removes nothing
            prune_superseded(root, key, keep=folder)
        log.info("onnxruntime encoder ready", extra={
            "onnx_cache": str(folder), "exported": len(builder.exported), "graphs": len(builder.names),
            "threads": threads, "unpadded_layers": builder.forms.count("unpadded"),
            "seconds": round(time.perf_counter() - started, 2)})
        return cls(sessions, int(fingerprint.hidden_size), cache_dir=folder, exported=builder.exported,
                   threads=threads, forms=builder.forms)

    # ------------------------------------------------------------------------------------------------- run
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        _check_cpu(input_ids)
        feeds = (input_ids.to(torch.int64), token_type_ids.to(torch.int64))
        return _run(self.embeddings_session, INPUTS[EmbeddingsGraph], feeds, self.hidden_size)

    def run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        _check_cpu(hidden)
        if hidden.dtype != torch.float32:
            raise BackboneError(f"the onnxruntime runtime takes float32 hidden states, not {hidden.dtype}")
        mask = mask.to(torch.int64)
        for session in self.layer_sessions[start:stop]:
            hidden = _run(session, LAYER_INPUTS, (hidden, mask), self.hidden_size)
        return hidden


class _GraphBuilder:
    """One `OnnxRuntime.build`: each graph's session from the cache when the file is intact and passes the probe,
    exported (atomically, under the entry's lock) when it is missing, damaged or wrong."""

    def __init__(self, embeddings: nn.Module, layers: Sequence[nn.Module], *, folder: Path, key: dict[str, Any],
                 config: Any, width: int, vocab: int, threads: int, spinning: bool, progress: bool) -> None:
        self.embeddings, self.layers = embeddings, list(layers)
        self.folder, self.key, self.config = folder, key, config
        self.width, self.vocab = width, vocab
        self.threads, self.spinning, self.progress = threads, spinning, progress
        self.names = [EMBEDDINGS_FILE, *(layer_file(i) for i in range(len(self.layers)))]
        self.exported: list[str] = []
        self.forms: list[str] = []
        self._bar: Any = None

    def sessions(self) -> list[Any]:
        # Only an export writes, so a complete cache may sit on a read-only disk (baked into an image).
        manifest = _read_manifest(self.folder)
        stale = [name for name in self.names if not _is_intact(self.folder, name, manifest)]
        if stale:
            log.info("exporting the encoder to ONNX once (%d of %d graphs), cached in %s", len(stale),
                     len(self.names), self.folder)
            self._progress(len(stale))
        sessions = []
        for i, name in enumerate(self.names):
            found = None
            if name not in stale:
                found = self._cached(i, manifest)
                if found is None:
                    # Intact bytes that compute the wrong thing (a bug of an older exporter, a hand-edited file).
                    log.warning("cached ONNX graph %s does not match torch; exporting it again", self.folder / name)
                    self._progress(1)
            if found is None:
                found = self._export(i, force=name not in stale)
            session, form = found
            if i > 0:
                self.forms.append(form)
            sessions.append(session)
        return sessions

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    # ------------------------------------------------------------------------------------------------ graphs
    def _reference(self, i: int) -> nn.Module:
        """What graph i (0: the embeddings, i: layer i - 1) must compute, in torch."""
        return EmbeddingsGraph(self.embeddings).eval() if i == 0 else LayerGraph(self.layers[i - 1]).eval()

    def _candidates(self, i: int) -> list[tuple[str, nn.Module]]:
        """The forms to export graph i in, best first."""
        if i == 0:
            return [("embeddings", EmbeddingsGraph(self.embeddings).eval())]
        layer = self.layers[i - 1]
        misfit = unpadded_misfit(layer)
        if misfit is not None:
            log.info("layer %d is exported padded: %s", i - 1, misfit)
            return [("padded", LayerGraph(layer).eval())]
        return [("unpadded", UnpaddedLayerGraph(layer).eval()), ("padded", LayerGraph(layer).eval())]

    def _cached(self, i: int, manifest: dict[str, Any]) -> tuple[Any, str] | None:
        name = self.names[i]
        session = self._checked(i, self.folder / name)
        return None if session is None else (session, str(manifest["files"][name].get("form", "padded")))

    def _export(self, i: int, *, force: bool) -> tuple[Any, str]:
        name = self.names[i]
        self.folder.mkdir(parents=True, exist_ok=True)
        with _entry_lock(self.folder):
            manifest = _read_manifest(self.folder)
            if not force and _is_intact(self.folder, name, manifest):
                found = self._cached(i, manifest)  # another process exported it while this one waited for the lock
                if found is not None:
                    self.exported.append(name)
                    self._step()
                    return found
            manifest["key"] = self.key
            manifest.setdefault("files", {})
            for form, graph in self._candidates(i):
                if self._bar is not None:
                    layers = len(self.names) - 1
                    self._bar.set_description("exporting embeddings" if i == 0 else f"exporting layer {i}/{layers}")
                try:
                    data = export_graph(graph, self.config, self.width, self.vocab)
                except Exception as exc:  # the exporter raises many kinds; all mean "this model does not export"
                    if form == "unpadded":
                        log.warning("cannot export %s unpadded (%s: %s); exporting it padded", name,
                                    type(exc).__name__, exc)
                        continue
                    raise BackboneError(f"cannot export {name} to ONNX ({type(exc).__name__}: {exc}): use the "
                                        "torch runtime") from exc
                _write_atomically(self.folder / name, data)
                manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                           "form": form}
                # After every file, so that an export cut short keeps what it finished.
                _write_atomically(self.folder / MANIFEST_FILE,
                                  json.dumps(manifest, indent=2, sort_keys=True).encode())
                session = self._checked(i, self.folder / name)
                if session is not None:
                    self.exported.append(name)
                    self._step()
                    return session, form
                if form == "unpadded":
                    log.warning("the unpadded ONNX export of %s does not match torch within %s; exporting it padded",
                                name, PROBE_TOLERANCE)
        raise BackboneError(f"the ONNX export of {name} does not match torch within {PROBE_TOLERANCE}: use the torch "
                            "runtime")

    def _progress(self, more: int) -> None:
        """The progress line of a first start (stderr): `more` graphs to export."""
        if not self.progress:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=more, desc="exporting to ONNX", unit="graph", leave=False)
        else:
            self._bar.total += more
            self._bar.refresh()

    def _step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def _checked(self, i: int, path: Path) -> Any | None:
        """A session for `path` if it loads and matches torch on a probe batch (real positions); None otherwise."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        reference = self._reference(i)
        probe = _example_inputs(reference, self.width, self.vocab, seed=1)
        names = INPUTS[EmbeddingsGraph] if i == 0 else LAYER_INPUTS
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            with torch.inference_mode():
                got = _run(session, names, probe, self.width)
                expected = reference(*probe)
        except Exception as exc:  # ORT raises its own exception types for unreadable or mis-shaped models
            log.warning("cannot load or run %s: %s", path, exc)
            return None
        if i > 0:  # a layer's padded positions are not computed by every form (see UnpaddedLayerGraph)
            real = probe[1].bool()
            got, expected = got[real], expected[real]
        return session if torch.allclose(got, expected, atol=PROBE_TOLERANCE, rtol=PROBE_TOLERANCE) else None


_NUMPY_TYPES = {torch.float32: "float32", torch.int64: "int64"}


def _run(session: Any, names: Sequence[str], inputs: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """One session run, reading the inputs' and writing the output's torch memory in place."""
    import numpy as np

    batch, seq = inputs[0].shape[:2]
    out = torch.empty((batch, seq, width), dtype=torch.float32)
    if batch == 0 or seq == 0:
        return out
    inputs = [t.contiguous() for t in inputs]  # kept referenced until the run ends: ORT reads their memory
    binding = session.io_binding()
    for name, tensor in zip(names, inputs, strict=True):
        binding.bind_input(name, "cpu", 0, np.dtype(_NUMPY_TYPES[tensor.dtype]), tuple(tensor.shape),
                           tensor.data_ptr())
    binding.bind_output(OUTPUT, "cpu", 0, np.float32, tuple(out.shape), out.data_ptr())
    session.run_with_iobinding(binding)
    return out


def _check_cpu(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cpu":
        raise BackboneError(f"the onnxruntime runtime runs on the CPU, but got a tensor on {tensor.device}: "
                            "call backbone.use_runtime('torch') after moving the backbone")
