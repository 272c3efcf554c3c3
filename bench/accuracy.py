"""Should a user train LPT or LoRA? Accuracy, calibration, size and training cost of every method, same splits.

For every dataset (default mr, bbc, tweets; the fixed-seed splits of `lpt_serve.training.data.materialize`, seed 0),
two regimes, each scored on the whole test split:

* full data: the train split, best epoch on the dev split, one run (seed 0);
* few-shot: `--shots` (100) training rows and a dev set of the same size, drawn class-proportionally from the
  train and dev splits (`stratified_subset`, one draw per seed), `--seeds` (5) runs, mean +- sample std.

Methods, all through `lpt_serve.training.trainer.Trainer` except the probe:

* probe: frozen mean-pooled last layer + logistic regression (`bench.baselines.fit_probe`, L2 picked on dev);
* full: full fine-tuning (every weight + a linear head over the mean of the last layer);
* prompt: classic prompt tuning, a plain learned prompt of `--prompt-tuning-length` vectors at the input
  (prompt layer 0, the `static` generator; `lpt train --method prompt`);
* lora: LoRA with PEFT, r = `--lora-r` on `--lora-targets` (default r = 8 on query and value), linear head;
* lpt-npg, lpt-mppg, lpt-appg: LPT with each prompt generator at prompt layer `--prompt-layer` (default N // 2 = 3),
  length 5, bottleneck 128: the trainer's defaults, those of the demo adapters.

Best epoch: the best dev accuracy, ties to the lower dev loss (the trainer's rule). Columns: test accuracy, test
expected calibration error (ECE: 15 equal-width bins of the top-class confidence), trainable parameters, adapter
bytes (the trained tensors as one fp32 safetensors file: the whole model for full fine-tuning, the LoRA matrices
and head for LoRA, the adapter file for LPT and prompt tuning, weights + standardisation for the probe) and seconds
per epoch (the optimiser steps alone; LPT's one-off cache of the lower layers is reported apart; the probe has no
epochs, its L-BFGS fits are shown instead).

`--ablation` runs the paper's ablation instead, on mr (train split subsampled to `--ablation-train` rows, whole
dev and test splits): NPG-LPT at prompt layer k = 1..5 (at the default L) and prompt length L = 1, 5, 10, 20 (at
the default k), and bottleneck d = 32 next to the default 128 (`--ablation-design grid` crosses every k with every
L). Each row has dev and test accuracy, test ECE, the adapter's size and its
inference cost: the measured rows/s of the server's mixed pass (batches of 32 test rows) next to the plain
encoder's, and the compute relative to the plain encoder when the upper N - k layers are L tokens wider. The
defaults are picked from dev accuracy only.

    python -m bench.accuracy --quick              # CI smoke run, tiny subsets, about a minute
    python -m bench.accuracy --quick --ablation
    python -m bench.accuracy                      # the full table (see the README for its time)
    python -m bench.accuracy --ablation
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.baselines import fit_probe, load_splits, probe_features
from bench.common import (
    CpuMonitor,
    fmt,
    header,
    machine_info,
    markdown_table,
    now_iso,
    result_path,
    save_results,
    start_run,
    write_json,
)

NAME = "accuracy"
METHODS = ("probe", "full", "prompt", "lora", "lpt-npg", "lpt-mppg", "lpt-appg")
FROZEN_BACKBONE_METHODS = ("probe", "prompt", "lpt-npg", "lpt-mppg", "lpt-appg")
ABLATION_LAYERS = (1, 2, 3, 4, 5)
ABLATION_LENGTHS = (1, 5, 10, 20)
ABLATION_BOTTLENECKS = (32,)
INFERENCE_BATCH = 32
METRICS = ("accuracy", "macro_f1", "ece", "log_loss")


# ------------------------------------------------------------------------------------------------ settings
def per_key(spec: str, keys: Sequence[str], default: Any, cast=int) -> dict[str, Any]:
    """'full=3,lpt=8' -> a value per key; a key 'lpt' also sets every 'lpt-*' key, a bare value sets them all."""
    values = dict.fromkeys(keys, default)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            values = dict.fromkeys(keys, cast(key))
            continue
        matched = [k for k in keys if k == key or k.startswith(key + "-")]
        if not matched:
            raise SystemExit(f"unknown key {key!r} in {spec!r}: use one of {', '.join(keys)}")
        for k in matched:
            values[k] = cast(value)
    return values


def method_settings(method: str, args: argparse.Namespace, epochs: int, max_length: int, seed: int,
                    batch_size: int):
    from lpt_serve.training.trainer import TrainSettings

    common = dict(epochs=epochs, max_length=max_length, seed=seed, batch_size=batch_size, patience=args.patience)
    if method == "full":
        return TrainSettings(method="full", **common)
    if method == "lora":
        return TrainSettings(method="lora", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                             lora_targets=tuple(args.lora_targets.split(",")), **common)
    if method == "prompt":
        return TrainSettings(method="prompt", prompt_length=args.prompt_tuning_length, **common)
    if method.startswith("lpt-"):
        return TrainSettings(method="lpt", generator=method.removeprefix("lpt-"), prompt_layer=args.prompt_layer,
                             prompt_length=args.prompt_length, bottleneck=args.bottleneck, **common)
    raise ValueError(method)


# ------------------------------------------------------------------------------------------------- one run
def trained_state(result) -> dict[str, torch.Tensor]:
    """The tensors a user keeps after training: the adapter, LoRA's matrices and head, or the whole model."""
    from lpt_serve.training.trainer import unique_state

    if result.adapter is not None:
        return result.adapter.state_for_disk()
    if result.method == "lora":
        return result.model.lora_state()
    return unique_state(result.model)


