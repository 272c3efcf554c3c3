"""The task adapter: config + generator + head, its on-disk form, and the check against a backbone.

A directory like PEFT's: `adapter_config.json` (sorted, indented) and `adapter_model.safetensors`
(contiguous tensors, `{"format": "pt"}` metadata). Weights are read with safetensors only: nothing is ever
unpickled, so a pickled checkpoint is refused as "not a safetensors file".

An upload is untrusted, and one adapter must never cost the server more than the adapter it describes. So every
knob is bounded (below, and against the served backbone in `check_adapter`), the config's size is checked before
it is parsed, and the weights' names, dtypes and shapes are read from the safetensors header and compared with
shapes computed from the config by arithmetic: nothing is allocated until the adapter is known to fit.

Weights may be stored in fp32 or, compact, in fp16 or bf16 (half the bytes; `compact_adapter` writes them, `lpt
compact` on the command line). A loaded adapter keeps the dtype it was stored in, and its weights are cast to the
pass's dtype when it runs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from lpt_serve.errors import AdapterError, InvalidTaskName
from lpt_serve.format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    MASK_SLOT,
    TEXT_SLOT,
    WEIGHTS_NAME,
    Fingerprint,
    validate_task_name,
)
from lpt_serve.model.generators import build_generator
from lpt_serve.model.heads import LinearHead, VerbalizerHead

# ------------------------------------------------------------------------------------------------- bounds
# What one adapter may ask of the server. Each is far above what training produces (the demo tasks: 2-5 labels,
# prompt length 5, bottleneck 128, no template, a 300-byte training record) and far below what hurts a server.
MAX_CONFIG_BYTES = 256 * 1024  # checked before parsing; also caps the `training` record and the fingerprint
MAX_LABELS = 1000
MAX_LABEL_CHARS = 200
MAX_LABEL_WORD_CHARS = 50  # a label word must be one token anyway; this only bounds the work to find out
MAX_PROMPT_LENGTH = 64  # prompt slots take no positions, but every row of a batch carries the longest prompt
MAX_TEMPLATE_CHARS = 4096  # a cheap cap before tokenizing; the real limit is in tokens, against the backbone
MAX_BOTTLENECK_PER_HIDDEN = 4  # bottleneck <= 4 * hidden size: NPG's up-projection is L * h * d weights
MAX_HEADER_BYTES = 1 << 20  # a safetensors header for a handful of tensors is a few hundred bytes
MIN_TEXT_TOKENS = 1  # what a row must keep of its text after specials and template

# Strict: JSON `true` is not 1, `1.0` is not 1 and `"5"` is not 5 (pydantic's lax mode would take all three).
Count = Annotated[int, Field(strict=True)]
Text = Annotated[str, Field(strict=True)]
Label = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_LABEL_CHARS)]
LabelWord = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_LABEL_WORD_CHARS)]
Template = Annotated[str, Field(strict=True, max_length=MAX_TEMPLATE_CHARS)]


class AdapterConfig(BaseModel):
    """Everything needed to rebuild a task's generator and head, and to know which backbone it belongs to."""

    model_config = ConfigDict(extra="forbid")

    format_version: Count = FORMAT_VERSION
    task: Text
    labels: list[Label] = Field(min_length=2, max_length=MAX_LABELS)
    method: Literal["lpt", "prompt"] = "lpt"
    generator: Literal["npg", "mppg", "appg", "static"] = "npg"
    prompt_layer: Count = Field(ge=0)
    prompt_length: Count = Field(ge=1, le=MAX_PROMPT_LENGTH)
    bottleneck: Count = Field(default=128, ge=1)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, strict=True)
    head: Literal["linear", "verbalizer"] = "linear"
    pooling: Literal["mean", "cls", "mean_prompt"] = "mean"
    template: Template | None = None
    label_words: Annotated[list[LabelWord], Field(max_length=MAX_LABELS)] | None = None
    max_length: Count | None = Field(default=None, ge=8)
    backbone: Fingerprint
    training: dict[str, Any] | None = None

    @field_validator("task")
    @classmethod
    def _task_name(cls, value: str) -> str:
        try:
            return validate_task_name(value)
        except InvalidTaskName as exc:
            raise ValueError(exc.message) from None

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("labels must be unique")
        return value

    @model_validator(mode="after")
    def _head_needs(self) -> AdapterConfig:
        if self.template is not None and TEXT_SLOT not in self.template:
            raise ValueError(f"template must contain {TEXT_SLOT}")
        if self.head == "verbalizer":
            if not self.template or MASK_SLOT not in self.template:
                raise ValueError(f"a verbalizer head needs a template with {TEXT_SLOT} and {MASK_SLOT}")
            if not self.label_words or len(self.label_words) != len(self.labels):
                raise ValueError("a verbalizer head needs one label word per label")
        if self.generator == "static" and self.method != "prompt":
            raise ValueError("the static generator is classic prompt tuning: set method to 'prompt'")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> AdapterConfig:
        data = parse_config_json(text)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise AdapterError([_pydantic_problem(e) for e in exc.errors()]) from exc


