"""Training: LPT (late prompt), classic prompt tuning, LoRA and full fine-tuning with the same loop and metrics.

LPT freezes the backbone, so the hidden states below the prompt layer are a pure function of the tokens.
We compute them once per example and reuse them every epoch: each step then runs only the generator, the
upper layers and the head. `--no-cache` turns this off (for benchmarks that compare against it).

The epoch kept is the one with the best dev accuracy; among epochs of equal dev accuracy, the one with the lowest
dev loss (mean cross-entropy), which is the better calibrated one: accuracy on a small or easy dev set saturates
early, and keeping the first epoch that reaches it keeps a model that is right but unsure.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lpt_serve.model.adapter import AdapterConfig, TaskAdapter, label_word_ids
from lpt_serve.model.backbone import Backbone
from lpt_serve.model.engine import Encoded, TaskGroup, encode_texts, pad_rows, upper_forward
from lpt_serve.model.heads import LinearHead, masked_mean

log = logging.getLogger(__name__)

Method = Literal["lpt", "prompt", "full", "lora"]
METHODS: tuple[str, ...] = ("lpt", "prompt", "lora", "full")
DEFAULT_LR = {"lpt": 2e-3, "prompt": 3e-2, "lora": 1e-3, "full": 3e-5}
CALIBRATION_BINS = 15
LORA_CONFIG_NAME = "lora_config.json"
LORA_WEIGHTS_NAME = "lora_model.safetensors"


class TrainError(Exception):
    """Training cannot start or go on; the message is one sentence that says what to fix."""


@dataclass
class TrainSettings:
    method: Method = "lpt"
    generator: str = "npg"
    prompt_layer: int | None = None  # None: the middle layer (N // 2), the paper's choice
    prompt_length: int = 5
    bottleneck: int = 128
    dropout: float = 0.1
    head: str = "linear"
    pooling: str = "mean"
    template: str | None = None
    label_words: list[str] | None = None
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("query", "value")
    epochs: int = 12
    patience: int | None = None  # stop after this many epochs without a better dev epoch; None: run every epoch
    lr: float | None = None  # None: per method (DEFAULT_LR)
    weight_decay: float = 0.01
    warmup: float = 0.06
    batch_size: int = 32
    max_length: int = 256
    seed: int = 0
    cache_lower: bool = True
    eval_batch_size: int = 64

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    dev_accuracy: float
    dev_macro_f1: float
    seconds: float
    dev_loss: float = math.nan
    dev_ece: float = math.nan
    train_seconds: float = math.nan  # the optimiser steps alone, without the dev pass


@dataclass
class TrainResult:
    adapter: TaskAdapter | None
    labels: list[str]
    epochs: list[EpochReport]
    best_epoch: int
    dev_metrics: dict[str, float]
    trainable_parameters: int
    cache_seconds: float
    seconds: float
    full_model: nn.Module | None = None
    extra: dict = field(default_factory=dict)
    model: nn.Module | None = None  # what was trained: the adapter, the LoRA model or the full model
    method: str = "lpt"
    trainable_names: list[str] = field(default_factory=list)  # state_dict keys of the trained tensors


# --------------------------------------------------------------------------------------------------- metrics
def classification_metrics(gold: Sequence[int], pred: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean of per-class F1, a class with no gold and no predicted rows excluded)."""
    if not gold:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    correct = sum(int(g == p) for g, p in zip(gold, pred, strict=True))
    f1s = []
    for c in range(num_labels):
        tp = sum(1 for g, p in zip(gold, pred, strict=True) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred, strict=True) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred, strict=True) if g == c and p != c)
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": correct / len(gold), "macro_f1": sum(f1s) / max(1, len(f1s))}