def run_trained(method: str, name: str, train: Sequence, dev: Sequence, test: Sequence, settings, frozen,
                pool: dict) -> dict[str, Any]:
    from lpt_serve.model.backbone import Backbone
    from lpt_serve.training.trainer import Trainer, tensor_bytes

    # Full fine-tuning and LoRA change the backbone they train: each run gets a fresh one.
    backbone = frozen if method in FROZEN_BACKBONE_METHODS else Backbone.load(device="cpu", dtype="float32")
    trainer = Trainer(backbone, settings, progress=False, lower_pool=pool if backbone is frozen else None)
    t0 = time.perf_counter()
    result = trainer.train(name, train, dev, name)
    train_s = time.perf_counter() - t0
    test_metrics = trainer.score(result, test)
    out = {
        "test": {k: round(v, 4) for k, v in test_metrics.items()},
        "dev": {k: round(v, 4) for k, v in result.dev_metrics.items()},
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.epochs),
        "trainable_parameters": result.trainable_parameters,
        "adapter_bytes": tensor_bytes(trained_state(result)),
        "seconds_per_epoch": round(statistics.fmean(r.train_seconds for r in result.epochs), 2),
        "epoch_seconds_with_dev": round(statistics.fmean(r.seconds for r in result.epochs), 2),
        "cache_seconds": round(result.cache_seconds, 1),
        "train_seconds": round(train_s, 1),
        "epochs": [{"epoch": r.epoch, "train_loss": round(r.train_loss, 4), "dev_accuracy": round(r.dev_accuracy, 4),
                    "dev_loss": round(r.dev_loss, 4), "dev_ece": round(r.dev_ece, 4), "seconds": round(r.seconds, 1)}
                   for r in result.epochs],
        "settings": {"epochs": settings.epochs, "lr": settings.resolved_lr(), "batch_size": settings.batch_size,
                     "max_length": settings.max_length, "seed": settings.seed, "patience": settings.patience},
    }
    del result, trainer
    if backbone is not frozen:
        del backbone
    gc.collect()
    return out


