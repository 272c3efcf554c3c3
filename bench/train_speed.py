"""Training cost on MR: LPT vs prompt tuning vs full fine-tuning (step time, peak memory), and the lower-layer cache.

Part 1, optimizer steps. Each method runs in its own subprocess (one at a time, so they never share the CPU):

* `full`        every backbone weight + a linear head (`_FullModel`), AdamW over all 22.6M parameters;
* `prompt`      classic prompt tuning: a static prompt at layer 0, frozen backbone, gradients flow through all layers;
* `lpt`         LPT as the paper runs it: the frozen lower layers 1..k run forward (no grad) every step, the
                generator + upper layers + head forward and backward;
* `lpt-cached`  LPT as this project's trainer runs it by default: H_k of every train example is computed once
                (`LowerCache`, the whole train split, built before the steps and not timed), so a step only
                runs generator + upper layers + head.

Every worker loads the backbone, tokenizes the MR train split, and takes the same `warmup + steps` batches of
`--batch-size` rows (the trainer's own length-bucketed batching, seeded), then drives the trainer's exact step:
`Trainer._logits` (the same forward the trainer uses) -> cross-entropy -> zero_grad -> backward ->
clip_grad_norm_(1.0) -> AdamW.step. Only the LR scheduler is left out (a scalar update). Driving the steps
directly (instead of timing `Trainer.train`) keeps the dev evaluation, the warm-up steps and the cache build out
of the step time, and lets every method run on identical batches. The first `--warmup` steps are not timed
(first-touch allocations, lazy init); the table gives the mean over the next `--steps`.

Memory (CPU): right after the model is loaded and the data tokenized, the worker reads its RSS (VmRSS) and
resets the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`), so that the load's own transient peak
does not count. At the end it reads `resource.getrusage(RUSAGE_SELF).ru_maxrss`: the absolute peak RSS while
training (weights, activations, gradients, optimizer state, the cache, plus the Python/torch runtime), and
`peak - RSS after load`: what training added on top of the loaded model. If the reset is refused, the peak is
the lifetime peak, and the JSON says so. The paper's "56.6% less memory" is GPU memory, which has no
interpreter or tokenizer in it; the delta is the closer match, the absolute peak is diluted by ~0.5 GB of runtime.

Part 2, epochs with and without the cache (in this process, one backbone): `Trainer.train` for 1 epoch on the
MR train split with `cache_lower=True` and `cache_lower=False`, at prompt layer 3 (the default, N//2) and 5.
With the cache the cache is built once before epoch 1 (`cache_seconds`); every later epoch costs what the cached
epoch costs, so "epoch after the first" = the cached epoch, and the ratio is uncached epoch / cached epoch.
Epoch times include the trainer's dev evaluation (400 rows, also cached or not); the train-steps-only times are
reported too.

    python -m bench.train_speed            # ~5-8 min on 2 CPU cores
    python -m bench.train_speed --quick    # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    CpuMonitor,
    fmt,
    header,
    machine_info,
    markdown_table,
    now_iso,
    peak_rss_mb,
    ratio,
    rss_mb,
    save_results,
    set_threads,
    start_run,
)
from lpt_serve.model.backbone import quiet_transformers

NAME = "train_speed"
METHODS = ("full", "prompt", "lpt", "lpt-cached")
TARGET_SPEEDUP = 2.0  # LPT step vs full FT step
TARGET_MEM_REDUCTION = 0.566  # LPT peak memory vs full FT
TARGET_CACHE_SPEEDUP = 4.0  # epoch after the first, cache vs no cache


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _train_rows(limit: int | None) -> list[tuple[str, str]]:
    from lpt_serve.training.data import materialize, read_examples

    rows = read_examples(materialize("mr")["train"])
    return rows[:limit] if limit else rows


# --------------------------------------------------------------------------------------------- step worker
def step_worker(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """One method's steps, in a process of its own; returns timings and memory."""
    import torch
    from torch import nn

    quiet_transformers()
    set_threads(args.threads)
    rss_start = rss_mb()
    from lpt_serve.model.adapter import TaskAdapter
    from lpt_serve.model.backbone import Backbone
    from lpt_serve.model.engine import encode_texts
    from lpt_serve.training.trainer import LowerCache, Trainer, TrainSettings, _FullModel, _length_batches

    backbone = Backbone.load()
    rows = _train_rows(None)
    labels = sorted({y for _, y in rows})
    index = {label: i for i, label in enumerate(labels)}
    encoded = encode_texts(backbone, [t for t, _ in rows], None, args.max_length)
    y = [index[label] for _, label in rows]
    n_batches = args.warmup + args.steps
    lengths = [len(e.input_ids) for e in encoded]
    batches = _length_batches(lengths, args.batch_size, random.Random(args.seed))[:n_batches]
    rss_after_load = rss_mb()
    lifetime_peak_after_load = peak_rss_mb()
    reset = _reset_peak_rss()

    base = "lpt" if method.startswith("lpt") else method
    settings = TrainSettings(method=base, prompt_layer=args.prompt_layer if base == "lpt" else None,
                             batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                             cache_lower=method == "lpt-cached")
    trainer = Trainer(backbone, settings, progress=False)
    torch.manual_seed(args.seed)
    k = trainer.prompt_layer() if base != "full" else 0
    if base == "full":
        model: nn.Module = _FullModel(backbone, len(labels), settings.pooling, settings.dropout)
        adapter = None
    else:
        adapter = TaskAdapter(trainer._adapter_config("mr", labels)).to(backbone.device)
        model = adapter
    cache, cache_s, cache_mb = None, 0.0, 0.0
    if method == "lpt-cached":
        t0 = time.perf_counter()
        cache = LowerCache(backbone, encoded, k, settings.eval_batch_size, progress=False)
        cache_s = time.perf_counter() - t0
        cache_mb = sum(r.numel() * r.element_size() for r in cache.rows) / 2**20
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.resolved_lr(), weight_decay=settings.weight_decay)
    model.train()
    times = []
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        logits = trainer._logits(model, adapter, batch, encoded, cache, k)
        loss = nn.functional.cross_entropy(logits.float(), torch.tensor([y[j] for j in batch], device=logits.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    peak = peak_rss_mb()
    return {
        "method": method,
        "prompt_layer": k if base != "full" else None,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "warmup_steps": args.warmup,
        "timed_steps": len(times),
        "step_seconds_mean": statistics.fmean(times),
        "step_seconds_median": statistics.median(times),
        "step_seconds_stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
        "step_seconds": [round(t, 4) for t in times],
        "tokens_per_batch_mean": statistics.fmean(len(b) * max(len(encoded[j].input_ids) for j in b)
                                                  for b in batches[args.warmup:]),
        "rss_start_mb": rss_start,
        "rss_after_load_mb": rss_after_load,
        "lifetime_peak_after_load_mb": lifetime_peak_after_load,
        "peak_reset": reset,
        "peak_rss_mb": peak,
        "peak_delta_mb": peak - rss_after_load,
        "cache_build_seconds": cache_s,
        "cache_mb": cache_mb,
        "cache_rows": len(encoded) if cache is not None else 0,
    }


def run_worker(method: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--worker-out", str(out),
               "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--max-length",
               str(args.max_length), "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed",
               str(args.seed), "--prompt-layer", str(args.prompt_layer)]
        t0, monitor = time.perf_counter(), CpuMonitor()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
        result["process_seconds"] = time.perf_counter() - t0
        result["cpu_contention"] = monitor.stop()
        return result


# ---------------------------------------------------------------------------------------------- epochs
def epoch_run(backbone, rows: list, dev: list, prompt_layer: int, cache: bool, args: argparse.Namespace) -> dict:
    from lpt_serve.training.trainer import Trainer, TrainSettings

    settings = TrainSettings(method="lpt", prompt_layer=prompt_layer, epochs=1, batch_size=args.batch_size,
                             max_length=args.max_length, seed=args.seed, cache_lower=cache)
    t0, monitor = time.perf_counter(), CpuMonitor()
    result = Trainer(backbone, settings, progress=False).train("mr", rows, dev, "mr")
    steps = -(-len(rows) // args.batch_size)
    return {
        "prompt_layer": prompt_layer,
        "cache_lower": cache,
        "epoch_seconds": result.epochs[0].seconds,
        "train_steps_seconds": result.extra["mean_step_seconds"] * steps,
        "mean_step_seconds": result.extra["mean_step_seconds"],
        "cache_seconds": result.cache_seconds,
        "total_seconds": time.perf_counter() - t0,
        "dev_accuracy": result.dev_metrics["accuracy"],
        "steps": steps,
        "cpu_contention": monitor.stop(),
    }


def run_epochs(args: argparse.Namespace) -> list[dict[str, Any]]:
    from lpt_serve.model.backbone import Backbone
    from lpt_serve.training.data import materialize, read_examples

    backbone = Backbone.load()
    rows = _train_rows(args.epoch_limit)
    dev = read_examples(materialize("mr")["dev"])
    if args.epoch_limit:
        dev = dev[: max(32, args.epoch_limit // 8)]
    out = []
    for k in args.epoch_layers:
        for cache in (True, False):  # interleaved per layer so slow drift hits both sides alike
            print(f"[epochs] prompt layer {k}, cache {cache} ...", file=sys.stderr, flush=True)
            out.append(epoch_run(backbone, rows, dev, k, cache, args))
    return out


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {', '.join(METHODS)}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256, help="tokens per text (MR sentences are far shorter)")
    p.add_argument("--prompt-layer", type=int, default=3, help="LPT prompt layer for the step timing")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--epoch-layers", default="3,5", help="prompt layers for the cache/no-cache epoch timing ('' skips)")
    p.add_argument("--epoch-limit", type=int, default=None, help="train rows for the epoch timing (default: all 3,200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process")
    p.add_argument("--no-wait", action="store_true", help="do not wait for `lpt train` processes to finish")
    p.add_argument("--quick", action="store_true", help="smoke run: 1+2 steps, epochs on 64 rows at layer 3 only")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/train_speed[-quick].json)")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 2
        args.epoch_limit = args.epoch_limit or 64
        if args.epoch_layers == p.get_default("epoch_layers"):
            args.epoch_layers = "3"
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}")
    args.epoch_layers = [int(v) for v in str(args.epoch_layers).split(",") if v.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = step_worker(args.worker, args)
        args.worker_out.write_text(json.dumps(result))
        return 0
    wait, monitor = start_run(args)
    started = time.perf_counter()
    machine = machine_info()
    steps: dict[str, dict] = {}
    for method in args.methods:
        print(f"[steps] {method} ...", file=sys.stderr, flush=True)
        steps[method] = run_worker(method, args)
    steps_s = time.perf_counter() - started
    epochs = run_epochs(args) if args.epoch_layers else []

    full = steps.get("full")
    rows = []
    for method, r in steps.items():
        speedup = ratio(full["step_seconds_mean"], r["step_seconds_mean"]) if full else None
        mem_abs = 1 - r["peak_rss_mb"] / full["peak_rss_mb"] if full else None
        mem_delta = 1 - r["peak_delta_mb"] / full["peak_delta_mb"] if full and full["peak_delta_mb"] > 0 else None
        rows.append([
            method, f"{r['trainable_parameters']:,}", fmt(r["step_seconds_mean"] * 1000, 0),
            fmt(r["step_seconds_stdev"] * 1000, 0), fmt(speedup, 2, "x"), fmt(r["peak_rss_mb"], 0),
            fmt(r["peak_delta_mb"], 0), fmt(None if mem_abs is None else mem_abs * 100, 1, "%"),
            fmt(None if mem_delta is None else mem_delta * 100, 1, "%"),
        ])
    rows.append(["paper/target (lpt)", "", "", "", f">= {TARGET_SPEEDUP:.1f}x", "", "",
                 f">= {TARGET_MEM_REDUCTION * 100:.1f}%", f">= {TARGET_MEM_REDUCTION * 100:.1f}%"])
    step_table = markdown_table(
        ["method", "trainable", "step ms (mean)", "stdev ms", "speed vs full", "peak RSS MB", "peak - loaded MB",
         "less memory (abs)", "less memory (delta)"], rows)

    epoch_rows = []
    for k in args.epoch_layers:
        cached = next((e for e in epochs if e["prompt_layer"] == k and e["cache_lower"]), None)
        plain = next((e for e in epochs if e["prompt_layer"] == k and not e["cache_lower"]), None)
        if not cached or not plain:
            continue
        epoch_rows.append([
            k, fmt(plain["epoch_seconds"], 1), fmt(cached["epoch_seconds"], 1), fmt(cached["cache_seconds"], 1),
            fmt(ratio(plain["epoch_seconds"], cached["epoch_seconds"]), 2, "x"),
            fmt(ratio(plain["train_steps_seconds"], cached["train_steps_seconds"]), 2, "x"),
            fmt(ratio(plain["epoch_seconds"], cached["epoch_seconds"] + cached["cache_seconds"]), 2, "x"),
        ])
    epoch_rows.append(["paper/target", "", "", "", f">= {TARGET_CACHE_SPEEDUP:.1f}x", "", ""])
    epoch_table = markdown_table(
        ["prompt layer", "epoch s, no cache", "epoch s, cached", "cache build s (once)",
         "speed-up, epochs after 1st", "speed-up, train steps only", "speed-up, 1st epoch incl. cache"], epoch_rows)

    n_rows = epochs[0]["steps"] * args.batch_size if epochs else 0
    notes = (f"MR, batch {args.batch_size}, max_length {args.max_length}, LPT prompt layer {args.prompt_layer} of 6, "
             f"{args.warmup} warm-up + {args.steps} timed steps on the same batches for every method; each method in "
             f"its own process. Memory: ru_maxrss after a high-water reset taken right after model load.")
    cpu = monitor.stop()
    print(header("Training cost: LPT vs prompt tuning vs full fine-tuning", machine, notes, cpu))
    print()
    print(step_table)
    print()
    print(f"LPT epoch on MR train (~{n_rows} rows), lower-layer cache vs none (epoch = train steps + dev eval):")
    print()
    print(epoch_table)
    payload = {
        "benchmark": NAME, "date": now_iso(), "machine": machine, "quick": args.quick,
        "wait": wait, "cpu_contention": cpu,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
        "targets": {"lpt_step_speedup_vs_full": TARGET_SPEEDUP, "lpt_memory_reduction_vs_full": TARGET_MEM_REDUCTION,
                    "cache_epoch_speedup": TARGET_CACHE_SPEEDUP},
        "memory_method": "per-method subprocess; VmRSS after model load and tokenization, then /proc/self/clear_refs=5 "
                         "resets the high-water mark; peak = ru_maxrss at the end; delta = peak - RSS after load",
        "steps": steps, "steps_seconds": round(steps_s, 1), "epochs": epochs,
        "tables": {"steps": step_table, "epochs": epoch_table},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    save_results(NAME, args, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
