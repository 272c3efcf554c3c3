"""Accuracy references next to LPT, on each dataset's fixed-seed test split (the split the demo adapters report).

For every dataset (default mr, bbc, tweets; splits from `lpt_serve.training.data.materialize`, seed 0):

* frozen linear probe: mean-pooled last-layer MiniLM embeddings (mean over real tokens of `Backbone.forward`,
  same tokenization and max_length as the LPT adapters), standardised with the train split's mean/std, then a
  multinomial logistic regression trained in torch with full-batch L-BFGS. The L2 strength is picked on the
  dev split among `--probe-l2`; the chosen model (trained on train only) is scored on test.
* full fine-tuning: `Trainer(..., TrainSettings(method="full"))` on a fresh `Backbone.load()` (it changes the
  weights), best epoch on dev, then scored on test with the restored best-epoch weights.
* LPT: not retrained here. The demo adapter's recorded test metrics (`training.test` in
  `<store>/<task>/v1/adapter_config.json`, or `<root>/<task>/adapter_config.json` for `--lpt-from`) are put in
  the same table. Its seconds are the demo training run's own (taken at another time, 8 epochs by default).

Wall time is recorded per method and dataset: probe = embedding every split + fitting every L2; full FT =
training (all epochs, dev eval included) + test eval.

    python -m bench.baselines                 # ~20-25 min on 2 CPU cores
    python -m bench.baselines --quick         # smoke run on tiny subsets, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import (
    REPO_ROOT,
    CpuMonitor,
    fmt,
    header,
    machine_info,
    markdown_table,
    now_iso,
    save_results,
    start_run,
)

NAME = "baselines"
DEFAULT_L2 = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


# ----------------------------------------------------------------------------------------------------- data
def load_splits(name: str, limit: int | None) -> dict[str, list[tuple[str, str]]]:
    from lpt_serve.training.data import materialize, read_examples

    paths = materialize(name)
    splits = {split: read_examples(path) for split, path in paths.items()}
    if limit is not None:
        # The splits are already shuffled (stratified, seed 0), so a prefix keeps every class in practice.
        splits = {split: rows[:limit] for split, rows in splits.items()}
    return splits


def _length_order(encoded: Sequence) -> list[int]:
    return sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))


# ---------------------------------------------------------------------------------------------------- probe
@torch.inference_mode()
def embed(backbone, texts: Sequence[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    """Mean over real tokens of the last layer, [N, H] float32 (rows batched by length to limit padding)."""
    from lpt_serve.model.engine import encode_texts, pad_rows

    encoded = encode_texts(backbone, list(texts), None, max_length)
    out = torch.empty(len(encoded), backbone.hidden_size)
    order = _length_order(encoded)
    pad_id = backbone.tokenizer.pad_token_id or 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_rows([encoded[i].input_ids for i in idx], pad_id)
        hidden = backbone(ids.to(backbone.device), mask.to(backbone.device)).float()
        m = mask.to(hidden.device).unsqueeze(-1).float()
        out[idx] = ((hidden * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu()
    return out


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float, max_iter: int = 500) -> nn.Linear:
    """Multinomial logistic regression, mean cross-entropy + l2/2 * ||W||^2 (bias not penalised), full-batch L-BFGS."""
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], num_labels)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-6,
                            tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 0.5 * l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def probe_features(backbone, splits: dict, max_length: int) -> tuple[dict, dict, list[str], float]:
    """Frozen embeddings and label indices of every split: (features, labels, label names, seconds)."""
    t0 = time.perf_counter()
    labels = sorted({y for _, y in splits["train"]})
    index = {label: i for i, label in enumerate(labels)}
    feats, ys = {}, {}
    for split, rows in splits.items():
        feats[split] = embed(backbone, [t for t, _ in rows], max_length)
        ys[split] = torch.tensor([index[y] for _, y in rows])
    return feats, ys, labels, time.perf_counter() - t0


def fit_probe(feats: dict, ys: dict, num_labels: int, l2_values: Sequence[float]) -> dict[str, Any]:
    """Standardise with train's statistics, fit one logistic regression per L2 on train, keep the best on dev
    (ties: lower dev log loss) and score it on test: accuracy, macro-F1, ECE and log loss."""
    from lpt_serve.training.trainer import is_better_epoch, probability_metrics, tensor_bytes

    t1 = time.perf_counter()
    mean, std = feats["train"].mean(0), feats["train"].std(0).clamp_min(1e-6)
    x = {split: (f - mean) / std for split, f in feats.items()}
    sweep = []
    best: tuple[dict, float, nn.Linear] | None = None
    for l2 in l2_values:
        model = fit_logreg(x["train"], ys["train"], num_labels, l2)
        with torch.no_grad():
            dev = probability_metrics(torch.softmax(model(x["dev"]), -1), ys["dev"].tolist(), num_labels)
        sweep.append({"l2": l2, "dev_accuracy": round(dev["accuracy"], 4), "dev_macro_f1": round(dev["macro_f1"], 4)})
        if is_better_epoch(dev, best[0] if best else None):
            best = (dev, l2, model)
    assert best is not None
    with torch.no_grad():
        test = probability_metrics(torch.softmax(best[2](x["test"]), -1), ys["test"].tolist(), num_labels)
    return {
        "test": {k: round(v, 4) for k, v in test.items()},
        "dev": {k: round(v, 4) for k, v in best[0].items()},
        "dev_accuracy": round(best[0]["accuracy"], 4),
        "l2": best[1],
        "l2_sweep": sweep,
        "trainable_parameters": sum(p.numel() for p in best[2].parameters()),
        # The weights and the standardisation (mean, std): what a served probe would need.
        "adapter_bytes": tensor_bytes(best[2].state_dict() | {"mean": mean, "std": std}),
        "fit_seconds": round(time.perf_counter() - t1, 1),
    }


def run_probe(backbone, splits: dict, max_length: int, l2_values: Sequence[float]) -> dict[str, Any]:
    t0 = time.perf_counter()
    feats, ys, labels, embed_s = probe_features(backbone, splits, max_length)
    return fit_probe(feats, ys, len(labels), l2_values) | {
        "embed_seconds": round(embed_s, 1), "seconds": round(time.perf_counter() - t0, 1)}


# -------------------------------------------------------------------------------------------------- full FT
def run_full(name: str, splits: dict, epochs: int, lr: float, batch_size: int, max_length: int,
             seed: int) -> dict[str, Any]:
    from lpt_serve.model.backbone import Backbone
    from lpt_serve.training.trainer import Trainer, TrainSettings

    backbone = Backbone.load()  # fresh: full fine-tuning changes the weights
    settings = TrainSettings(method="full", epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length,
                             seed=seed)
    t0 = time.perf_counter()
    trainer = Trainer(backbone, settings, progress=False)
    result = trainer.train(name, splits["train"], splits["dev"], name)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    test = trainer.score(result, splits["test"])
    test_s = time.perf_counter() - t1
    out = {
        "test": {k: round(v, 4) for k, v in test.items()},
        "best_epoch": result.best_epoch,
        "dev": {k: round(v, 4) for k, v in result.dev_metrics.items()},
        "epochs": [{"epoch": r.epoch, "train_loss": round(r.train_loss, 4), "dev_accuracy": round(r.dev_accuracy, 4),
                    "seconds": round(r.seconds, 1)} for r in result.epochs],
        "mean_step_seconds": round(result.extra["mean_step_seconds"], 4),
        "trainable_parameters": result.trainable_parameters,
        "train_seconds": round(train_s, 1),
        "test_seconds": round(test_s, 1),
        "seconds": round(train_s + test_s, 1),
        "settings": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "max_length": max_length, "seed": seed},
    }
    del result, backbone
    return out


# ---------------------------------------------------------------------------------------------------- LPT
def read_lpt(name: str, store: Path, extra_roots: Sequence[Path]) -> dict[str, Any] | None:
    """The demo adapter's recorded metrics: <store>/<task>/v1 first, then <root>/<task> for each extra root."""
    candidates = [store / name / "v1" / "adapter_config.json"]
    candidates += [root / name / "adapter_config.json" for root in extra_roots]
    for path in candidates:
        if not path.is_file():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        training = config.get("training") or {}
        if "test" not in training:
            continue
        return {
            "path": str(path),
            "test": training["test"],
            "test_size": training.get("test_size"),
            "dev": training.get("dev"),
            "seconds": training.get("seconds"),
            "epochs": training.get("epochs"),
            "best_epoch": training.get("best_epoch"),
            "lr": training.get("lr"),
            "data": training.get("data"),
            "prompt_layer": config.get("prompt_layer"),
            "prompt_length": config.get("prompt_length"),
            "generator": config.get("generator"),
            "max_length": config.get("max_length"),
            "trainable_parameters": training.get("trainable_parameters"),
        }
    return None