def run_probe(feats: dict, ys: dict, num_labels: int, l2_values: Sequence[float],
              rows: dict[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """The probe on precomputed features; `rows` picks a subset of train and dev (few-shot)."""
    if rows is not None:
        feats = feats | {s: feats[s][list(rows[s])] for s in rows}
        ys = ys | {s: ys[s][list(rows[s])] for s in rows}
    out = fit_probe(feats, ys, num_labels, l2_values)
    return out | {"best_epoch": None, "seconds_per_epoch": None}


# --------------------------------------------------------------------------------------------- aggregation
def mean_std(values: Sequence[float]) -> dict[str, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": math.nan, "std": math.nan}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs, "seeds": len(runs)}
    for metric in METRICS:
        out[f"test_{metric}"] = mean_std([r["test"][metric] for r in runs])
    out["dev_accuracy"] = mean_std([r["dev"]["accuracy"] for r in runs])
    for key in ("trainable_parameters", "adapter_bytes"):
        out[key] = runs[0][key]
    per_epoch = [r["seconds_per_epoch"] for r in runs if r.get("seconds_per_epoch") is not None]
    out["seconds_per_epoch"] = statistics.fmean(per_epoch) if per_epoch else None
    out["fit_seconds"] = statistics.fmean([r["fit_seconds"] for r in runs]) if "fit_seconds" in runs[0] else None
    return out


# ---------------------------------------------------------------------------------------------- the table
class DatasetRun:
    """One dataset's splits, probe features and lower-layer pool, kept across both regimes."""

    def __init__(self, name: str, args: argparse.Namespace, frozen) -> None:
        self.name, self.args, self.frozen = name, args, frozen
        self.splits = load_splits(name, args.limit)
        self.max_length = args.max_length[name]
        self.pool: dict = {}  # lower-layer rows of the frozen backbone, shared by every LPT and prompt run here
        self.entry: dict[str, Any] = {"sizes": {k: len(v) for k, v in self.splits.items()},
                                      "max_length": self.max_length, "seconds": 0.0}
        self.features = None
        if "probe" in args.methods or "probe" in args.full_methods:
            feats, ys, labels, embed_s = probe_features(frozen, self.splits, self.max_length)
            self.features = (feats, ys, len(labels))
            self.entry["probe_embed_seconds"] = round(embed_s, 1)
        self.position = {split: {text: i for i, (text, _) in enumerate(rows)} for split, rows in self.splits.items()}

    def run_regime(self, regime: str) -> None:
        from lpt_serve.training.data import stratified_subset

        args, splits = self.args, self.splits
        started, monitor = time.perf_counter(), CpuMonitor()
        self.entry[regime] = {}
        for method in args.methods if regime == "fewshot" else args.full_methods:
            seeds = range(args.seeds) if regime == "fewshot" else [args.seed]
            runs = []
            for seed in seeds:
                if regime == "fewshot":
                    train = stratified_subset(splits["train"], args.shots, seed)
                    dev = stratified_subset(splits["dev"], args.shots, seed)
                else:
                    train, dev = splits["train"], splits["dev"]
                t0 = time.perf_counter()
                if method == "probe":
                    rows = {"train": [self.position["train"][t] for t, _ in train],
                            "dev": [self.position["dev"][t] for t, _ in dev]}
                    run = run_probe(*self.features, args.probe_l2, rows)
                else:
                    epochs = (args.fewshot_epochs if regime == "fewshot" else args.epochs)[method]
                    batch = args.fewshot_batch_size if regime == "fewshot" else args.batch_size
                    settings = method_settings(method, args, epochs, self.max_length, seed, batch)
                    run = run_trained(method, self.name, train, dev, splits["test"], settings, self.frozen,
                                      self.pool)
                run |= {"seed": seed, "train_size": len(train), "dev_size": len(dev),
                        "wall_seconds": round(time.perf_counter() - t0, 1)}
                runs.append(run)
                print(f"[{self.name}] {regime:<7} {method:<8} seed {seed}: test acc {run['test']['accuracy']:.4f} "
                      f"ECE {run['test']['ece']:.4f} dev acc {run['dev']['accuracy']:.4f} "
                      f"({run['wall_seconds']:.0f}s)", file=sys.stderr, flush=True)
            self.entry[regime][method] = summarise(runs)
        self.entry["seconds"] += round(time.perf_counter() - started, 1)
        self.entry[f"cpu_contention_{regime}"] = monitor.stop()


def cell(summary: dict[str, Any], metric: str, fewshot: bool) -> str:
    value = summary[f"test_{metric}"]
    return f"{fmt(value['mean'])} ± {fmt(value['std'])}" if fewshot else fmt(value["mean"])


def table_rows(results: dict[str, Any], regime: str) -> list[list[str]]:
    rows = []
    for name, entry in results.items():
        for method, s in entry.get(regime, {}).items():
            if s.get("seconds_per_epoch") is not None:
                per_epoch = fmt(s["seconds_per_epoch"], 1)
            elif s.get("fit_seconds") is not None:
                per_epoch = f"fit {fmt(s['fit_seconds'], 1)}"
            else:
                per_epoch = "n/a"
            rows.append([name, method, cell(s, "accuracy", regime == "fewshot"), cell(s, "ece", regime == "fewshot"),
                         f"{s['trainable_parameters']:,}", human_bytes(s["adapter_bytes"]), per_epoch])
    return rows


def human_bytes(n: int) -> str:
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'MB' else 0}f} {unit}"
    return f"{n} B"


def verdicts(results: dict[str, Any]) -> list[str]:
    """The paper's few-shot claims, checked on this backbone: NPG-LPT vs full fine-tuning and vs the best other
    parameter-efficient method (paper, RoBERTa-large, 100 examples: +5.0 over full FT, +7.1 over Adapter)."""
    lines = []
    for name, entry in results.items():
        few = entry.get("fewshot", {})
        if "lpt-npg" not in few:
            continue
        lpt = few["lpt-npg"]["test_accuracy"]
        for other in ("full", "lora", "prompt", "probe"):
            if other not in few:
                continue
            o = few[other]["test_accuracy"]
            diff = lpt["mean"] - o["mean"]
            # Two means of `n` seeds each: a difference under ~2 standard errors is not told apart from noise.
            se = math.sqrt((lpt["std"] ** 2 + o["std"] ** 2) / max(1, few[other]["seeds"]))
            verdict = "LPT ahead" if diff > 2 * se else "LPT behind" if diff < -2 * se else "within noise"
            lines.append(f"{name}: few-shot NPG-LPT - {other} = {diff * 100:+.1f} points (2 SE = {2 * se * 100:.1f}; "
                         f"{verdict})")
    return lines


# --------------------------------------------------------------------------------------------- the ablation
@torch.inference_mode()
def inference_speed(backbone, adapter, encoded: Sequence, repeats: int = 2) -> tuple[float, float]:
    """(rows/s of the server's mixed pass with `adapter`, that over the plain encoder's rows/s), in batches of 32.

    Plain and prompted passes alternate, and the ratio is the median of each pair's: on a shared machine the load
    drifts between configurations, much less between two back-to-back passes. The plain encoder is padded per
    length bucket, as the mixed pass is."""
    from lpt_serve.model.engine import classify_rows, length_buckets, pad_rows

    def plain(chunk: Sequence) -> None:
        for bucket in length_buckets([len(e.input_ids) for e in chunk]):
            ids, mask = pad_rows([chunk[i].input_ids for i in bucket], backbone.tokenizer.pad_token_id or 0)
            backbone(ids, mask)

    def prompted(chunk: Sequence) -> None:
        classify_rows(backbone, [adapter] * len(chunk), chunk)

    def seconds(run) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(encoded), INFERENCE_BATCH):
            run(encoded[i : i + INFERENCE_BATCH])
        return time.perf_counter() - t0

    plain(encoded[:INFERENCE_BATCH])
    prompted(encoded[:INFERENCE_BATCH])
    pairs = [(seconds(plain), seconds(prompted)) for _ in range(repeats)]
    return len(encoded) / min(t for _, t in pairs), statistics.median(p / t for p, t in pairs)


