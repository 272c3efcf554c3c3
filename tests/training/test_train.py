"""The trainer and the `lpt` CLI on the tiny random BERT and a learnable synthetic task."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from lpt_serve.model.adapter import load_adapter
from lpt_serve.training.trainer import LowerCache, Trainer, TrainError, TrainSettings, classification_metrics, evaluate


def synthetic(n: int, seed: int) -> list[tuple[str, str]]:
    """Sentiment a tiny model can learn: the label word decides it, the rest is noise."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["neg", "pos"])
        word = rng.choice(["good", "great"] if label == "pos" else ["bad", "terrible"])
        filler = " ".join(
            rng.choice(["the", "film", "movie", "it", "was", "very", "and"]) for _ in range(rng.randint(1, 8))
        )
        rows.append((f"{filler} {word} {filler}" if rng.random() < 0.5 else f"{word} {filler}", label))
    return rows


TRAIN, DEV = synthetic(240, 0), synthetic(60, 1)


def test_metrics():
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], 2)
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_lpt_learns_and_keeps_the_best_epoch(tiny_backbone):
    before = {n: p.clone() for n, p in tiny_backbone.named_parameters()}
    result = Trainer(tiny_backbone, TrainSettings(epochs=6, batch_size=16, lr=3e-2), progress=False).train(
        "synthetic", TRAIN, DEV, "synthetic"
    )
    assert result.dev_metrics["accuracy"] >= 0.9
    # The best dev accuracy; a tie goes to the lower dev loss.
    assert result.best_epoch == max(range(1, 7), key=lambda e: (result.epochs[e - 1].dev_accuracy,
                                                                 -result.epochs[e - 1].dev_loss))
    # The kept weights are the best epoch's: evaluating them reproduces its dev accuracy.
    assert evaluate(tiny_backbone, result.adapter, DEV)["accuracy"] == pytest.approx(result.dev_metrics["accuracy"])
    # Only the adapter learned.
    for name, p in tiny_backbone.named_parameters():
        assert torch.equal(p, before[name]), name
        assert not p.requires_grad
    training = result.adapter.config.training
    assert training["data"] == "synthetic" and training["train_size"] == len(TRAIN)
    assert training["dev"]["accuracy"] == pytest.approx(result.dev_metrics["accuracy"], abs=1e-4)


def test_cached_lower_layers_train_exactly_like_recomputing(tiny_backbone):
    settings = dict(epochs=2, batch_size=16, generator="mppg", prompt_layer=2, seed=3)
    cached = Trainer(tiny_backbone, TrainSettings(**settings, cache_lower=True), progress=False).train("t", TRAIN, DEV)
    fresh = Trainer(tiny_backbone, TrainSettings(**settings, cache_lower=False), progress=False).train("t", TRAIN, DEV)
    for (name, a), (_, b) in zip(cached.adapter.state_dict().items(), fresh.adapter.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert cached.cache_seconds > 0 and fresh.cache_seconds == 0


def test_lower_cache_matches_the_backbone(tiny_backbone):
    from lpt_serve.model.engine import encode_texts

    encoded = encode_texts(tiny_backbone, [t for t, _ in DEV[:10]])
    cache = LowerCache(tiny_backbone, encoded, upto=2, batch_size=4)
    hidden, mask = cache.batch(range(10), torch.device("cpu"))
    for i, e in enumerate(encoded):
        ids = torch.tensor([e.input_ids])
        alone = tiny_backbone.lower(ids, torch.ones_like(ids), upto=2)[0]
        torch.testing.assert_close(hidden[i, : len(e.input_ids)], alone, atol=1e-5, rtol=1e-5)
        assert mask[i].sum() == len(e.input_ids)


@pytest.mark.parametrize("method", ["prompt", "full"])
def test_other_methods_train(tiny_folder, method):
    from lpt_serve.model.backbone import Backbone

    backbone = Backbone.load(tiny_folder)  # full fine-tuning changes the weights: use a private copy
    result = Trainer(
        backbone,
        TrainSettings(method=method, epochs=2, batch_size=16, lr=3e-2 if method == "prompt" else 1e-3),
        progress=False,
    ).train("t", TRAIN, DEV)
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss * 1.05
    if method == "prompt":
        assert result.adapter.config.prompt_layer == 0 and result.adapter.config.generator == "static"
        assert result.trainable_parameters < 1000
    else:
        assert result.adapter is None
        assert result.trainable_parameters > sum(p.numel() for p in backbone.encoder.parameters()) - 1
    assert all(not p.requires_grad for p in backbone.parameters())  # frozen again afterwards


def test_verbalizer_trains(tiny_mlm_backbone):
    result = Trainer(
        tiny_mlm_backbone,
        TrainSettings(
            epochs=4,
            batch_size=16,
            lr=3e-2,
            head="verbalizer",
            template="{text} . it was <mask> .",
            label_words=["bad", "good"],
        ),
        progress=False,
    ).train("v", TRAIN, DEV)
    # The head has no weights of its own: the generator alone learns, through the frozen MLM head.
    assert result.adapter.num_parameters() == sum(p.numel() for p in result.adapter.generator.parameters())
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss


@pytest.mark.parametrize(
    "train,dev,message",
    [
        ([], DEV, "no rows"),
        ([("good", "pos"), ("great", "pos")], DEV, "single class"),
        (TRAIN, [("good", "other")], "labels the training data lacks"),
    ],
)
def test_bad_training_data_is_one_sentence(tiny_backbone, train, dev, message):
    with pytest.raises(TrainError, match=message):
        Trainer(tiny_backbone, TrainSettings(epochs=1), progress=False).train("t", train, dev)


def test_prompt_layer_out_of_range(tiny_backbone):
    with pytest.raises(TrainError, match="out of range"):
        Trainer(tiny_backbone, TrainSettings(epochs=1, prompt_layer=9), progress=False).train("t", TRAIN, DEV)


# ------------------------------------------------------------------------------------------------------ CLI
def run_lpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lpt_serve.cli", *args], capture_output=True, text=True,
                          timeout=300)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return path


