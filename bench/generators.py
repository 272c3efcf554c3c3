"""What a pass pays per task: generator, prompt insertion and head cost per batch against the number of distinct
tasks in it, and the pass against the raw encoder.

One process, the default backbone (all-MiniLM-L6-v2) on the torch runtime, fp32 on the CPU, `--threads` threads.
A pool of `--pool` (256) adapters shaped like the trainer's defaults (NPG, prompt layer N//2, 5 prompt tokens,
bottleneck 128, linear head, 2-5 labels; `--kinds mixed` cycles NPG, MPPG and APPG), random weights: speed does
not depend on what they learned. A batch of R rows (`--rows`, 64 and 256) with T distinct tasks (`--tasks`, 1, 16,
64, 256) takes T tasks drawn from the pool afresh for each batch, R/T rows each, and R consecutive MR sentences.

Each batch runs through `classify_rows` (the server's mixed pass, length buckets included). The time inside the
backbone (embeddings and layers, timed by wrapping `Backbone.embed` and `Backbone.run_layers`) is subtracted from
the pass: what is left is the per-task work (grouping rows, generators, prompt insertion, heads, softmax). The raw
encoder (transformers' `AutoModel`, sdpa attention, no pooler) runs the same padded batch for the ratio.

`--clock cpu` times with the process's CPU seconds instead of the wall clock: on a machine shared with other work
(where a wall-clock pass can take several times its own cost), with `--threads 1` (no idle intra-op thread
spinning while it waits for a descheduled partner), CPU seconds are the work itself, and the ratios hold.

Two settings of the engine run the same batches, in the same repetitions, in alternating order: "engine" (its
defaults: on a CPU one generator and one head call per task) and "grouped" (`GROUP_ON_CPU`: same-shaped
generators and linear heads as batched matmuls over stacked weights, as on an accelerator). An engine without
these settings (an older checkout) is measured as it is. `--baseline-engine FILE` loads another engine module (say
`git show HEAD:server/lpt_serve/model/engine.py > /tmp/engine_head.py`) and runs the same batches through its
`classify_rows` too, as "baseline", in the same rotation: a before/after in one process. The table gives medians
over `--reps` repetitions.

    python -m bench.generators            # ~10 min on 2 CPU cores
    python -m bench.generators --quick    # smoke run
    python -m bench.generators --threads 1 --clock cpu    # on a shared machine
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.common import fmt, header, machine_info, markdown_table, now_iso, ratio, save_results, start_run

NAME = "generators"
ENGINE = "engine"  # the engine's own settings (or an older engine without them)
GROUPED = "grouped"
BASELINE = "baseline"  # --baseline-engine
KINDS = {"npg": ("npg",), "mixed": ("npg", "mppg", "appg")}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# ------------------------------------------------------------------------------------------------- inputs
def make_pool(backbone, count: int, kinds: Sequence[str], seed: int) -> list:
    import torch

    from lpt_serve.model.adapter import AdapterConfig, TaskAdapter

    adapters = []
    for i in range(count):
        config = AdapterConfig(task=f"t{i:03d}", labels=[f"c{j}" for j in range(2 + i % 4)],
                               generator=kinds[i % len(kinds)], prompt_layer=backbone.num_layers // 2,
                               prompt_length=5, bottleneck=128, head="linear", pooling="mean",
                               backbone=backbone.fingerprint.as_dict())
        torch.manual_seed(seed + i)
        adapter = TaskAdapter(config).eval()
        for p in adapter.parameters():
            p.requires_grad_(False)
        adapters.append(adapter)
    return adapters


def assign(pool: Sequence, rows: int, tasks: int, rng: random.Random) -> list:
    """One batch's adapters: `tasks` distinct ones drawn from the pool, `rows // tasks` rows each (interleaved)."""
    chosen = rng.sample(list(pool), tasks)
    return [chosen[i % tasks] for i in range(rows)]


