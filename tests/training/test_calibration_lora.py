"""Calibration (ECE), the best-epoch rule, early stopping, the shared lower-layer pool and LoRA training, on the tiny
random BERT and the synthetic task of test_train.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lpt_serve.model.backbone import Backbone
from lpt_serve.model.engine import encode_texts
from lpt_serve.training.data import stratified_subset
from lpt_serve.training.trainer import (
    LORA_CONFIG_NAME,
    LORA_WEIGHTS_NAME,
    LowerCache,
    Trainer,
    TrainError,
    TrainSettings,
    evaluate,
    expected_calibration_error,
    is_better_epoch,
    load_lora_model,
    probability_metrics,
)
from tests.training.test_train import DEV, TRAIN, write_jsonl


def confident(rows: list[tuple[float, bool]]) -> tuple[torch.Tensor, list[int]]:
    """Two-class probabilities whose top class (0) has each row's confidence, gold 0 when the row is right."""
    probs = torch.tensor([[c, 1 - c] for c, _ in rows], dtype=torch.float64)
    return probs, [0 if right else 1 for _, right in rows]


# --------------------------------------------------------------------------------------------------- ECE
def test_ece_of_a_perfectly_calibrated_set_is_zero():
    # 70% confidence, 7 of 10 right; 90% confidence, 9 of 10 right: every bin's accuracy is its confidence.
    rows = [(0.7, i < 7) for i in range(10)] + [(0.9, i < 9) for i in range(10)]
    assert expected_calibration_error(*confident(rows)) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_a_miscalibrated_set_is_the_hand_computed_value():
    # Bin (0.8667, 0.9333]: 0.88 right, 0.92 wrong, 0.90 wrong, 0.90 right -> accuracy 0.5, confidence 0.9.
    # Bin (0.6, 0.6667]: six rows at 0.62, all right -> accuracy 1.0, confidence 0.62.
    rows = [(0.88, True), (0.92, False), (0.90, False), (0.90, True)] + [(0.62, True)] * 6
    expected = 4 / 10 * abs(0.5 - 0.9) + 6 / 10 * abs(1.0 - 0.62)
    assert expected_calibration_error(*confident(rows)) == pytest.approx(expected)  # 0.388
    # Per-row gaps would give another number: the bins are what averages 0.88 and 0.92 together.
    per_row = sum(abs(float(r) - c) for c, r in rows) / len(rows)
    assert abs(per_row - expected) > 0.04


def test_ece_uses_the_top_class_and_fifteen_bins():
    # Three classes; the top class is 1 with confidence 0.5 (bin (0.4667, 0.5]) and is right half the time.
    probs = torch.tensor([[0.3, 0.5, 0.2], [0.2, 0.5, 0.3]])
    assert expected_calibration_error(probs, [1, 0]) == pytest.approx(0.0)
    # 0.45 and 0.52 fall in different bins of 15 ((0.4, 0.4667] and (0.5, 0.5333]), so they do not cancel out.
    probs = torch.tensor([[0.45, 0.30, 0.25], [0.52, 0.28, 0.20]])
    assert expected_calibration_error(probs, [0, 1]) == pytest.approx(0.5 * (1 - 0.45) + 0.5 * 0.52)


def test_probability_metrics_log_loss():
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    metrics = probability_metrics(probs, [0, 0], 2)
    assert metrics["accuracy"] == 0.5
    assert metrics["log_loss"] == pytest.approx(-(torch.tensor(0.8).log() + torch.tensor(0.4).log()).item() / 2)


# -------------------------------------------------------------------------------------------- best epoch
def test_ties_of_dev_accuracy_go_to_the_lower_dev_loss():
    best = {"accuracy": 1.0, "log_loss": 0.5}
    assert is_better_epoch({"accuracy": 1.0, "log_loss": 0.1}, best)
    assert not is_better_epoch({"accuracy": 1.0, "log_loss": 0.5}, best)  # no change without a gain
    assert not is_better_epoch({"accuracy": 0.99, "log_loss": 0.01}, best)  # accuracy first
    assert is_better_epoch({"accuracy": 0.5, "log_loss": 9.0}, None)


def test_trainer_keeps_the_lowest_dev_loss_among_the_most_accurate_epochs(tiny_backbone):
    result = Trainer(tiny_backbone, TrainSettings(epochs=8, batch_size=16, lr=3e-2), progress=False).train(
        "synthetic", TRAIN, DEV)
    top = max(r.dev_accuracy for r in result.epochs)
    tied = [r for r in result.epochs if r.dev_accuracy == top]
    assert result.best_epoch == min(tied, key=lambda r: r.dev_loss).epoch
    # The easy task saturates dev accuracy early; later, more confident epochs must win the tie.
    assert len(tied) > 1 and result.best_epoch != tied[0].epoch
    # The kept weights are that epoch's: the served pass reproduces its dev loss, and the record says so.
    served = evaluate(tiny_backbone, result.adapter, DEV)
    assert served["accuracy"] == top
    assert served["log_loss"] == pytest.approx(min(r.dev_loss for r in tied), abs=1e-4)
    assert served["ece"] == pytest.approx(result.dev_metrics["ece"], abs=1e-4)
    assert result.adapter.config.training["dev"]["ece"] == pytest.approx(result.dev_metrics["ece"], abs=1e-4)


def test_patience_stops_when_no_epoch_improves(tiny_backbone):
    # A zero learning rate leaves the weights alone: every epoch scores like the first, so none is better.
    result = Trainer(tiny_backbone, TrainSettings(epochs=6, lr=0.0, patience=2), progress=False).train(
        "t", TRAIN, DEV)
    assert [r.epoch for r in result.epochs] == [1, 2, 3]
    assert result.best_epoch == 1 and result.extra["training"]["epochs_run"] == 3


