"""Training: LPT (late prompt), classic prompt tuning, and full fine-tuning with the same loop and metrics.

LPT freezes the backbone, so the hidden states below the prompt layer are a pure function of the tokens.
We compute them once per example and reuse them every epoch: each step then runs only the generator, the
upper layers and the head. `--no-cache` turns this off (for benchmarks that compare against it).
"""

from __future__ import annotations

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

Method = Literal["lpt", "prompt", "full"]


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
    epochs: int = 12
    lr: float | None = None  # None: per method (lpt 3e-3, prompt 3e-2, full 3e-5)
    weight_decay: float = 0.01
    warmup: float = 0.06
    batch_size: int = 32
    max_length: int = 256
    seed: int = 0
    cache_lower: bool = True
    eval_batch_size: int = 64

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else {"lpt": 2e-3, "prompt": 3e-2, "full": 3e-5}[self.method]


@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    dev_accuracy: float
    dev_macro_f1: float
    seconds: float


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


class LowerCache:
    """H_k of every example, computed once with the frozen layers, stored unpadded on the CPU."""

    def __init__(self, backbone: Backbone, encoded: Sequence[Encoded], upto: int, batch_size: int,
                 desc: str = "caching lower layers", progress: bool = True) -> None:
        self.rows: list[torch.Tensor] = [torch.empty(0)] * len(encoded)
        lengths = [len(e.input_ids) for e in encoded]
        pad_id = backbone.tokenizer.pad_token_id or 0
        with torch.inference_mode():
            for batch in tqdm(_length_batches(lengths, batch_size, None), desc=desc, unit="batch", leave=False,
                              disable=not progress):
                ids, mask = pad_rows([encoded[i].input_ids for i in batch], pad_id)
                hidden = backbone.lower(ids.to(backbone.device), mask.to(backbone.device), upto=upto)
                for j, i in enumerate(batch):
                    self.rows[i] = hidden[j, : lengths[i]].to("cpu").clone()

    def batch(self, indices: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.rows[i] for i in indices]
        width = max(r.shape[0] for r in rows)
        hidden = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            hidden[j, : r.shape[0]] = r
            mask[j, : r.shape[0]] = 1
        return hidden.to(device), mask.to(device)