# --------------------------------------------------------------------------------------------------- timing
class BackboneClock:
    """Seconds spent inside the backbone's embeddings and layers, by wrapping them on the instance; `now` is the
    clock the whole measurement uses (wall or process CPU seconds)."""

    def __init__(self, backbone, now: Callable[[], float] = time.perf_counter) -> None:
        self.seconds = 0.0
        self.now = now
        for name in ("embed", "run_layers"):
            method = getattr(backbone, name)
            setattr(backbone, name, self._timed(getattr(method, "__wrapped_method__", method)))

    def _timed(self, method: Callable) -> Callable:
        def run(*args, **kwargs):
            started = self.now()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += self.now() - started
        run.__wrapped_method__ = method  # type: ignore[attr-defined]
        return run


def load_engine(path: str | Path) -> ModuleType:
    """Another engine module (an older engine.py), imported under its own name beside the current one."""
    spec = importlib.util.spec_from_file_location("lpt_baseline_engine", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it is being executed
    spec.loader.exec_module(module)
    return module


def strategies(baseline: ModuleType | None = None) -> dict[str, tuple[ModuleType, dict[str, Any]]]:
    """The engines and settings to compare: each an engine module and the module attributes to set on it."""
    from lpt_serve.model import engine

    out = {ENGINE: (engine, {})}
    if hasattr(engine, "GROUP_ON_CPU"):
        out[GROUPED] = (engine, {"GROUP_ON_CPU": True})
    if baseline is not None:
        out[BASELINE] = (baseline, {})
    return out


def run_batches(backbone, clock: BackboneClock, batches: Sequence[tuple[list, list]],
                strategy: tuple[ModuleType, dict[str, Any]]) -> tuple[float, float]:
    """(pass seconds, backbone seconds) summed over the batches, with the engine set as asked (and reset after)."""
    engine, settings = strategy
    saved = {name: getattr(engine, name) for name in settings}
    for name, value in settings.items():
        setattr(engine, name, value)
    try:
        clock.seconds = 0.0
        started = clock.now()
        for adapters, encoded in batches:
            engine.classify_rows(backbone, adapters, encoded)
        return clock.now() - started, clock.seconds
    finally:
        for name, value in saved.items():
            setattr(engine, name, value)


def raw_seconds(model, padded: Sequence[tuple[Any, Any]], now: Callable[[], float] = time.perf_counter) -> float:
    import torch

    started = now()
    with torch.inference_mode():
        for ids, mask in padded:
            model(input_ids=ids, attention_mask=mask)
    return now() - started


def load_raw_encoder():
    import torch
    from transformers import AutoModel

    from lpt_serve.model.backbone import default_backbone_path

    return AutoModel.from_pretrained(default_backbone_path(), add_pooling_layer=False, attn_implementation="sdpa",
                                     dtype=torch.float32, local_files_only=True).eval()


def measure(backbone, raw, pool: Sequence, texts: Sequence[str], *, rows: int, tasks: int, batches: int,
            reps: int, seed: int, clock: str = "wall", baseline: ModuleType | None = None,
            log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Per-batch milliseconds of the pass, its backbone part and its per-task part (pass - backbone) for each
    grouping strategy, and of the raw encoder on the same padded batches: medians over interleaved repetitions."""
    from lpt_serve.model.engine import encode_texts, pad_rows

    rng = random.Random(seed + rows * 1000 + tasks)
    encoded = encode_texts(backbone, list(texts))
    work = []
    for b in range(batches):
        start = (b * rows) % max(1, len(encoded) - rows)
        work.append((assign(pool, rows, tasks, rng), encoded[start:start + rows]))
    pad_id = backbone.tokenizer.pad_token_id or 0
    padded = [pad_rows([e.input_ids for e in enc], pad_id) for _, enc in work]
    now = CLOCKS[clock]
    timer = BackboneClock(backbone, now)
    modes = strategies(baseline)
    for setting in modes.values():  # warm-up: first-touch allocations stay out of the timing
        run_batches(backbone, timer, work[:1], setting)
    raw_seconds(raw, padded[:1], now)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    raw_samples = []
    for rep in range(reps):
        log(f"rows {rows}, tasks {tasks}: repetition {rep + 1}/{reps}")
        names = list(modes)
        order = names[rep % len(names):] + names[:rep % len(names)]
        raw_samples.append(raw_seconds(raw, padded, now))
        for name in order:
            samples[name].append(run_batches(backbone, timer, work, modes[name]))
    per_batch = 1000.0 / batches
    out: dict[str, Any] = {"rows": rows, "tasks": tasks, "batches": batches,
                           "raw_ms": statistics.median(raw_samples) * per_batch}
    for name, values in samples.items():
        out[name] = {
            "pass_ms": statistics.median(v[0] for v in values) * per_batch,
            "backbone_ms": statistics.median(v[1] for v in values) * per_batch,
            "per_task_work_ms": statistics.median(v[0] - v[1] for v in values) * per_batch,
            "samples_s": values,
        }
        out[name]["vs_raw"] = ratio(out["raw_ms"], out[name]["pass_ms"])
    return out


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.generators", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", default="64,256", help="rows per batch, comma-separated")
    p.add_argument("--tasks", default="1,16,64,256", help="distinct tasks per batch, comma-separated (<= rows)")
    p.add_argument("--kinds", choices=sorted(KINDS), default="npg", help="generator kinds in the pool")
    p.add_argument("--baseline-engine", type=Path, default=None,
                   help="another engine.py to run the same batches through, for a before/after in one process")
    p.add_argument("--pool", type=int, default=256, help="adapters the batches draw their tasks from")
    p.add_argument("--batches", type=int, default=4, help="batches per measurement")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (the table gives medians)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall seconds, or the process's CPU seconds (for a shared machine, with --threads 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-wait", action="store_true", help="do not wait for `lpt train` processes to finish")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 rows, 1 and 64 tasks, one repetition")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/generators[-quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.tasks, args.reps, args.batches, args.pool = "64", "1,64", 1, 2, 64
    args.rows = [int(r) for r in str(args.rows).split(",")]
    args.tasks = [int(t) for t in str(args.tasks).split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wait, monitor = start_run(args)
    from bench.runtime import load_texts
    from lpt_serve.model.backbone import Backbone

    started = time.perf_counter()
    machine = machine_info()
    backbone = Backbone.load(device="cpu", dtype="float32", runtime="torch")
    raw = load_raw_encoder()
    pool = make_pool(backbone, max(args.pool, max(args.tasks)), KINDS[args.kinds], args.seed)
    texts, source = load_texts(max(args.rows) * args.batches * 2, args.seed)

    def log(line: str) -> None:
        print(f"[generators] {line}", file=sys.stderr, flush=True)

    baseline = load_engine(args.baseline_engine) if args.baseline_engine else None
    results = []
    for rows in args.rows:
        for tasks in args.tasks:
            if tasks > rows:
                continue
            results.append(measure(backbone, raw, pool, texts, rows=rows, tasks=tasks, batches=args.batches,
                                   reps=args.reps, seed=args.seed, clock=args.clock, baseline=baseline, log=log))
    modes = [m for m in (BASELINE, ENGINE, GROUPED) if m in results[0]]
    table_rows = []
    for r in results:
        line = [r["rows"], r["tasks"], fmt(r["raw_ms"], 1), fmt(r[ENGINE]["pass_ms"], 1),
                fmt(r[ENGINE]["vs_raw"], 2)]
        line += [fmt(r[m]["per_task_work_ms"], 1) for m in modes]
        table_rows.append(line)
    headers = ["rows", "tasks", "raw encoder ms", "engine: pass ms", "engine: vs raw"]
    headers += [f"per-task work ms: {m}" for m in modes]
    table = markdown_table(headers, table_rows)
    cpu = monitor.stop()
    notes = (f"{args.clock} clock, {args.kinds} pool of {len(pool)} adapters, {source} texts, {args.batches} batches "
             "per measurement, "
             f"median of {args.reps} interleaved repetitions, per batch; per-task work = pass - time inside the "
             "backbone; vs raw = raw encoder ms / pass ms.")
    print(header("Generators and heads: cost per batch against distinct tasks", machine, notes, cpu))
    print()
    print(table)
    payload = {"benchmark": NAME, "date": now_iso(), "machine": machine, "quick": args.quick, "wait": wait,
               "cpu_contention": cpu, "settings": {**vars(args), "text_source": source}, "results": results,
               "tables": {"main": table}, "total_seconds": round(time.perf_counter() - started, 1)}
    save_results(NAME, args, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