# ------------------------------------------------------------------------------------------- lower pool
def test_lower_pool_computes_each_row_once(tiny_backbone):
    pool: dict = {}
    encoded = encode_texts(tiny_backbone, [t for t, _ in DEV])
    full = LowerCache(tiny_backbone, encoded, upto=2, batch_size=8, pool=pool)
    filled = len(pool)
    subset = LowerCache(tiny_backbone, encoded[5:20], upto=2, batch_size=8, pool=pool)
    assert len(pool) == filled  # nothing new to compute
    assert all(a is b for a, b in zip(subset.rows, full.rows[5:20], strict=True))
    LowerCache(tiny_backbone, encoded[:3], upto=1, batch_size=8, pool=pool)
    assert len(pool) == filled + len({e.input_ids for e in encoded[:3]})  # another layer is another row


def test_pooled_training_equals_unpooled(tiny_backbone):
    settings = TrainSettings(epochs=2, batch_size=16, prompt_layer=2, seed=1)
    pool: dict = {}
    Trainer(tiny_backbone, settings, progress=False, lower_pool=pool).train("t", TRAIN[:60], DEV)
    pooled = Trainer(tiny_backbone, settings, progress=False, lower_pool=pool).train("t", TRAIN, DEV)
    alone = Trainer(tiny_backbone, settings, progress=False).train("t", TRAIN, DEV)
    for (name, a), (_, b) in zip(pooled.adapter.state_dict().items(), alone.adapter.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_stratified_subset_keeps_class_shares_and_is_seeded():
    rows = [(f"text {i}", "a" if i % 4 else "b") for i in range(400)]  # 3:1
    subset = stratified_subset(rows, 100, seed=3)
    assert len(subset) == 100 and len(set(subset)) == 100 and set(subset) <= set(rows)
    assert sum(1 for _, y in subset if y == "b") == 25
    assert subset == stratified_subset(rows, 100, seed=3) != stratified_subset(rows, 100, seed=4)


# -------------------------------------------------------------------------------------------------- LoRA
def test_lora_trains_only_its_matrices_and_the_classifier(tiny_folder):
    backbone = Backbone.load(tiny_folder)  # LoRA adds layers to the backbone: a private copy
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    result = Trainer(backbone, TrainSettings(method="lora", epochs=4, batch_size=16, lr=1e-2, lora_r=4),
                     progress=False).train("t", TRAIN, DEV)
    assert result.dev_metrics["accuracy"] >= 0.8  # chance is 0.5
    # PEFT moves each adapted layer's own weights under `base_layer`.
    after = {n.replace(".base_layer.", "."): p for n, p in backbone.named_parameters()}
    lora = {n for n in after if "lora_" in n}
    # r = 4 on query and value of 4 layers of width 32: A is 4x32 and B 32x4, per module; the head 32x2 + 2.
    assert len(lora) == 4 * 2 * 2
    assert result.trainable_parameters == 4 * 2 * (4 * 32 + 32 * 4) + 32 * 2 + 2
    assert set(before) == set(after) - lora
    for name, p in before.items():
        assert torch.equal(after[name], p), f"frozen weight {name} changed"
    # LoRA starts as a no-op (B = 0); training moved every B.
    assert all(after[n].abs().sum() > 0 for n in lora if "lora_B" in n)
    assert {n.removeprefix("head.") for n in result.trainable_names if n.startswith("head.")} == {
        "classifier.weight", "classifier.bias"}
    assert all("lora_" in n or n.startswith("head.") for n in result.trainable_names)
    assert all(not p.requires_grad for p in backbone.parameters())  # frozen again afterwards


def test_lora_refuses_a_backbone_that_has_lora_and_unknown_targets(tiny_folder):
    backbone = Backbone.load(tiny_folder)
    with pytest.raises(TrainError, match="not found"):
        Trainer(backbone, TrainSettings(method="lora", epochs=1, lora_targets=("nonesuch",)),
                progress=False).train("t", TRAIN[:40], DEV[:10])
    Trainer(backbone, TrainSettings(method="lora", epochs=1), progress=False).train("t", TRAIN[:40], DEV[:10])
    with pytest.raises(TrainError, match="already holds LoRA"):
        Trainer(backbone, TrainSettings(method="lora", epochs=1), progress=False).train("t", TRAIN[:40], DEV[:10])


def test_cli_lora_train_then_eval(tiny_folder, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    test = write_jsonl(tmp_path / "test.jsonl", DEV)
    out = tmp_path / "lora"
    done = subprocess.run(
        [sys.executable, "-m", "lpt_serve.cli", "train", "--method", "lora", "--lora-r", "4", "--data",
         str(data), "--task", "synth", "--out", str(out), "--epochs", "3", "--lr", "1e-2", "--backbone",
         str(tiny_folder), "--no-progress", "--test", str(test)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert set(summary["test"]) == {"accuracy", "macro_f1", "ece", "log_loss"}
    assert (out / LORA_WEIGHTS_NAME).is_file() and (out / LORA_CONFIG_NAME).is_file()
    assert not (out / "adapter_config.json").exists()  # not an LPT adapter: `lpt upload` has nothing to take
    evaluated = subprocess.run(
        [sys.executable, "-m", "lpt_serve.cli", "eval", "--adapter", str(out), "--data", str(test),
         "--backbone", str(tiny_folder)], capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == summary["test"]["accuracy"]
    assert json.loads(evaluated.stdout)["ece"] == summary["test"]["ece"]
    # Reloaded in-process into a fresh backbone: the same probabilities.
    result, settings = load_lora_model(out, Backbone.load(tiny_folder))
    again = Trainer(result.model.backbone, settings, progress=False).score(result, DEV)
    assert round(again["accuracy"], 4) == summary["test"]["accuracy"]