def parse_config_json(text: str | bytes) -> dict[str, Any]:
    """The config's JSON object, its size checked before parsing (AdapterError otherwise)."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_NAME} is {len(raw)} bytes; at most {MAX_CONFIG_BYTES} (the training record "
                           "belongs in a summary, not the whole log)")
    try:
        data = json.loads(raw)
    except ValueError as exc:  # bad JSON or UTF-8, or an integer over Python's 4,300 digits
        raise AdapterError(f"{CONFIG_NAME} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise AdapterError(f"{CONFIG_NAME} nests too deeply to parse") from exc
    if not isinstance(data, dict):
        raise AdapterError(f"{CONFIG_NAME} must hold a JSON object")
    return data


def with_task_name(config_bytes: bytes, task: str) -> bytes:
    """The config with ``task`` as its task name: the URL (or the store command) names the task; an adapter trained
    under another name is renamed rather than refused."""
    data = parse_config_json(config_bytes)  # its size is checked before it is parsed
    if data.get("task") == task:
        return config_bytes
    data["task"] = task
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _pydantic_problem(err: dict) -> str:
    where = ".".join(str(p) for p in err.get("loc", ())) or "config"
    return f"{CONFIG_NAME}: {where}: {err.get('msg')}"


class TaskAdapter(nn.Module):
    """One task: its generator (late prompt) and head. Small: NPG with h = 384 is ~300k parameters."""

    def __init__(self, config: AdapterConfig, label_word_ids: list[int] | None = None) -> None:
        super().__init__()
        self.config = config
        hidden = config.backbone.hidden_size
        self.generator = build_generator(config.generator, hidden, config.prompt_length, config.bottleneck,
                                         config.dropout)
        if config.head == "linear":
            self.head: nn.Module = LinearHead(hidden, len(config.labels), config.pooling, config.dropout)
        else:
            if label_word_ids is None:
                raise AdapterError("a verbalizer head needs the backbone's tokenizer to resolve its label words")
            self.head = VerbalizerHead(label_word_ids)

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    def num_parameters(self) -> int:
        return sum(p.numel() for p in module_tensors(self, buffers=False))

    def nbytes(self) -> int:
        """Bytes of its parameters and buffers."""
        return sum(t.numel() * t.element_size() for t in module_tensors(self))

    def generate(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _run_in(self.generator, hidden.dtype, hidden, mask)

    def logits(self, hidden: torch.Tensor, token_mask: torch.Tensor, prompt_mask: torch.Tensor,
               mask_positions: torch.Tensor | None, backbone) -> torch.Tensor:
        return _run_in(self.head, hidden.dtype, hidden, token_mask, prompt_mask, mask_positions, backbone)

    @property
    def storage_dtypes(self) -> set[torch.dtype]:
        """The dtypes its weights are kept in: {float32}, or {float16} / {bfloat16} for a compact adapter."""
        return {p.dtype for p in module_tensors(self, buffers=False)}

    def to_serving(self, device: torch.device | str, dtype: torch.dtype) -> TaskAdapter:
        """Moved to `device`, in place, for a server whose passes run in `dtype`: weights wider than `dtype` (fp32
        under a bf16 backbone) are narrowed to it once, narrower ones (a compact adapter under an fp32 backbone)
        stay as stored, half the bytes, and are cast when they run."""
        device = torch.device(device)
        # Module.to walks every module in Python even when nothing moves; a server loading tens of adapters a
        # second straight into CPU memory skips that walk.
        if any(t.device != device for t in module_tensors(self)):
            self.to(device)
        parameters = module_tensors(self, buffers=False)
        wide = [p for p in parameters if p.is_floating_point() and p.dtype.itemsize > dtype.itemsize]
        for p in wide:
            p.data = p.data.to(dtype)
        if wide and len(wide) < len(parameters):
            # Loaded weights are views of one buffer (`parse_weights`): copy the ones left, or they would keep
            # the whole buffer alive beside the narrowed copies, bytes the host budget never counts.
            narrowed = {id(p) for p in wide}
            for p in parameters:
                if id(p) not in narrowed:
                    p.data = p.data.clone()
        return self

    # ------------------------------------------------------------------------------------------- save / load
    def state_for_disk(self) -> dict[str, torch.Tensor]:
        """Weights as saved: fp32, except that a compact adapter's fp16/bf16 weights stay as they are."""
        return {k: v.detach().to("cpu", v.dtype if v.dtype in COMPACT_DTYPES.values() else torch.float32).contiguous()
                for k, v in self.state_dict().items()}

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(self.config.to_json())
        (out / WEIGHTS_NAME).write_bytes(save_safetensors_bytes(self.state_for_disk(), metadata={"format": "pt"}))
        return out