def test_cli_train_then_eval(tiny_folder, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    test = write_jsonl(tmp_path / "test.jsonl", DEV)
    out = tmp_path / "adapter"
    done = run_lpt("train", "--data", str(data), "--task", "synth", "--out", str(out), "--epochs", "6",
                   "--backbone", str(tiny_folder), "--no-progress", "--test", str(test), "--lr", "3e-2")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["test"]["accuracy"] >= 0.8  # chance is 0.5
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["training"]["test"] == summary["test"] and config["task"] == "synth"
    assert config["training"]["train_size"] + config["training"]["dev_size"] == len(TRAIN)
    evaluated = run_lpt("eval", "--adapter", str(out), "--data", str(test), "--backbone", str(tiny_folder))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == summary["test"]["accuracy"]


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ('{"sentence": "x", "label": "a"}\n{"sentence": "y", "label": "b"}\n', "text"),
        ('{"text": "x", "label": "a"}\n{"text": "y", "label": "a"}\n', "two"),
        ('{"text": "", "label": "a"}\n{"text": "y", "label": "b"}\n', "empty"),
    ],
)
def test_cli_bad_data_is_one_clear_line(tiny_folder, tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    done = run_lpt("train", "--data", str(path), "--out", str(tmp_path / "o"), "--backbone", str(tiny_folder))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0].lower(), done.stderr


def test_cli_adapter_for_another_backbone(tiny_folder, tmp_path):
    from tests.tiny import make_tiny_bert

    other = make_tiny_bert(tmp_path / "other", hidden=48, layers=3)
    data = write_jsonl(tmp_path / "d.jsonl", DEV)
    out = tmp_path / "adapter"
    assert (
        run_lpt(
            "train", "--data", str(data), "--out", str(out), "--epochs", "1", "--no-progress", "--backbone", str(other)
        ).returncode
        == 0
    )
    done = run_lpt("eval", "--adapter", str(out), "--data", str(data), "--backbone", str(tiny_folder))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "hidden size is 48" in done.stderr and "layer count is 3" in done.stderr


def test_cli_help_explains_itself():
    done = run_lpt("train", "--help")
    assert done.returncode == 0
    for flag in (
        "--generator",
        "--prompt-layer",
        "--prompt-length",
        "--bottleneck",
        "--epochs",
        "--lr",
        "--batch-size",
        "--seed",
        "--dev-split",
        "--method",
    ):
        assert flag in done.stdout


def test_loaded_adapter_serves_like_trained(tiny_backbone, tmp_path):
    result = Trainer(tiny_backbone, TrainSettings(epochs=1), progress=False).train("t", TRAIN, DEV)
    folder = result.adapter.save(tmp_path / "a")
    loaded = load_adapter(folder, tiny_backbone)
    assert evaluate(tiny_backbone, loaded, DEV) == evaluate(tiny_backbone, result.adapter, DEV)