def expected_calibration_error(probs: torch.Tensor, gold: Sequence[int], bins: int = CALIBRATION_BINS) -> float:
    """ECE over the top-class confidence: `bins` equal-width bins ((m-1)/M, m/M], each bin's |accuracy - mean
    confidence| weighted by its share of the rows (Guo et al., 2017). 0 when every confidence is its hit rate."""
    if len(gold) == 0:
        return 0.0
    confidence, pred = probs.double().max(dim=-1)
    correct = (pred == torch.as_tensor(list(gold), dtype=torch.long)).double()
    index = (torch.ceil(confidence * bins) - 1).clamp(0, bins - 1).long()
    ece = 0.0
    for m in range(bins):
        rows = index == m
        count = int(rows.sum())
        if count:
            ece += count / len(gold) * abs(float(correct[rows].mean()) - float(confidence[rows].mean()))
    return ece


def probability_metrics(probs: torch.Tensor, gold: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 of the argmax, expected calibration error and log loss (mean cross-entropy)."""
    metrics = classification_metrics(list(gold), probs.argmax(-1).tolist(), num_labels)
    if len(gold) == 0:
        return metrics | {"ece": 0.0, "log_loss": 0.0}
    target = torch.as_tensor(list(gold), dtype=torch.long)
    picked = probs.double()[torch.arange(len(target)), target].clamp_min(1e-12)
    return metrics | {"ece": expected_calibration_error(probs, gold), "log_loss": float(-picked.log().mean())}


def is_better_epoch(metrics: dict[str, float], best: dict[str, float] | None) -> bool:
    """Higher dev accuracy wins; on equal accuracy, lower dev loss (the better calibrated epoch)."""
    if best is None:
        return True
    if metrics["accuracy"] != best["accuracy"]:
        return metrics["accuracy"] > best["accuracy"]
    return metrics["log_loss"] < best["log_loss"]


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of these tensors as one fp32 safetensors file, the way adapters are written."""
    from safetensors.torch import save

    return len(save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()},
                    metadata={"format": "pt"}))


def unique_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """`state_dict` with each tensor once: `Backbone.layers` is the encoder's own layer list under a second name,
    and safetensors refuses tensors that share memory."""
    seen: set[int] = set()
    out = {}
    for name, tensor in module.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor
    return out


# ----------------------------------------------------------------------------------------------- batching
def _length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random | None) -> list[list[int]]:
    """Batches of similar length (less padding); shuffled when rng is given, in order otherwise."""
    order = list(range(len(lengths)))
    if rng is not None:
        rng.shuffle(order)
    # Sort within windows of 50 batches: short rows travel together, yet every epoch mixes differently.
    window = batch_size * 50
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i : i + window], key=lambda j: lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


LowerPool = dict[tuple[int, tuple[int, ...]], torch.Tensor]


class LowerCache:
    """H_k of every example, computed once with the frozen layers, stored unpadded on the CPU.

    `pool` (optional, owned by the caller) keeps rows across caches, keyed by (k, token ids): a benchmark that trains
    many adapters on subsets of the same data computes each row once. It is only valid for one frozen backbone.
    """

    def __init__(self, backbone: Backbone, encoded: Sequence[Encoded], upto: int, batch_size: int,
                 desc: str = "caching lower layers", progress: bool = True, pool: LowerPool | None = None) -> None:
        pool = {} if pool is None else pool
        keys = [(upto, e.input_ids) for e in encoded]
        missing = list({key: i for i, key in enumerate(keys) if key not in pool}.values())
        lengths = [len(encoded[i].input_ids) for i in missing]
        pad_id = backbone.tokenizer.pad_token_id or 0
        with torch.inference_mode():
            for batch in tqdm(_length_batches(lengths, batch_size, None), desc=desc, unit="batch", leave=False,
                              disable=not progress or not missing):
                rows = [missing[j] for j in batch]
                ids, mask = pad_rows([encoded[i].input_ids for i in rows], pad_id)
                hidden = backbone.lower(ids.to(backbone.device), mask.to(backbone.device), upto=upto)
                for j, i in enumerate(rows):
                    pool[keys[i]] = hidden[j, : len(encoded[i].input_ids)].to("cpu").clone()
        self.rows: list[torch.Tensor] = [pool[key] for key in keys]

    def batch(self, indices: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.rows[i] for i in indices]
        width = max(r.shape[0] for r in rows)
        hidden = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            hidden[j, : r.shape[0]] = r
            mask[j, : r.shape[0]] = 1
        return hidden.to(device), mask.to(device)