def module_tensors(module: nn.Module, *, buffers: bool = True) -> list[torch.Tensor]:
    """The parameters (and buffers) of `module` and its submodules, each once. What `parameters()` gives, without
    its generic walk (named_modules, prefixes, a set of members): an adapter is asked for its tensors on every
    load and every pass, and that walk was the larger part of the asking."""
    found: dict[int, torch.Tensor] = {}
    stack = [module]
    while stack:
        current = stack.pop()
        for tensor in current._parameters.values():
            if tensor is not None:
                found.setdefault(id(tensor), tensor)
        if buffers:
            for tensor in current._buffers.values():
                if tensor is not None:
                    found.setdefault(id(tensor), tensor)
        stack.extend(child for child in reversed(current._modules.values()) if child is not None)
    return list(found.values())


def _run_in(module: nn.Module, dtype: torch.dtype, *args):
    """`module(*args)`, its floating weights cast to `dtype` for this call when they are stored in another one (a
    compact adapter serves fp16/bf16 weights in the backbone's dtype); the stored weights are left as they are."""
    if all(p.dtype == dtype for p in module_tensors(module, buffers=False)):
        return module(*args)
    cast = {name: p.to(dtype) if p.is_floating_point() else p for name, p in module.named_parameters()}
    return torch.func.functional_call(module, cast, args)


def label_word_ids(config: AdapterConfig, tokenizer) -> tuple[list[int] | None, list[str]]:
    """Each label word must be one token of the backbone's vocabulary (RoBERTa-style ones want a leading space)."""
    if config.head != "verbalizer" or not config.label_words:
        return None, []
    ids, problems = [], []
    for word in config.label_words:
        candidates = [tokenizer.encode(w, add_special_tokens=False) for w in (" " + word.strip(), word)]
        single = [c for c in candidates if len(c) == 1 and c[0] != tokenizer.unk_token_id]
        if not single:
            problems.append(f"label word {word!r} is not a single token of the backbone's vocabulary")
            ids.append(-1)
        else:
            ids.append(single[0][0])
    return ids, problems


# ----------------------------------------------------------------------------------------- rows and templates
# Both are asked for every request, and each tokenizer call costs tens of microseconds in transformers' Python
# wrapper: the answers are cached per (tokenizer, template). Callers get tuples, so nobody can change a cached one.
@functools.lru_cache(maxsize=64)
def special_tokens(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special tokens before and after one sequence ([CLS] x [SEP], <s> x </s>), read off the tokenizer
    itself because transformers 5 dropped build_inputs_with_special_tokens."""
    around = tokenizer("", add_special_tokens=True)["input_ids"]
    return tuple(around[:1]), tuple(around[1:])


@functools.lru_cache(maxsize=4096)
def template_token_ids(tokenizer, template: str | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The template's own tokens before and after `{text}`, `<mask>` as the tokenizer's mask token."""
    if template is None:
        return (), ()
    prefix, suffix = template.split(TEXT_SLOT, 1)
    prefix = prefix.replace(MASK_SLOT, tokenizer.mask_token or MASK_SLOT)
    suffix = suffix.replace(MASK_SLOT, tokenizer.mask_token or MASK_SLOT)
    prefix_ids = tokenizer(prefix.rstrip(), add_special_tokens=False)["input_ids"] if prefix.strip() else []
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix.strip() else []
    return tuple(prefix_ids), tuple(suffix_ids)


def max_template_tokens(backbone) -> int:
    """A template may take at most half the backbone's positions, so every row keeps the other half for its text."""
    return backbone.max_length // 2


def _template_problems(config: AdapterConfig, backbone) -> list[str]:
    tok = backbone.tokenizer
    prefix, suffix = template_token_ids(tok, config.template)
    head, tail = special_tokens(tok)
    own = len(prefix) + len(suffix)
    problems = []
    if own > max_template_tokens(backbone):
        problems.append(f"template is {own} tokens; at most {max_template_tokens(backbone)} (half of the "
                        f"backbone's {backbone.max_length} positions, so the text keeps the other half)")
    elif config.max_length is not None:
        limit = min(config.max_length, backbone.max_length)
        room = limit - len(head) - len(tail) - own
        if room < MIN_TEXT_TOKENS:
            problems.append(f"max_length {config.max_length} leaves no room for text after the template's {own} "
                            f"tokens and {len(head) + len(tail)} special tokens")
    if config.head == "verbalizer" and tok.mask_token_id is not None:
        masks = (prefix + suffix).count(tok.mask_token_id)
        if masks != 1:
            problems.append(f"template holds {masks} mask tokens once tokenized; a verbalizer needs exactly one")
    return problems


# -------------------------------------------------------------------------------------------- weights format
@dataclass(frozen=True)
class TensorSpec:
    """A tensor as its safetensors header describes it: dtype name (F32, BF16, ...) and shape."""

    dtype: str
    shape: tuple[int, ...]


SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_TORCH_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}
# Half the bytes of fp32, kept as stored in memory and cast when used; the names `lpt compact --dtype` takes.
COMPACT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# What weights arrive as: an upload's bytes, or a file read into a writable buffer (`read_weights`).
Buffer = bytes | bytearray | memoryview