# ----------------------------------------------------------------------------------------------------- main
def _per_dataset(spec: str, default: int, datasets: Sequence[str]) -> dict[str, int]:
    """'mr=2,bbc=1' -> {dataset: value}, default for the rest."""
    values = dict.fromkeys(datasets, default)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        if key not in values:
            raise SystemExit(f"unknown dataset {key!r} in {spec!r}")
        values[key] = int(value)
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", default="mr,bbc,tweets", help="comma-separated dataset names")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text for probe and full FT (LPT demo: 256)")
    p.add_argument("--full-max-length", default="", help="per-dataset override for full FT only, e.g. 'bbc=128'")
    p.add_argument("--full-epochs", type=int, default=2, help="full fine-tuning epochs")
    p.add_argument("--full-epochs-per", default="", help="per-dataset override, e.g. 'bbc=1'")
    p.add_argument("--full-lr", type=float, default=3e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-l2", default=",".join(map(str, DEFAULT_L2)), help="L2 values tried on dev")
    p.add_argument("--skip-probe", action="store_true")
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N rows of each split")
    p.add_argument("--store", type=Path, default=REPO_ROOT / "adapters_store", help="where the demo adapters live")
    p.add_argument("--lpt-from", type=Path, action="append", default=[],
                   help="extra folder(s) holding <task>/adapter_config.json, searched after --store")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no-wait", action="store_true", help="do not wait for `lpt train` processes to finish")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: mr only, 32 rows per split, max_length 32, 1 full-FT epoch, 2 L2 values")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/baselines[-quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        if args.datasets == p.get_default("datasets"):
            args.datasets = "mr"
        args.limit = args.limit or 32
        args.max_length = min(args.max_length, 32)
        args.full_epochs = 1
        args.probe_l2 = "0.0,0.01"
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.probe_l2 = [float(v) for v in args.probe_l2.split(",") if v.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wait, monitor = start_run(args)
    from lpt_serve.model.backbone import Backbone

    started = time.perf_counter()
    machine = machine_info()
    full_epochs = _per_dataset(args.full_epochs_per, args.full_epochs, args.datasets)
    full_max_length = _per_dataset(args.full_max_length, args.max_length, args.datasets)
    frozen = Backbone.load() if not args.skip_probe else None
    results: dict[str, Any] = {}
    for name in args.datasets:
        t0, monitor = time.perf_counter(), CpuMonitor()
        splits = load_splits(name, args.limit)
        entry: dict[str, Any] = {"sizes": {k: len(v) for k, v in splits.items()}}
        if frozen is not None:
            print(f"[{name}] linear probe ...", file=sys.stderr, flush=True)
            entry["probe"] = run_probe(frozen, splits, args.max_length, args.probe_l2)
        if not args.skip_full:
            print(f"[{name}] full fine-tuning, {full_epochs[name]} epoch(s), max_length {full_max_length[name]} ...",
                  file=sys.stderr, flush=True)
            entry["full"] = run_full(name, splits, full_epochs[name], args.full_lr, args.batch_size,
                                     full_max_length[name], args.seed)
        entry["lpt_demo"] = read_lpt(name, args.store, args.lpt_from)
        if entry["lpt_demo"] and entry["lpt_demo"].get("test_size") not in (None, len(splits["test"])):
            entry["lpt_demo"]["warning"] = "the demo adapter was scored on a test split of another size"
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        entry["cpu_contention"] = monitor.stop()
        results[name] = entry
        print(f"[{name}] done in {entry['seconds']:.0f}s", file=sys.stderr, flush=True)

    rows = []
    for name, e in results.items():
        probe, full, lpt = e.get("probe"), e.get("full"), e.get("lpt_demo")

        def pair(part: dict | None) -> str:
            return f"{fmt(part['test']['accuracy'])} / {fmt(part['test']['macro_f1'])}" if part else "n/a"

        secs = " / ".join(fmt(x, 0) if x is not None else "n/a" for x in (
            probe["seconds"] if probe else None, lpt["seconds"] if lpt else None, full["seconds"] if full else None))
        full_note = (f" (ep {full['best_epoch']}/{len(full['epochs'])}, len {full['settings']['max_length']})"
                     if full else "")
        lpt_note = f" (ep {lpt['best_epoch']}/{lpt['epochs']})" if lpt else ""
        rows.append([name, f"{e['sizes']['test']}", pair(probe), pair(lpt) + lpt_note, pair(full) + full_note, secs])
    table = markdown_table(
        ["dataset", "test n", "probe acc / F1", "LPT acc / F1 (demo adapter)", "full FT acc / F1",
         "seconds probe / LPT / full"], rows)
    notes = ("Test split, seed 0. Probe: mean-pooled frozen MiniLM + logistic regression (L2 on dev). LPT: the demo "
             "adapter's recorded numbers (its seconds come from its own training run). Full FT: best dev epoch.")
    cpu = monitor.stop()
    print(header("Baselines: frozen probe vs LPT vs full fine-tuning", machine, notes, cpu))
    print()
    print(table)
    payload = {
        "benchmark": NAME, "date": now_iso(), "machine": machine, "quick": args.quick,
        "wait": wait, "cpu_contention": cpu,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"full_epochs_per_dataset": full_epochs, "full_max_length_per_dataset": full_max_length},
        "results": results, "table": table, "total_seconds": round(time.perf_counter() - started, 1),
    }
    save_results(NAME, args, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
