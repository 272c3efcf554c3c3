"""The task adapter: config + generator + head, its on-disk form, and the check against a backbone.

A directory like PEFT's: `adapter_config.json` (sorted, indented) and `adapter_model.safetensors`
(contiguous tensors, `{"format": "pt"}` metadata). Weights are read with safetensors only: nothing is ever
unpickled, so a pickled checkpoint is refused as "not a safetensors file".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn


class AdapterConfig(BaseModel):
    """Everything needed to rebuild a task's generator and head, and to know which backbone it belongs to."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    task: str
    labels: list[str] = Field(min_length=2)
    method: Literal["lpt", "prompt"] = "lpt"
    generator: Literal["npg", "mppg", "appg", "static"] = "npg"
    prompt_layer: int = Field(ge=0)
    prompt_length: int = Field(ge=1, le=256)
    bottleneck: int = Field(default=128, ge=1)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    head: Literal["linear", "verbalizer"] = "linear"
    pooling: Literal["mean", "cls", "mean_prompt"] = "mean"
    template: str | None = None
    label_words: list[str] | None = None
    max_length: int | None = Field(default=None, ge=8)
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
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterError(f"{CONFIG_NAME} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise AdapterError(f"{CONFIG_NAME} must hold a JSON object")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise AdapterError([_pydantic_problem(e) for e in exc.errors()]) from exc


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
        return sum(p.numel() for p in self.parameters())

    def generate(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.generator(hidden, mask)

    def logits(self, hidden: torch.Tensor, token_mask: torch.Tensor, prompt_mask: torch.Tensor,
               mask_positions: torch.Tensor | None, backbone) -> torch.Tensor:
        return self.head(hidden, token_mask, prompt_mask, mask_positions, backbone)

    # ------------------------------------------------------------------------------------------- save / load
    def state_for_disk(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(self.config.to_json())
        (out / WEIGHTS_NAME).write_bytes(save_safetensors_bytes(self.state_for_disk(), metadata={"format": "pt"}))
        return out


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


def check_adapter(config: AdapterConfig, tensors: dict[str, torch.Tensor], backbone) -> list[str]:
    """Every reason this adapter cannot run on `backbone`, each a sentence; empty when it fits."""
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
    if config.head == "verbalizer" and getattr(backbone, "mlm_head", None) is None:
        problems.append("the verbalizer head needs a backbone with an MLM head; this one has none (use a linear head)")
    word_ids, word_problems = label_word_ids(config, backbone.tokenizer)
    problems += word_problems
    if problems:
        # Shapes below derive from the config, so they would only repeat the mismatch above.
        return problems
    expected = {k: tuple(v.shape) for k, v in TaskAdapter(config, word_ids).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    for name in sorted(expected.keys() - got.keys()):
        problems.append(f"tensor {name!r} is missing")
    for name in sorted(got.keys() - expected.keys()):
        problems.append(f"tensor {name!r} is not part of a {config.generator}/{config.head} adapter")
    for name in sorted(expected.keys() & got.keys()):
        if expected[name] != got[name]:
            problems.append(f"tensor {name!r} has shape {list(got[name])}, expected {list(expected[name])}")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            problems.append(f"tensor {name!r} has dtype {tensor.dtype}, expected a floating point type")
        elif not torch.isfinite(tensor).all():
            problems.append(f"tensor {name!r} holds NaN or infinite values")
    return problems


def parse_weights(data: bytes) -> dict[str, torch.Tensor]:
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise AdapterError(f"{WEIGHTS_NAME} is a pickle/zip checkpoint; only safetensors is accepted")
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, Exception) as exc:  # safetensors raises assorted types on garbage input
        raise AdapterError(f"{WEIGHTS_NAME} is not a valid safetensors file: {exc}") from exc


def build_adapter(config_bytes: bytes | str, weights_bytes: bytes, backbone) -> TaskAdapter:
    """Parse, check against the backbone and build a ready adapter, or raise AdapterError naming every problem."""
    config = AdapterConfig.from_json(config_bytes)
    tensors = parse_weights(weights_bytes)
    problems = check_adapter(config, tensors, backbone)
    if problems:
        raise AdapterError(problems)
    word_ids, _ = label_word_ids(config, backbone.tokenizer)
    adapter = TaskAdapter(config, word_ids)
    adapter.load_state_dict(tensors, strict=True)
    adapter.eval()
    for p in adapter.parameters():
        p.requires_grad_(False)
    return adapter


def load_adapter(directory: str | Path, backbone) -> TaskAdapter:
    folder = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise AdapterError(f"{folder} has no {name}: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    return build_adapter((folder / CONFIG_NAME).read_bytes(), (folder / WEIGHTS_NAME).read_bytes(), backbone)