class Trainer:
    """Trains one task on a frozen backbone (or, for `full`, on the backbone itself)."""

    def __init__(self, backbone: Backbone, settings: TrainSettings, *, progress: bool = True) -> None:
        self.backbone = backbone
        self.settings = settings
        self.progress = progress

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
        if s.method != "full":
            k = self.prompt_layer()
            if not 0 <= k < self.backbone.num_layers:
                raise TrainError(
                    f"--prompt-layer {k} is out of range 0..{self.backbone.num_layers - 1} for this backbone")
        if s.head == "verbalizer" and s.label_words and len(s.label_words) != len(labels):
            raise TrainError(f"--label-words gives {len(s.label_words)} words for {len(labels)} labels {labels}")
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

        if s.method == "full":
            model: nn.Module = _FullModel(self.backbone, len(labels), s.pooling, s.dropout)
            adapter = None
        else:
            try:
                cfg = self._adapter_config(task, labels)
            except Exception as exc:
                raise TrainError(f"invalid adapter settings: {exc}") from exc
            word_ids, problems = label_word_ids(cfg, self.backbone.tokenizer)
            if problems:
                raise TrainError(problems[0])
            adapter = TaskAdapter(cfg, word_ids).to(self.backbone.device)
            model = adapter
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in trainable)

        cache_seconds = 0.0
        train_cache = dev_cache = None
        k = self.prompt_layer() if s.method != "full" else 0
        if s.method != "full" and s.cache_lower:
            t0 = time.perf_counter()
            train_cache = LowerCache(self.backbone, train_enc, k, s.eval_batch_size, "caching train lower layers",
                                     self.progress)
            dev_cache = LowerCache(self.backbone, dev_enc, k, s.eval_batch_size, "caching dev lower layers",
                                   self.progress)
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
        best: tuple[float, int, dict] = (-1.0, 0, {})
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
                logits = self._logits(model, adapter, batch, train_enc, train_cache, k)
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
            pred = self._predict(model, adapter, dev_enc, dev_cache, k)
            metrics = classification_metrics(y_dev, pred, len(labels))
            report = EpochReport(epoch, total_loss / max(1, seen), metrics["accuracy"], metrics["macro_f1"],
                                 time.perf_counter() - t_epoch)
            reports.append(report)
            log.info("epoch %d: loss %.4f, dev accuracy %.4f, dev macro-F1 %.4f (%.1fs)", epoch, report.train_loss,
                     report.dev_accuracy, report.dev_macro_f1, report.seconds)
            if self.progress:
                tqdm.write(f"epoch {epoch}: loss {report.train_loss:.4f}  dev acc {report.dev_accuracy:.4f}  "
                           f"dev macro-F1 {report.dev_macro_f1:.4f}  ({report.seconds:.1f}s)")
            if metrics["accuracy"] > best[0]:
                best = (metrics["accuracy"], epoch, metrics)
                best_state = {n: t.detach().clone() for n, t in model.state_dict().items()}
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        self.backbone.freeze()
        elapsed = time.perf_counter() - started
        training = {
            "data": data_name, "train_size": len(train), "dev_size": len(dev), "method": s.method,
            "epochs": s.epochs, "best_epoch": best[1], "lr": s.resolved_lr(), "batch_size": s.batch_size,
            "seed": s.seed, "dev": {k2: round(v, 4) for k2, v in best[2].items()},
            "trainable_parameters": n_trainable, "seconds": round(elapsed, 1),
        }
        if adapter is not None:
            adapter.config = self._adapter_config(task, labels, training)
        return TrainResult(
            adapter=adapter, labels=labels, epochs=reports, best_epoch=best[1], dev_metrics=best[2],
            trainable_parameters=n_trainable, cache_seconds=cache_seconds, seconds=elapsed,
            full_model=model if s.method == "full" else None,
            extra={"training": training, "mean_step_seconds": sum(step_times) / max(1, len(step_times))},
        )

    def _logits(self, model: nn.Module, adapter: TaskAdapter | None, batch: Sequence[int],
                encoded: Sequence[Encoded], cache: LowerCache | None, k: int) -> torch.Tensor:
        device = self.backbone.device
        if adapter is None:
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
        if adapter.config.head == "verbalizer":
            positions = torch.tensor([encoded[i].mask_position for i in batch], device=device)
        group = TaskGroup(adapter, torch.arange(len(batch), device=device), positions)
        return upper_forward(self.backbone, hidden, mask, k, [group])[0]

    def _predict(self, model: nn.Module, adapter: TaskAdapter | None, encoded: Sequence[Encoded],
                 cache: LowerCache | None, k: int) -> list[int]:
        model.eval()
        preds = [0] * len(encoded)
        lengths = [len(e.input_ids) for e in encoded]
        with torch.inference_mode():
            for batch in _length_batches(lengths, self.settings.eval_batch_size, None):
                logits = self._logits(model, adapter, batch, encoded, cache, k)
                for i, p in zip(batch, logits.argmax(-1).tolist(), strict=True):
                    preds[i] = p
        return preds


class _FullModel(nn.Module):
    """Full fine-tuning: every backbone weight plus a linear head over the mean of the last layer."""

    def __init__(self, backbone: Backbone, num_labels: int, pooling: str, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        backbone.unfreeze()
        self.head = LinearHead(backbone.hidden_size, num_labels, pooling, dropout).to(backbone.device)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(ids, mask)
        pooled = hidden[:, 0] if self.head.pooling == "cls" else masked_mean(hidden, mask)
        return self.head.classifier(self.head.dropout(pooled))


def evaluate(backbone: Backbone, adapter: TaskAdapter, examples: Sequence[tuple[str, str]],
             batch_size: int = 64) -> dict[str, float]:
    """Accuracy and macro-F1 of a served adapter on labelled examples (labels must be the adapter's)."""
    from lpt_serve.model.engine import classify_rows

    unknown = sorted({y for _, y in examples} - set(adapter.labels))
    if unknown:
        raise TrainError(f"the data has labels the adapter does not know: {', '.join(map(repr, unknown))} "
                         f"(the adapter's labels are {adapter.labels})")
    encoded = encode_texts(backbone, [t for t, _ in examples], adapter.config.template, adapter.config.max_length)
    preds: list[int] = []
    for i in tqdm(range(0, len(encoded), batch_size), desc="evaluating", unit="batch", leave=False):
        chunk = encoded[i : i + batch_size]
        probs = classify_rows(backbone, [adapter] * len(chunk), chunk)
        preds += [int(p.argmax()) for p in probs]
    index = {label: i for i, label in enumerate(adapter.labels)}
    return classification_metrics([index[y] for _, y in examples], preds, len(adapter.labels))


def save_full_model(result: TrainResult, out: Path) -> None:
    """Full fine-tuning has no adapter to serve; keep its weights (safetensors) and metrics for comparison."""
    import json

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    assert result.full_model is not None
    state = {k: v.detach().cpu().contiguous() for k, v in result.full_model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "metrics.json").write_text(json.dumps(result.extra["training"] | {"labels": result.labels}, indent=2) + "\n")