# ------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Trains one task on a frozen backbone; `full` trains the backbone itself and `lora` adds LoRA layers to it,
    so those two change the backbone they are given: give them a private copy (`Backbone.load()`)."""

    def __init__(self, backbone: Backbone, settings: TrainSettings, *, progress: bool = True,
                 lower_pool: LowerPool | None = None) -> None:
        self.backbone = backbone
        self.settings = settings
        self.progress = progress
        self.lower_pool = lower_pool

    # ---------------------------------------------------------------------------------------------- checks
    def _check(self, train: Sequence[tuple[str, str]], dev: Sequence[tuple[str, str]]) -> list[str]:
        s = self.settings
        if not train:
            raise TrainError("the training data has no rows")
        if not dev:
            raise TrainError("the dev data has no rows: give --dev FILE or a larger --dev-split")
        labels = sorted({label for _, label in train})
        if len(labels) < 2:
            raise TrainError(f"the training data has a single class ({labels[0]!r}); a classifier needs two or more")
        unknown = sorted({label for _, label in dev} - set(labels))
        if unknown:
            raise TrainError(f"the dev data has labels the training data lacks: {', '.join(map(repr, unknown))}")
        if s.method not in METHODS:
            raise TrainError(f"unknown method {s.method!r}: use one of {', '.join(METHODS)}")
        if s.method in ("lpt", "prompt"):
            k = self.prompt_layer()
            if not 0 <= k < self.backbone.num_layers:
                raise TrainError(
                    f"--prompt-layer {k} is out of range 0..{self.backbone.num_layers - 1} for this backbone")
        if s.head == "verbalizer" and s.label_words and len(s.label_words) != len(labels):
            raise TrainError(f"--label-words gives {len(s.label_words)} words for {len(labels)} labels {labels}")
        if s.method == "lora":
            if s.lora_r < 1:
                raise TrainError(f"--lora-r must be at least 1, not {s.lora_r}")
            if not s.lora_targets:
                raise TrainError("--lora-targets names no module: give e.g. query,value")
            if s.head != "linear":
                raise TrainError("LoRA trains a linear head: drop --head verbalizer")
        if s.patience is not None and s.patience < 1:
            raise TrainError(f"--patience must be at least 1, not {s.patience}")
        return labels

    def prompt_layer(self) -> int:
        s = self.settings
        if s.method == "prompt":
            return 0
        return s.prompt_layer if s.prompt_layer is not None else self.backbone.num_layers // 2

    def _adapter_config(self, task: str, labels: list[str], training: dict | None = None) -> AdapterConfig:
        s = self.settings
        return AdapterConfig(
            task=task, labels=labels, method="prompt" if s.method == "prompt" else "lpt",
            generator="static" if s.method == "prompt" else s.generator,
            prompt_layer=self.prompt_layer(), prompt_length=s.prompt_length, bottleneck=s.bottleneck,
            dropout=s.dropout, head=s.head, pooling=s.pooling, template=s.template, label_words=s.label_words,
            max_length=s.max_length, backbone=self.backbone.fingerprint.as_dict(), training=training,
        )

    def _build(self, task: str, labels: list[str]) -> tuple[nn.Module, TaskAdapter | None]:
        s = self.settings
        if s.method == "full":
            return _FullModel(self.backbone, len(labels), s.pooling, s.dropout), None
        if s.method == "lora":
            return _LoraModel(self.backbone, len(labels), s.pooling, s.dropout, s.lora_r, s.lora_alpha,
                              s.lora_targets), None
        try:
            cfg = self._adapter_config(task, labels)
        except Exception as exc:
            raise TrainError(f"invalid adapter settings: {exc}") from exc
        word_ids, problems = label_word_ids(cfg, self.backbone.tokenizer)
        if problems:
            raise TrainError(problems[0])
        adapter = TaskAdapter(cfg, word_ids).to(self.backbone.device)
        return adapter, adapter

    def _cache(self, encoded: Sequence[Encoded], k: int, what: str) -> LowerCache:
        return LowerCache(self.backbone, encoded, k, self.settings.eval_batch_size, f"caching {what} lower layers",
                          self.progress, self.lower_pool)

    # ----------------------------------------------------------------------------------------------- train
    def train(self, task: str, train: Sequence[tuple[str, str]], dev: Sequence[tuple[str, str]],
              data_name: str = "") -> TrainResult:
        s = self.settings
        labels = self._check(train, dev)
        label_index = {label: i for i, label in enumerate(labels)}
        torch.manual_seed(s.seed)
        rng = random.Random(s.seed)
        started = time.perf_counter()
        template = s.template
        train_enc = encode_texts(self.backbone, [t for t, _ in train], template, s.max_length)
        dev_enc = encode_texts(self.backbone, [t for t, _ in dev], template, s.max_length)
        y_train = [label_index[y] for _, y in train]
        y_dev = [label_index[y] for _, y in dev]

        model, adapter = self._build(task, labels)
        named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        trainable = [p for _, p in named_trainable]
        n_trainable = sum(p.numel() for p in trainable)
        trained = {n for n, _ in named_trainable}

        cache_seconds = 0.0
        train_cache = dev_cache = None
        k = self.prompt_layer() if adapter is not None else 0
        if adapter is not None and s.cache_lower:
            t0 = time.perf_counter()
            train_cache = self._cache(train_enc, k, "train")
            dev_cache = self._cache(dev_enc, k, "dev")
            cache_seconds = time.perf_counter() - t0

        steps_per_epoch = math.ceil(len(train_enc) / s.batch_size)
        total_steps = steps_per_epoch * s.epochs
        optimizer = torch.optim.AdamW(trainable, lr=s.resolved_lr(), weight_decay=s.weight_decay)
        warmup_steps = max(1, int(s.warmup * total_steps))

        def warmup_then_linear_decay(step: int) -> float:
            return min((step + 1) / warmup_steps, max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay)
        lengths = [len(e.input_ids) for e in train_enc]
        reports: list[EpochReport] = []
        best_epoch, best_metrics = 0, None
        best_state: dict[str, torch.Tensor] | None = None
        step_times: list[float] = []
        for epoch in range(1, s.epochs + 1):
            t_epoch = time.perf_counter()
            model.train()
            total_loss, seen = 0.0, 0
            batches = _length_batches(lengths, s.batch_size, rng)
            bar = tqdm(batches, desc=f"epoch {epoch}/{s.epochs}", unit="batch", disable=not self.progress, leave=False)
            for batch in bar:
                t_step = time.perf_counter()
                logits = self._logits(model, batch, train_enc, train_cache, k)
                target = torch.tensor([y_train[i] for i in batch], device=logits.device)
                loss = nn.functional.cross_entropy(logits.float(), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                step_times.append(time.perf_counter() - t_step)
                total_loss += loss.item() * len(batch)
                seen += len(batch)
                bar.set_postfix(loss=f"{total_loss / seen:.4f}")
            train_seconds = time.perf_counter() - t_epoch
            metrics = probability_metrics(self._probabilities(model, dev_enc, dev_cache, k), y_dev, len(labels))
            report = EpochReport(epoch, total_loss / max(1, seen), metrics["accuracy"], metrics["macro_f1"],
                                 time.perf_counter() - t_epoch, metrics["log_loss"], metrics["ece"], train_seconds)
            reports.append(report)
            log.info("epoch %d: loss %.4f, dev accuracy %.4f, dev loss %.4f, dev ECE %.4f (%.1fs)", epoch,
                     report.train_loss, report.dev_accuracy, report.dev_loss, report.dev_ece, report.seconds)
            if self.progress:
                tqdm.write(f"epoch {epoch}: loss {report.train_loss:.4f}  dev acc {report.dev_accuracy:.4f}  "
                           f"dev macro-F1 {report.dev_macro_f1:.4f}  dev loss {report.dev_loss:.4f}  "
                           f"dev ECE {report.dev_ece:.4f}  ({report.seconds:.1f}s)")
            if is_better_epoch(metrics, best_metrics):
                best_epoch, best_metrics = epoch, metrics
                # Only what training changes: a LoRA run need not copy the frozen encoder every better epoch.
                best_state = {n: t.detach().clone() for n, t in model.state_dict().items() if n in trained}
            elif s.patience is not None and epoch - best_epoch >= s.patience:
                log.info("no better dev epoch in %d epochs: stopping after epoch %d", s.patience, epoch)
                break
        if best_state is not None:
            model.load_state_dict(best_state, strict=False)
        model.eval()
        self.backbone.freeze()
        elapsed = time.perf_counter() - started
        best_metrics = best_metrics or {}
        training = {
            "data": data_name, "train_size": len(train), "dev_size": len(dev), "method": s.method,
            "epochs": s.epochs, "epochs_run": len(reports), "best_epoch": best_epoch,
            "best_epoch_rule": "dev accuracy, ties to the lower dev loss", "lr": s.resolved_lr(),
            "batch_size": s.batch_size, "seed": s.seed, "dev": {k2: round(v, 4) for k2, v in best_metrics.items()},
            "trainable_parameters": n_trainable, "seconds": round(elapsed, 1),
        }
        if s.method == "lora":
            training["lora"] = {"r": s.lora_r, "alpha": s.lora_alpha, "targets": list(s.lora_targets)}
        if adapter is not None:
            adapter.config = self._adapter_config(task, labels, training)
        return TrainResult(
            adapter=adapter, labels=labels, epochs=reports, best_epoch=best_epoch, dev_metrics=best_metrics,
            trainable_parameters=n_trainable, cache_seconds=cache_seconds, seconds=elapsed,
            full_model=model if s.method == "full" else None,
            extra={"training": training, "mean_step_seconds": sum(step_times) / max(1, len(step_times)),
                   "max_length": s.max_length, "pooling": s.pooling},
            model=model, method=s.method, trainable_names=[n for n, _ in named_trainable],
        )

    # ------------------------------------------------------------------------------------------- inference
    def _logits(self, model: nn.Module, batch: Sequence[int], encoded: Sequence[Encoded], cache: LowerCache | None,
                k: int) -> torch.Tensor:
        device = self.backbone.device
        if not isinstance(model, TaskAdapter):
            ids, mask = pad_rows([encoded[i].input_ids for i in batch], self.backbone.tokenizer.pad_token_id or 0)
            return model(ids.to(device), mask.to(device))
        if cache is not None:
            hidden, mask = cache.batch(batch, device)
        else:
            ids, mask = pad_rows([encoded[i].input_ids for i in batch], self.backbone.tokenizer.pad_token_id or 0)
            ids, mask = ids.to(device), mask.to(device)
            with torch.no_grad():
                hidden = self.backbone.lower(ids, mask, upto=k)
        positions = None
        if model.config.head == "verbalizer":
            positions = torch.tensor([encoded[i].mask_position for i in batch], device=device)
        group = TaskGroup(model, torch.arange(len(batch), device=device), positions)
        return upper_forward(self.backbone, hidden, mask, k, [group])[0]

    def _probabilities(self, model: nn.Module, encoded: Sequence[Encoded], cache: LowerCache | None,
                       k: int) -> torch.Tensor:
        """Class probabilities [N, C] in row order, in eval mode."""
        model.eval()
        out: torch.Tensor | None = None
        lengths = [len(e.input_ids) for e in encoded]
        with torch.inference_mode():
            for batch in _length_batches(lengths, self.settings.eval_batch_size, None):
                probs = torch.softmax(self._logits(model, batch, encoded, cache, k).float(), dim=-1).cpu()
                if out is None:
                    out = probs.new_zeros(len(encoded), probs.shape[1])
                out[batch] = probs
        assert out is not None
        return out

    def predict_proba(self, result: TrainResult, texts: Sequence[str]) -> torch.Tensor:
        """Class probabilities [N, C] of the trained model of `result` for `texts` (the adapter on cached lower
        layers, like the dev pass; the server's mixed pass gives the same numbers, see `evaluate`)."""
        model = result.model if result.model is not None else result.adapter
        if model is None:
            raise TrainError("this result holds no trained model")
        encoded = encode_texts(self.backbone, list(texts), self.settings.template, self.settings.max_length)
        cache, k = None, 0
        if isinstance(model, TaskAdapter):
            k = model.config.prompt_layer
            cache = self._cache(encoded, k, "eval") if self.settings.cache_lower else None
        return self._probabilities(model, encoded, cache, k)

    def score(self, result: TrainResult, examples: Sequence[tuple[str, str]]) -> dict[str, float]:
        """Accuracy, macro-F1, ECE and log loss of `result`'s model on labelled examples."""
        index = {label: i for i, label in enumerate(result.labels)}
        unknown = sorted({y for _, y in examples} - set(index))
        if unknown:
            raise TrainError(f"the data has labels the model does not know: {', '.join(map(repr, unknown))}")
        probs = self.predict_proba(result, [t for t, _ in examples])
        return probability_metrics(probs, [index[y] for _, y in examples], len(result.labels))


# ------------------------------------------------------------------------------------ encoder classifiers
class _EncoderClassifier(nn.Module):
    """The encoder's last layer, pooled, then a linear head: what full fine-tuning and LoRA train."""

    def __init__(self, backbone: Backbone, num_labels: int, pooling: str, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = LinearHead(backbone.hidden_size, num_labels, pooling, dropout).to(backbone.device)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(ids, mask)
        pooled = hidden[:, 0] if self.head.pooling == "cls" else masked_mean(hidden, mask)
        return self.head.classifier(self.head.dropout(pooled))


class _FullModel(_EncoderClassifier):
    """Full fine-tuning: every backbone weight plus a linear head over the mean of the last layer."""

    def __init__(self, backbone: Backbone, num_labels: int, pooling: str, dropout: float) -> None:
        super().__init__(backbone, num_labels, pooling, dropout)
        backbone.unfreeze()


def _has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_modules())


class _LoraModel(_EncoderClassifier):
    """LoRA (PEFT) in the frozen encoder's `targets` linear layers, plus a linear head over the mean of the last
    layer. The backbone stays in eval mode like LPT's (no dropout in the frozen weights); LoRA's own dropout runs
    while training, as the adapter's does in LPT."""

    def __init__(self, backbone: Backbone, num_labels: int, pooling: str, dropout: float, r: int, alpha: float,
                 targets: Sequence[str]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        super().__init__(backbone, num_labels, pooling, dropout)
        if _has_lora(backbone.encoder):
            raise TrainError("this backbone already holds LoRA layers: load a fresh one for each LoRA run")
        self.lora_settings = {"r": r, "alpha": alpha, "targets": list(targets), "dropout": dropout}
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
        try:
            inject_adapter_in_model(config, backbone.encoder)
        except ValueError as exc:  # PEFT's NoMatchingPeftModuleError is a ValueError
            raise TrainError(f"--lora-targets {','.join(targets)}: {exc}") from None
        backbone.to(backbone.device)
        for name, p in backbone.named_parameters():
            p.requires_grad_("lora_" in name)

    def train(self, mode: bool = True) -> _LoraModel:
        super().train(mode)  # the backbone keeps itself in eval mode
        for name, module in self.backbone.named_modules():
            if "lora_dropout" in name:
                module.train(mode)
        return self

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in unique_state(self).items() if "lora_" in n or n.startswith("head.")}


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate(backbone: Backbone, adapter: TaskAdapter, examples: Sequence[tuple[str, str]],
             batch_size: int = 64) -> dict[str, float]:
    """Accuracy, macro-F1, expected calibration error (15 bins) and log loss of a served adapter on labelled
    examples (labels must be the adapter's), through the server's own mixed pass."""
    from lpt_serve.model.engine import classify_rows

    unknown = sorted({y for _, y in examples} - set(adapter.labels))
    if unknown:
        raise TrainError(f"the data has labels the adapter does not know: {', '.join(map(repr, unknown))} "
                         f"(the adapter's labels are {adapter.labels})")
    encoded = encode_texts(backbone, [t for t, _ in examples], adapter.config.template, adapter.config.max_length)
    probs: list[torch.Tensor] = []
    for i in tqdm(range(0, len(encoded), batch_size), desc="evaluating", unit="batch", leave=False):
        chunk = encoded[i : i + batch_size]
        probs += classify_rows(backbone, [adapter] * len(chunk), chunk)
    index = {label: i for i, label in enumerate(adapter.labels)}
    stacked = torch.stack(probs) if probs else torch.zeros(0, len(adapter.labels))
    return probability_metrics(stacked, [index[y] for _, y in examples], len(adapter.labels))


# ----------------------------------------------------------------------------------- full and LoRA on disk
def save_full_model(result: TrainResult, out: Path) -> None:
    """Full fine-tuning has no adapter to serve; keep its weights (safetensors) and metrics for comparison."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    assert result.full_model is not None
    state = {k: v.detach().cpu().contiguous() for k, v in unique_state(result.full_model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "metrics.json").write_text(json.dumps(result.extra["training"] | {"labels": result.labels}, indent=2) + "\n")


def save_lora_model(result: TrainResult, out: Path) -> Path:
    """A LoRA run is not servable here; keep its LoRA weights and head (fp32 safetensors) and a config that
    `load_lora_model` rebuilds it from, for benchmarks and `lpt eval`."""
    from safetensors.torch import save

    model = result.model
    if not isinstance(model, _LoraModel):
        raise TrainError("this result is not a LoRA run")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.lora_state().items()}
    (out / LORA_WEIGHTS_NAME).write_bytes(save(state, metadata={"format": "pt"}))
    config = {"method": "lora", "labels": result.labels, **model.lora_settings, "pooling": result.extra["pooling"],
              "max_length": result.extra["max_length"], "backbone": model.backbone.fingerprint.as_dict(),
              "training": result.extra["training"]}
    (out / LORA_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def load_lora_model(folder: str | Path, backbone: Backbone) -> tuple[TrainResult, TrainSettings]:
    """What `save_lora_model` wrote, injected into `backbone` (which it changes: give a fresh one), ready for
    `Trainer(backbone, settings).score(result, rows)`."""
    from safetensors.torch import load

    folder = Path(folder)
    try:
        config = json.loads((folder / LORA_CONFIG_NAME).read_text())
        state = load((folder / LORA_WEIGHTS_NAME).read_bytes())
    except (OSError, ValueError) as exc:
        raise TrainError(f"{folder} is not a LoRA run directory ({exc})") from None
    if config["backbone"]["hidden_size"] != backbone.hidden_size:
        raise TrainError(f"{folder} was trained on a backbone of hidden size {config['backbone']['hidden_size']}, "
                         f"this one has {backbone.hidden_size}")
    model = _LoraModel(backbone, len(config["labels"]), config["pooling"], config["dropout"], config["r"],
                       config["alpha"], config["targets"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    wanted = set(model.lora_state())
    if unexpected or wanted & set(missing):
        raise TrainError(f"{folder}'s weights do not fit its config (missing {sorted(wanted & set(missing))[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.eval()
    backbone.freeze()
    settings = TrainSettings(method="lora", max_length=config["max_length"], pooling=config["pooling"],
                             lora_r=config["r"], lora_alpha=config["alpha"], lora_targets=tuple(config["targets"]))
    result = TrainResult(adapter=None, labels=config["labels"], epochs=[], best_epoch=0, dev_metrics={},
                         trainable_parameters=sum(t.numel() for t in state.values()), cache_seconds=0.0, seconds=0.0,
                         model=model, method="lora", extra={"training": config.get("training", {})})
    return result, settings