def _spec(tensor: torch.Tensor | TensorSpec) -> TensorSpec:
    if isinstance(tensor, TensorSpec):
        return tensor
    return TensorSpec(_TORCH_NAMES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape))


def _refuse_pickles(data: bytes) -> None:
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise AdapterError(f"{WEIGHTS_NAME} is a pickle/zip checkpoint; only safetensors is accepted")


def stored_itemsize(weights: Path) -> int | None:
    """Bytes per element of the widest tensor in a safetensors file, from its header alone (a few hundred bytes
    read); None when the file cannot say (a full load names the problem)."""
    try:
        with Path(weights).open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= MAX_HEADER_BYTES:
                return None
            header = json.loads(f.read(size))
        sizes = [SAFETENSORS_ITEMSIZE.get(entry.get("dtype")) for name, entry in header.items()
                 if name != "__metadata__" and isinstance(entry, dict)]
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    return max(sizes) if sizes and None not in sizes else None


def read_header(data: Buffer) -> dict[str, TensorSpec]:
    """Every tensor's dtype and shape from the safetensors header (8-byte little-endian length, then JSON),
    without reading or allocating any tensor; AdapterError if the file is not a consistent safetensors file."""
    return {name: spec for name, (spec, _) in _layout(data).items()}


def _layout(data: Buffer) -> dict[str, tuple[TensorSpec, int]]:
    """Each tensor's spec and the offset of its first byte in `data`, checked as the format demands: every
    tensor's bytes inside the file and the size of its dtype and shape, and the tensors tiling the data section
    with no gap and no overlap."""
    _refuse_pickles(data)
    bad = f"{WEIGHTS_NAME} is not a valid safetensors file"
    if len(data) < 8:
        raise AdapterError(f"{bad}: {len(data)} bytes, too short for the header's length")
    size = int.from_bytes(data[:8], "little")
    if size > MAX_HEADER_BYTES:
        raise AdapterError(f"{bad}: its header claims {size} bytes; at most {MAX_HEADER_BYTES}")
    if 8 + size > len(data):
        raise AdapterError(f"{bad}: its header runs past the end of the file")
    try:
        # Strict UTF-8, as the format says (json.loads would also take UTF-16 and UTF-32 bytes).
        header = json.loads(bytes(data[8:8 + size]).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise AdapterError(f"{bad}: its header is not UTF-8 JSON") from exc
    if not isinstance(header, dict):
        raise AdapterError(f"{bad}: its header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterError(f"{bad}: its __metadata__ must map names to strings")
    body = len(data) - 8 - size
    layout: dict[str, tuple[TensorSpec, int]] = {}
    extents: list[tuple[int, int]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise AdapterError(f"{bad}: tensor {name!r} has a malformed header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(dtype, str) or not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2
                or not offsets[0] <= offsets[1] <= body):
            raise AdapterError(f"{bad}: tensor {name!r} has a malformed header entry")
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise AdapterError(f"{bad}: tensor {name!r} has unknown dtype {dtype!r}")
        if math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype] != offsets[1] - offsets[0]:
            raise AdapterError(f"{bad}: tensor {name!r} holds {offsets[1] - offsets[0]} bytes, not the size of "
                               f"a {dtype} tensor of shape {shape}")
        layout[name] = (TensorSpec(dtype, tuple(shape)), 8 + size + offsets[0])
        extents.append((offsets[0], offsets[1]))
    end = 0
    for start, stop in sorted(extents):
        if start != end:
            raise AdapterError(f"{bad}: its tensors {'overlap' if start < end else 'leave a gap'} in the data")
        end = stop
    if end != body:
        raise AdapterError(f"{bad}: {body - end} bytes after the last tensor belong to none")
    return layout


def _naturals(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)


def expected_shapes(config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a `TaskAdapter(config)` saves, by arithmetic: nothing is built or allocated.
    Mirrors `generators.build_generator` and `heads`; a test holds the two together."""
    h, length, d = config.backbone.hidden_size, config.prompt_length, config.bottleneck
    if config.generator == "npg":
        shapes = {"generator.down.weight": (d, h), "generator.down.bias": (d,),
                  "generator.up.weight": (length * h, d), "generator.up.bias": (length * h,)}
    elif config.generator in ("mppg", "appg"):
        shapes = {"generator.down.weight": (d, h), "generator.down.bias": (d,),
                  "generator.up.weight": (h, d), "generator.up.bias": (h,)}
    else:
        shapes = {"generator.prompt": (length, h)}
    if config.head == "linear":
        shapes |= {"head.classifier.weight": (len(config.labels), h), "head.classifier.bias": (len(config.labels),)}
    return shapes


# ------------------------------------------------------------------------------------------------- the check
def check_adapter(config: AdapterConfig, tensors: Mapping[str, torch.Tensor | TensorSpec], backbone) -> list[str]:
    """Every reason this adapter cannot run on `backbone`, each a sentence; empty when it fits.

    `tensors` may be the header's `TensorSpec`s (names, dtypes and shapes are checked, nothing is allocated) or
    loaded tensors (their values are checked too).
    """
    problems: list[str] = []
    fp, mine = backbone.fingerprint, config.backbone
    if mine.name != fp.name:
        problems.append(f"adapter was trained on backbone {mine.name!r}, this server serves {fp.name!r}")
    if mine.hidden_size != fp.hidden_size:
        problems.append(f"hidden size is {mine.hidden_size}, the backbone's is {fp.hidden_size}")
    if mine.num_layers != fp.num_layers:
        problems.append(f"layer count is {mine.num_layers}, the backbone has {fp.num_layers}")
    if mine.vocab_size != fp.vocab_size or mine.vocab_hash != fp.vocab_hash:
        problems.append(
            f"vocabulary differs (adapter {mine.vocab_size} tokens, {mine.vocab_hash}; "
            f"backbone {fp.vocab_size} tokens, {fp.vocab_hash})"
        )
    if not 0 <= config.prompt_layer < fp.num_layers:
        problems.append(f"prompt layer {config.prompt_layer} is out of range 0..{fp.num_layers - 1} for this backbone")
    widest = MAX_BOTTLENECK_PER_HIDDEN * fp.hidden_size
    if config.bottleneck > widest:
        problems.append(f"bottleneck {config.bottleneck} is over {widest} ({MAX_BOTTLENECK_PER_HIDDEN} x the "
                        f"backbone's hidden size {fp.hidden_size})")
    if config.head == "verbalizer" and getattr(backbone, "mlm_head", None) is None:
        problems.append("the verbalizer head needs a backbone with an MLM head; this one has none (use a linear head)")
    problems += _template_problems(config, backbone)
    _, word_problems = label_word_ids(config, backbone.tokenizer)
    problems += word_problems
    if problems:
        # Shapes below derive from the config, so they would only repeat the mismatch above.
        return problems
    expected = expected_shapes(config)
    got = {name: _spec(t) for name, t in tensors.items()}
    for name in sorted(expected.keys() - got.keys()):
        problems.append(f"tensor {name!r} is missing")
    for name in sorted(got.keys() - expected.keys()):
        problems.append(f"tensor {name!r} is not part of a {config.generator}/{config.head} adapter")
    for name in sorted(expected.keys() & got.keys()):
        if expected[name] != got[name].shape:
            problems.append(f"tensor {name!r} has shape {list(got[name].shape)}, expected {list(expected[name])}")
    for name, spec in got.items():
        if spec.dtype not in FLOAT_DTYPES:
            problems.append(f"tensor {name!r} has dtype {spec.dtype}, expected a floating point type")
    if not problems:
        loaded = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
        problems += value_problems(loaded, getattr(backbone, "dtype", torch.float32))
    return problems


# A value is NaN or infinite exactly when all its exponent bits are set: the exponent mask of each 16-bit float, and
# numpy's own isfinite for the wider ones.
_NONFINITE_EXPONENT = {"F16": 0x7C00, "BF16": 0x7F80}
# The stored floats as numpy reads them (the format is little-endian, whatever the host); bfloat16 numpy lacks.
_NUMPY_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. On the CPU this runs in numpy, on the calling thread alone: a load runs beside
    the inference threads' passes, and a torch op here would start a second team of intra-op threads that fights
    theirs for the same cores."""
    if tensor.device.type != "cpu" or tensor.dtype not in FLOAT_DTYPES.values():
        return bool(torch.isfinite(tensor).all())
    values = tensor.detach().contiguous()
    if tensor.dtype != torch.bfloat16:
        return bool(np.isfinite(values.numpy()).all())
    # numpy has no bfloat16: a bfloat16 is NaN or infinite exactly when its exponent bits are all ones.
    exponent = _NONFINITE_EXPONENT["BF16"]
    return not bool(np.any((values.view(torch.int16).numpy() & exponent) == exponent))


def stored_values_finite(data: Buffer, layout: dict[str, tuple[TensorSpec, int]]) -> bool:
    """Whether every floating point value in the file is finite, read in numpy straight from its bytes: no tensor,
    no torch op (each hands the GIL to another thread), one check for a file whose tensors share one dtype. False
    also when it cannot tell (integer tensors, values not aligned to their size): the per-tensor check decides."""
    dtypes = {spec.dtype for spec, _ in layout.values()}
    if not layout or not dtypes <= FLOAT_DTYPES.keys():
        return False
    if len(dtypes) == 1:  # the tensors tile the data section: one span from the first to the last
        dtype = dtypes.pop()
        first = min(offset for _, offset in layout.values())
        spans = [(dtype, first, sum(math.prod(spec.shape) for spec, _ in layout.values()))]
    else:
        spans = [(spec.dtype, offset, math.prod(spec.shape)) for spec, offset in layout.values()]
    for dtype, offset, count in spans:
        if offset % SAFETENSORS_ITEMSIZE[dtype]:
            return False
        if dtype in _NONFINITE_EXPONENT:  # numpy's float16 isfinite is ten times slower than the bit test
            if ((np.frombuffer(data, np.dtype("<u2"), count, offset) & _NONFINITE_EXPONENT[dtype])
                    == _NONFINITE_EXPONENT[dtype]).any():
                return False
        elif not np.isfinite(np.frombuffer(data, _NUMPY_DTYPES[dtype], count, offset)).all():
            return False
    return True


def value_problems(tensors: Mapping[str, torch.Tensor], serving_dtype: torch.dtype, *,
                   known_finite: bool = False) -> list[str]:
    """Weights must be finite, and stay finite in the dtype the server runs them in (1e5 is inf in float16).
    `known_finite`: the caller checked the stored values (`stored_values_finite`)."""
    problems = []
    for name, tensor in tensors.items():
        if not known_finite and not all_finite(tensor):
            problems.append(f"tensor {name!r} holds NaN or infinite values")
        elif (torch.finfo(serving_dtype).max < torch.finfo(tensor.dtype).max
              and not torch.isfinite(tensor.to(serving_dtype)).all()):
            limit = torch.finfo(serving_dtype).max
            problems.append(f"tensor {name!r} holds values beyond {serving_dtype}'s range (+-{limit:.4g}), the "
                            "dtype this server runs adapters in")
    return problems


def parse_weights(data: Buffer) -> dict[str, torch.Tensor]:
    """The file's tensors. Floating point ones are views of one writable buffer, `data` itself when it is writable
    (`read_weights` reads into one), else a copy of it: no copy per tensor. A server loads tens of adapters a
    second, and the safetensors library's `load` copies each tensor out of the file's bytes, then wraps every copy."""
    return _tensors(data, _layout(data))


def _tensors(data: Buffer, layout: dict[str, tuple[TensorSpec, int]]) -> dict[str, torch.Tensor]:
    if sys.byteorder != "little" or any(spec.dtype not in FLOAT_DTYPES or offset % SAFETENSORS_ITEMSIZE[spec.dtype]
                                        for spec, offset in layout.values()):
        # Big-endian hosts, integer tensors and a header whose length leaves tensors unaligned: the library's way.
        try:
            return load_safetensors_bytes(bytes(data))
        except (SafetensorError, Exception) as exc:  # safetensors raises assorted types on garbage input
            raise AdapterError(f"{WEIGHTS_NAME} is not a valid safetensors file: {exc}") from exc
    writable = isinstance(data, bytearray) or (isinstance(data, memoryview) and not data.readonly)
    buffer = data if writable else bytearray(data)  # torch shares only a writable buffer
    # Built in numpy, handed to torch with `from_numpy`: neither lets go of the GIL, where every torch op (a `view`
    # here) would, and under load each such op waits milliseconds to get it back from the inference threads.
    tensors = {}
    for name, (spec, offset) in layout.items():
        count = math.prod(spec.shape)
        if not count:
            tensors[name] = torch.empty(spec.shape, dtype=FLOAT_DTYPES[spec.dtype])
        elif spec.dtype in _NUMPY_DTYPES:
            tensors[name] = torch.from_numpy(np.frombuffer(buffer, _NUMPY_DTYPES[spec.dtype], count, offset)
                                             .reshape(spec.shape))
        else:  # bfloat16, which numpy lacks: its bits, then a view as bfloat16
            bits = torch.from_numpy(np.frombuffer(buffer, np.int16, count, offset).reshape(spec.shape))
            tensors[name] = bits.view(torch.bfloat16)
    if len(buffer) - sum(t.nbytes for t in tensors.values()) > _MAX_PINNED_OVERHEAD:
        # A header padded with metadata: copies, so that its bytes are not kept alive beside the weights.
        tensors = {name: t.clone() for name, t in tensors.items()}
    return tensors


# Views keep their whole buffer alive, the header too; host memory counts the tensors' bytes only.
_MAX_PINNED_OVERHEAD = 64 * 1024



def read_weights(path: str | Path) -> memoryview:
    """A weights file's bytes in a writable buffer of its own, which `parse_weights` views without copying.

    Few system calls and no zero-fill: a load runs beside the inference threads, and each call hands the GIL to
    another thread that the loader must then wait to get back (io.open's layers made twice the calls)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        buffer = np.empty(size + 1, dtype=np.uint8)  # one byte over: a file longer than its size said is seen
        filled = 0
        while True:  # one call for a local file; network and FUSE file systems may read short
            got = os.readv(fd, [buffer[filled:]])
            filled += got
            if not got or filled >= size:  # the end, as fstat said (no call more to find it), or past it
                break
        if filled > size:  # it grew meanwhile (never in a store, whose files are written once): read it whole
            rest = bytearray()
            while chunk := os.read(fd, 1 << 20):
                rest += chunk
            return memoryview(bytearray(buffer[:filled].tobytes()) + rest)
        return memoryview(buffer)[:filled]
    finally:
        os.close(fd)


def read_config(path: str | Path) -> bytes:
    """A config file's bytes (at most one byte over MAX_CONFIG_BYTES: enough for the size check to refuse it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, MAX_CONFIG_BYTES + 1)
        while len(data) <= MAX_CONFIG_BYTES and data and (more := os.read(fd, MAX_CONFIG_BYTES + 1 - len(data))):
            data += more  # a short read (network and FUSE file systems): read on to the end or the cap
        return data
    finally:
        os.close(fd)


def build_adapter(config_bytes: bytes | str, weights_bytes: Buffer, backbone) -> TaskAdapter:
    """Parse, check against the backbone and build a ready adapter, or raise AdapterError naming every problem.

    Names, dtypes and shapes are checked from the header before any tensor is read, so a config that describes
    a huge adapter next to small weights is refused before anything of its size exists.
    """
    config = AdapterConfig.from_json(config_bytes)
    layout = _layout(weights_bytes)
    problems = check_adapter(config, {name: spec for name, (spec, _) in layout.items()}, backbone)
    if problems:
        raise AdapterError(problems)
    tensors = _tensors(weights_bytes, layout)  # the header said what these are; only their values are left to check
    problems = value_problems(tensors, getattr(backbone, "dtype", torch.float32),
                              known_finite=stored_values_finite(weights_bytes, layout))
    if problems:
        raise AdapterError(problems)
    word_ids, _ = label_word_ids(config, backbone.tokenizer)
    return _from_tensors(config, word_ids, tensors)


def _from_tensors(config: AdapterConfig, word_ids: list[int] | None, tensors: dict[str, torch.Tensor]) -> TaskAdapter:
    """The adapter made of these tensors themselves, in the dtype they were stored in (fp64 becomes fp32). The
    caller has checked the tensors' names and shapes against the config (`check_adapter`)."""
    if any(t.dtype == torch.float64 for t in tensors.values()):
        # Converted, and the rest copied: a view left alone would keep the whole file's buffer alive for a few bytes.
        tensors = {k: t.float() if t.dtype == torch.float64 else t.clone() for k, t in tensors.items()}
    skeleton = _skeleton(config) if config.head == "linear" else None
    if skeleton is not None:
        adapter = _copy_tree(skeleton)
        adapter.__dict__["config"] = config
        for name, tensor in tensors.items():
            *path, attribute = name.split(".")
            module = adapter
            for part in path:
                module = module._modules[part]
            module._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
        return adapter
    # Built on the meta device, so no weight is ever allocated and randomly initialised only to be overwritten.
    with torch.device("meta"):
        adapter = TaskAdapter(config, word_ids)
    if config.head == "verbalizer":
        adapter.head = VerbalizerHead(word_ids)  # no weights; its label ids are a buffer the file does not hold
    adapter.load_state_dict(tensors, strict=True, assign=True)
    adapter.eval()
    for p in adapter.parameters():
        p.requires_grad_(False)
    return adapter


# A server loads tasks on demand, tens a second under skewed traffic over thousands of tasks, and building the
# modules was most of a load: nn.Module construction, Linear's random init (run even on the meta device) and
# load_state_dict's walk, ~1.5 ms of Python that holds the GIL against the inference threads. Adapters of one
# structure differ only in their config and weights, so each structure is built once, on the meta device, and a
# load copies that tree's objects (fresh attribute dicts, nothing shared) and puts its own tensors in.
_SKELETONS_KEPT = 64
_skeletons: dict[tuple, _TreePlan] = {}


@dataclass(frozen=True)
class _TreePlan:
    """How to copy one module tree: per module its class, its attributes, the names of those that are containers
    (copied, never shared) and its children's plans. Worked out once per structure, so a copy is a few dict copies
    per module with no type tests."""

    cls: type
    attributes: dict[str, Any]
    containers: tuple[str, ...]
    children: tuple[tuple[str, _TreePlan | None], ...]

    @classmethod
    def of(cls, module: nn.Module) -> _TreePlan:
        containers = tuple(name for name, value in module.__dict__.items()
                           if isinstance(value, (dict, set)) and name != "_modules")
        children = tuple((name, None if child is None else cls.of(child)) for name, child in module._modules.items())
        return cls(type(module), module.__dict__, containers, children)


def _structure(config: AdapterConfig) -> tuple:
    """Every config field `TaskAdapter.__init__` builds modules from (a linear head's): adapters that agree on these
    have the same module tree."""
    return (config.generator, config.backbone.hidden_size, config.prompt_length, config.bottleneck, config.dropout,
            config.head, len(config.labels), config.pooling)


def _skeleton(config: AdapterConfig) -> _TreePlan | None:
    key = _structure(config)
    plan = _skeletons.get(key)
    if plan is None:
        with torch.device("meta"):
            skeleton = TaskAdapter(config).eval()
        if set(skeleton.state_dict()) != set(expected_shapes(config)):
            return None  # the weights would not replace every meta tensor: take the slow path
        for p in skeleton.parameters():
            p.requires_grad_(False)
        if len(_skeletons) >= _SKELETONS_KEPT:
            _skeletons.pop(next(iter(_skeletons)), None)
        plan = _skeletons[key] = _TreePlan.of(skeleton)
    return plan


def _copy_tree(plan: _TreePlan) -> nn.Module:
    """A new module tree as `plan` describes: new objects whose containers (parameters, buffers, hooks, children)
    are copies, so nothing done to the copy reaches the skeleton; the parameters are still the skeleton's until
    replaced."""
    copy = object.__new__(plan.cls)
    attributes = plan.attributes.copy()
    for name in plan.containers:
        attributes[name] = attributes[name].copy()
    modules = attributes["_modules"] = attributes["_modules"].copy()
    for name, child in plan.children:
        modules[name] = None if child is None else _copy_tree(child)
    object.__setattr__(copy, "__dict__", attributes)  # not nn.Module.__setattr__'s type tests
    return copy


def load_adapter(directory: str | Path, backbone) -> TaskAdapter:
    folder = Path(directory)
    files: list[bytes | memoryview] = []
    for name, read in ((CONFIG_NAME, read_config), (WEIGHTS_NAME, read_weights)):
        try:
            files.append(read(folder / name))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise AdapterError(f"{folder} has no {name}: an adapter directory holds {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME}") from None
    return build_adapter(*files, backbone)


# ------------------------------------------------------------------------------------------------- compact
def compact_weights(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor in `dtype` (fp16 or bf16); AdapterError naming each tensor that would not stay finite there."""
    if dtype not in COMPACT_DTYPES.values():
        raise AdapterError(f"compact dtype must be one of {', '.join(COMPACT_DTYPES)}, not {dtype}")
    out, problems = {}, []
    for name, tensor in tensors.items():
        cast = tensor.detach().to("cpu", dtype).contiguous()
        if all_finite(tensor) and not all_finite(cast):
            limit = torch.finfo(dtype).max
            problems.append(f"tensor {name!r} holds values beyond {dtype}'s range (+-{limit:.4g}): use bf16, "
                            "which keeps fp32's range")
        out[name] = cast
    if problems:
        raise AdapterError(problems)
    return out


def compact_adapter(source: str | Path, dtype: str, out: str | Path, backbone=None) -> Path:
    """Write a copy of the adapter directory `source` with its weights in `dtype` ("fp16" or "bf16"): half the
    bytes on disk and in a server's memory. The config is copied as it is. With `backbone`, the copy is checked
    against it the way an upload is."""
    if dtype not in COMPACT_DTYPES:
        raise AdapterError(f"the compact dtype must be one of {', '.join(COMPACT_DTYPES)}, not {dtype!r}")
    folder, target = Path(source), Path(out)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise AdapterError(f"{folder} has no {name}: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if target.resolve() == folder.resolve():
        raise AdapterError(f"the output directory {target} is the source directory: write the compact copy elsewhere")
    config_bytes = (folder / CONFIG_NAME).read_bytes()
    AdapterConfig.from_json(config_bytes)  # a broken config is refused here, not by the server that gets the copy
    weights = parse_weights((folder / WEIGHTS_NAME).read_bytes())
    data = save_safetensors_bytes(compact_weights(weights, COMPACT_DTYPES[dtype]), metadata={"format": "pt"})
    if backbone is not None:
        build_adapter(config_bytes, data, backbone)
    target.mkdir(parents=True, exist_ok=True)
    (target / CONFIG_NAME).write_bytes(config_bytes)
    (target / WEIGHTS_NAME).write_bytes(data)
    return target