def relative_compute(k: int, length: int, layers: int, mean_tokens: float) -> float:
    """Encoder compute with the prompt relative to without, linear in width: layers k+1..N are L tokens wider."""
    return (k * mean_tokens + (layers - k) * (mean_tokens + length)) / (layers * mean_tokens)


def run_ablation(args: argparse.Namespace, frozen) -> dict[str, Any]:
    from lpt_serve.model.engine import encode_texts
    from lpt_serve.training.data import stratified_subset
    from lpt_serve.training.trainer import Trainer, TrainSettings, tensor_bytes

    splits = load_splits("mr", args.limit)
    train = stratified_subset(splits["train"], args.ablation_train, 0)
    dev, test = splits["dev"], splits["test"]
    max_length = args.max_length["mr"]
    layers = frozen.num_layers
    timing_rows = encode_texts(frozen, [t for t, _ in test[: args.timing_rows]], None, max_length)
    mean_tokens = statistics.fmean(len(e.input_ids) for e in timing_rows)
    if args.ablation_design == "grid":
        configs = [(k, length, args.bottleneck) for k in args.ablation_layers for length in args.ablation_lengths]
    else:  # one knob at a time around the default, as the paper's figures vary them
        configs = [(k, args.default_length, args.bottleneck) for k in args.ablation_layers]
        configs += [(args.default_layer, length, args.bottleneck) for length in args.ablation_lengths
                    if (args.default_layer, length, args.bottleneck) not in configs]
    configs += [(args.default_layer, args.default_length, d) for d in args.ablation_bottlenecks
                if (args.default_layer, args.default_length, d) not in configs]
    pool: dict = {}
    rows = []
    for k, length, d in configs:
        settings = TrainSettings(method="lpt", generator="npg", prompt_layer=k, prompt_length=length, bottleneck=d,
                                 epochs=args.ablation_epochs, max_length=max_length, seed=args.seed,
                                 patience=args.patience, batch_size=args.batch_size)
        trainer = Trainer(frozen, settings, progress=False, lower_pool=pool)
        t0 = time.perf_counter()
        result = trainer.train("mr", train, dev, "mr")
        test_metrics = trainer.score(result, test)
        speed, relative = inference_speed(frozen, result.adapter, timing_rows, args.timing_repeats)
        row = {
            "prompt_layer": k, "prompt_length": length, "bottleneck": d,
            "dev": {m: round(v, 4) for m, v in result.dev_metrics.items()},
            "test": {m: round(v, 4) for m, v in test_metrics.items()},
            "best_epoch": result.best_epoch, "epochs_run": len(result.epochs),
            "trainable_parameters": result.trainable_parameters,
            "adapter_bytes": tensor_bytes(result.adapter.state_for_disk()),
            "rows_per_second": round(speed, 1), "measured_relative_throughput": round(relative, 3),
            "upper_width": round((mean_tokens + length) / mean_tokens, 3),
            "relative_compute": round(relative_compute(k, length, layers, mean_tokens), 3),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(f"[ablation] k={k} L={length:<2} d={d:<3}: dev {row['dev']['accuracy']:.4f} test "
              f"{row['test']['accuracy']:.4f} ECE {row['test']['ece']:.4f} {row['rows_per_second']:.0f} rows/s "
              f"({row['seconds']:.0f}s)", file=sys.stderr, flush=True)
        # A pool entry per row and prompt layer: drop the layers no later config uses.
        later = {c[0] for c in configs[configs.index((k, length, d)) + 1:]}
        for key in [key for key in pool if key[0] not in later]:
            del pool[key]
        del result, trainer
    return {"train_size": len(train), "dev_size": len(dev), "test_size": len(test), "max_length": max_length,
            "mean_tokens": round(mean_tokens, 1), "timing_rows": len(timing_rows), "rows": rows,
            "choice": choose_defaults(rows, args, len(dev))}


def choose_defaults(rows: list[dict[str, Any]], args: argparse.Namespace, dev_size: int) -> dict[str, Any]:
    """From dev accuracy only: the best (k, L), and the cheapest configuration within one standard error of it
    (a binomial SE of the best accuracy on this dev set); the default stays unless it falls outside that band."""
    grid = [r for r in rows if r["bottleneck"] == args.bottleneck]
    best = max(grid, key=lambda r: (r["dev"]["accuracy"], -r["dev"]["log_loss"]))
    p = best["dev"]["accuracy"]
    se = math.sqrt(p * (1 - p) / dev_size)
    within = [r for r in grid if r["dev"]["accuracy"] >= p - se]
    cheapest = min(within, key=lambda r: (r["relative_compute"], -r["dev"]["accuracy"]))
    default = next((r for r in grid if (r["prompt_layer"], r["prompt_length"]) ==
                    (args.default_layer, args.default_length)), None)
    small = [r for r in rows if (r["prompt_layer"], r["prompt_length"]) == (args.default_layer, args.default_length)
             and r["dev"]["accuracy"] >= p - se]
    smallest = min(small, key=lambda r: r["adapter_bytes"]) if small else None
    return {
        "best_by_dev": {"prompt_layer": best["prompt_layer"], "prompt_length": best["prompt_length"],
                        "dev_accuracy": p},
        "dev_standard_error": round(se, 4),
        "cheapest_within_one_se": {"prompt_layer": cheapest["prompt_layer"],
                                   "prompt_length": cheapest["prompt_length"],
                                   "dev_accuracy": cheapest["dev"]["accuracy"],
                                   "relative_compute": cheapest["relative_compute"]},
        "default": {"prompt_layer": args.default_layer, "prompt_length": args.default_length,
                    "dev_accuracy": default["dev"]["accuracy"] if default else None,
                    "within_one_se_of_best": bool(default and default["dev"]["accuracy"] >= p - se)},
        "smallest_bottleneck_within_one_se": ({"bottleneck": smallest["bottleneck"],
                                               "dev_accuracy": smallest["dev"]["accuracy"],
                                               "adapter_bytes": smallest["adapter_bytes"]} if smallest else None),
    }


def ablation_table(ablation: dict[str, Any]) -> str:
    rows = [[r["prompt_layer"], r["prompt_length"], r["bottleneck"], fmt(r["dev"]["accuracy"]),
             fmt(r["test"]["accuracy"]), fmt(r["test"]["ece"]), f"{r['trainable_parameters']:,}",
             human_bytes(r["adapter_bytes"]), fmt(r["rows_per_second"], 0),
             fmt(r["measured_relative_throughput"], 2), fmt(r["upper_width"], 2), fmt(r["relative_compute"], 2)]
            for r in ablation["rows"]]
    return markdown_table(["k", "L", "d", "dev acc", "test acc", "test ECE", "params", "bytes", "rows/s",
                           "vs plain", "upper width", "rel. compute"], rows)


# ----------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", default="mr,tweets,bbc", help="comma-separated dataset names")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    p.add_argument("--full-methods", default=None, help="methods of the full-data regime (default: --methods)")
    p.add_argument("--regimes", default="fewshot,full", help="fewshot and/or full (all training data), in this order")
    p.add_argument("--shots", type=int, default=100, help="few-shot training rows (and dev rows)")
    p.add_argument("--seeds", type=int, default=5, help="few-shot runs (draw and training seed 0..N-1)")
    p.add_argument("--epochs", default="full=1,lora=2,prompt=2,lpt=3",
                   help="full-data epochs per method ('lpt' sets all three generators), best dev epoch kept")
    p.add_argument("--fewshot-epochs", default="5", help="few-shot epochs per method, same syntax")
    p.add_argument("--patience", type=int, default=None, help="stop a run after this many epochs without a better "
                                                              "dev epoch (default: run every epoch)")
    p.add_argument("--batch-size", type=int, default=32, help="full-data batch size")
    p.add_argument("--fewshot-batch-size", type=int, default=16, help="few-shot batch size")
    p.add_argument("--max-length", default="64",
                   help="tokens per text, for every method; per dataset as 'mr=64,bbc=128' (99%% of mr and tweets "
                        "texts fit in 64; bbc articles are cut to their title and lead here, the demo adapter reads "
                        "256 tokens)")
    p.add_argument("--prompt-layer", type=int, default=None, help="LPT prompt layer (default: N // 2)")
    p.add_argument("--prompt-length", type=int, default=5, help="LPT prompt length L")
    p.add_argument("--bottleneck", type=int, default=128, help="LPT generator bottleneck d")
    p.add_argument("--prompt-tuning-length", type=int, default=20, help="classic prompt tuning: vectors at the input")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="query,value")
    p.add_argument("--probe-l2", default="0.0,1e-4,1e-3,1e-2,1e-1", help="probe L2 values tried on dev")
    p.add_argument("--seed", type=int, default=0, help="seed of the full-data runs")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N rows of each split")
    p.add_argument("--ablation", action="store_true", help="run the prompt layer / length / bottleneck ablation on mr")
    p.add_argument("--ablation-design", choices=["cross", "grid"], default="cross",
                   help="cross: each prompt layer at the default length, each length at the default layer; grid: "
                        "every layer with every length")
    p.add_argument("--ablation-train", type=int, default=600, help="mr training rows in the ablation (subsample)")
    p.add_argument("--ablation-epochs", type=int, default=4, help="epochs per ablation run")
    p.add_argument("--ablation-layers", default=",".join(map(str, ABLATION_LAYERS)), help="prompt layers k tried")
    p.add_argument("--ablation-lengths", default=",".join(map(str, ABLATION_LENGTHS)), help="prompt lengths L tried")
    p.add_argument("--ablation-bottlenecks", default=",".join(map(str, ABLATION_BOTTLENECKS)),
                   help="bottlenecks tried at the default prompt layer and length")
    p.add_argument("--timing-rows", type=int, default=256, help="mr test rows timed per ablation configuration")
    p.add_argument("--timing-repeats", type=int, default=2,
                   help="timed pairs of plain and prompted passes (best rows/s, median ratio)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads; on a machine shared with other jobs 1 is several times faster")
    p.add_argument("--no-wait", action="store_true", help="do not wait for `lpt train` processes to finish")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: mr only, 48 rows per split, max_length 32, 1 epoch, 16 shots x 2 seeds; with "
                        "--ablation: layers 1 and 3, lengths 1 and 5, bottleneck 32")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/accuracy[-ablation][-quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        if args.datasets == p.get_default("datasets"):
            args.datasets = "mr"
        args.limit = args.limit or 48
        args.max_length = "32"
        args.epochs = args.fewshot_epochs = "1"
        args.shots, args.seeds = min(args.shots, 16), min(args.seeds, 2)
        args.probe_l2 = "0.0,0.01"
        args.ablation_train = min(args.ablation_train, 48)
        args.ablation_epochs = 1
        args.ablation_layers, args.ablation_lengths, args.ablation_bottlenecks = "1,3", "1,5", "32"
        args.timing_rows, args.timing_repeats = 32, 1
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.full_methods = ([m.strip() for m in args.full_methods.split(",") if m.strip()]
                         if args.full_methods else list(args.methods))
    unknown = sorted(set(args.methods + args.full_methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}: use {', '.join(METHODS)}")
    args.regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    if set(args.regimes) - {"full", "fewshot"}:
        raise SystemExit("--regimes takes full and/or fewshot")
    trained = [m for m in METHODS if m != "probe"]
    args.epochs = per_key(args.epochs, trained, 3)
    args.fewshot_epochs = per_key(args.fewshot_epochs, trained, 5)
    args.max_length = per_key(args.max_length, ["mr", "bbc", "tweets", *args.datasets], 64)
    args.probe_l2 = [float(v) for v in args.probe_l2.split(",") if v.strip()]
    args.ablation_layers = [int(v) for v in args.ablation_layers.split(",")]
    args.ablation_lengths = [int(v) for v in args.ablation_lengths.split(",")]
    args.ablation_bottlenecks = [int(v) for v in args.ablation_bottlenecks.split(",") if v.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wait, monitor = start_run(args)
    from lpt_serve.model.backbone import Backbone

    started = time.perf_counter()
    frozen = Backbone.load(device="cpu", dtype="float32")
    args.default_layer = args.prompt_layer if args.prompt_layer is not None else frozen.num_layers // 2
    args.default_length = args.prompt_length
    machine = machine_info()
    settings = {k: v for k, v in vars(args).items()}
    if args.ablation:
        ablation = run_ablation(args, frozen)
        table = ablation_table(ablation)
        cpu = monitor.stop()
        choice = ablation["choice"]
        notes = (f"NPG-LPT on mr: {ablation['train_size']} training rows (a class-proportional subsample of the "
                 f"train split), whole dev ({ablation['dev_size']}) and test ({ablation['test_size']}) splits, "
                 f"{args.ablation_epochs} epochs, best dev epoch. rows/s: the mixed pass on {ablation['timing_rows']} "
                 f"mr test rows in batches of {INFERENCE_BATCH}; vs plain: its throughput over the plain encoder's, "
                 f"median of back-to-back pairs; upper width: (S + L) / S with S = {ablation['mean_tokens']} tokens; "
                 f"rel. compute: (k S + (N - k)(S + L)) / (N S).\n"
                 f"From dev only: best k={choice['best_by_dev']['prompt_layer']} "
                 f"L={choice['best_by_dev']['prompt_length']} ({fmt(choice['best_by_dev']['dev_accuracy'])}, one SE "
                 f"{fmt(choice['dev_standard_error'])}); cheapest within one SE: "
                 f"k={choice['cheapest_within_one_se']['prompt_layer']} "
                 f"L={choice['cheapest_within_one_se']['prompt_length']}; the default k={args.default_layer} "
                 f"L={args.default_length} is {'within' if choice['default']['within_one_se_of_best'] else 'OUTSIDE'} "
                 f"one SE of the best.")
        print(header("LPT ablation: prompt layer, prompt length, bottleneck (mr)", machine, notes, cpu))
        print()
        print(table)
        payload = {"benchmark": f"{NAME}-ablation", "date": now_iso(), "machine": machine, "quick": args.quick,
                   "wait": wait, "cpu_contention": cpu, "settings": settings, "ablation": ablation, "table": table,
                   "total_seconds": round(time.perf_counter() - started, 1)}
        save_results(f"{NAME}-ablation", args, payload)
        return 0

    # Regime by regime (few-shot first when asked first), so a long run that is stopped has one whole regime.
    datasets: dict[str, DatasetRun] = {}
    results: dict[str, Any] = {}
    for regime in args.regimes:
        for name in args.datasets:
            if name not in datasets:
                datasets[name] = DatasetRun(name, args, frozen)
                results[name] = datasets[name].entry
            datasets[name].run_regime(regime)
            print(f"[{name}] {regime} done ({results[name]['seconds']:.0f}s so far)", file=sys.stderr, flush=True)
            # A long run keeps what it has measured so far, marked incomplete, should it be stopped.
            write_json(result_path(NAME, args.quick, args.out), {
                "benchmark": NAME, "complete": False, "date": now_iso(), "settings": settings, "results": results})
    cpu = monitor.stop()
    columns = ["dataset", "method", "test accuracy", "test ECE", "trainable params", "adapter bytes", "s/epoch"]
    tables = {regime: markdown_table(columns, table_rows(results, regime)) for regime in args.regimes}
    claims = verdicts(results)
    notes = (f"Test splits, seed-0 splits of each dataset; max_length {args.max_length}. Best epoch: dev accuracy, "
             f"ties to the lower dev loss. ECE: 15 equal-width bins of the top-class confidence. s/epoch: optimiser "
             f"steps only (LPT's one-off lower-layer cache apart; probe: L-BFGS fit seconds).")
    print(header("Accuracy: probe, full fine-tuning, prompt tuning, LoRA and LPT", machine, notes, cpu))
    for regime, table in tables.items():
        title = ("full training data" if regime == "full" else
                 f"few-shot: {args.shots} training rows, dev of the same size, {args.seeds} seeds, mean ± std")
        print(f"\n### {title}\n\n{table}")
    if claims:
        print("\n" + "\n".join(claims))
    payload = {"benchmark": NAME, "complete": True, "date": now_iso(), "machine": machine, "quick": args.quick,
               "wait": wait,
               "cpu_contention": cpu, "settings": settings, "results": results, "tables": tables, "claims": claims,
               "total_seconds": round(time.perf_counter() - started, 1)}
    save_results(NAME if not args.ablation else f"{NAME}-ablation", args, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
