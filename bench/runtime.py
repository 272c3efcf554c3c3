"""Encoder runtimes: the mixed-task engine on torch and on ONNX Runtime, against a raw transformers forward.

Three ways to run the same token ids through the default backbone (all-MiniLM-L6-v2), in one process, fp32 on the
CPU, `--threads` torch threads (ONNX Runtime gets as many intra-op threads):

* raw transformers: `AutoModel` (sdpa attention, no pooler), eval, inference mode, on the padded batches; the encoder
  alone, no prompts, no heads. The reference the ratios divide by.
* lpt engine on torch: `classify_rows` (the server's mixed pass: shared lower layers, prompts inserted at their
  layer, one layer at a time above it, each task's head, softmax) on a backbone loaded with `runtime="torch"`.
* lpt engine on ORT: the same on a backbone loaded with `runtime="onnxruntime"` (one session for the embeddings and
  one per layer, exported once and cached; the export is timed apart and never inside a measurement); with ORT's
  worker threads spin-waiting between runs (its default) and, as a second engine, sleeping instead
  (`session.intra_op.allow_spinning=0`): the mixed pass alternates ORT layers with torch ops, and spinning threads
  compete with everything else on a small machine (`--ort-spinning`).

Tasks: `--tasks` (1, 16, 64) adapters shaped like the trainer's defaults (NPG, prompt layer N//2, 5 prompt tokens,
bottleneck 128, linear head, 2-5 labels), random weights: speed does not depend on what they learned. Each text
gets a task drawn uniformly (seeded), the same draw for both engines. Texts: `--texts` (512) sentences of the MR
dataset when `lpt_serve.training.data.materialize("mr")` has it (cached, or fetched from the package registry),
synthetic sentences of 12-64 tokens otherwise; tokenized once, outside the timing, the same ids for every engine.

A measurement is one pass over all texts in consecutive batches of `--batch-sizes` (32, 64) rows; rows/s = texts /
seconds. Repetitions are interleaved (each repetition measures every engine and setting once, the two lpt
engines in alternating order), and the table gives medians. Each setting also reports how far ORT's class
probabilities lie from torch's on the first batch (max absolute difference).

    python -m bench.runtime            # ~10 min on 2 CPU cores (plus a one-off ONNX export, ~30 s)
    python -m bench.runtime --quick    # smoke run
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    fmt,
    header,
    machine_info,
    markdown_table,
    now_iso,
    ratio,
    save_results,
    start_run,
)

NAME = "runtime"
RAW = "raw transformers"
LPT_TORCH = "lpt engine, torch"
LPT_ORT = "lpt engine, onnxruntime"
LPT_ORT_NO_SPIN = "lpt engine, onnxruntime (no spinning)"
# Common words that are one WordPiece each, for synthetic sentences when the MR data is not at hand.
WORDS = ("the", "a", "film", "movie", "story", "it", "was", "is", "not", "very", "good", "bad", "great", "long",
         "short", "and", "but", "with", "of", "to", "in", "this", "that", "actor", "plot", "music", "scene", "end",
         "time", "people", "best", "worst", "funny", "sad", "love", "make", "made", "see", "seen", "more", "most")


# ------------------------------------------------------------------------------------------------- inputs
def load_texts(count: int, seed: int) -> tuple[list[str], str]:
    """`count` MR sentences (seeded sample of train + test), or synthetic ones when MR cannot be had."""
    try:
        from lpt_serve.training.data import materialize, read_examples

        paths = materialize("mr")
        texts = [t for split in ("train", "dev", "test") if split in paths for t, _ in read_examples(paths[split])]
    except Exception as exc:  # no cache and no registry: any failure means "use synthetic text"
        print(f"[runtime] MR unavailable ({type(exc).__name__}: {exc}); synthetic sentences instead", file=sys.stderr)
        texts = []
    rng = random.Random(seed)
    if len(texts) >= count:
        return rng.sample(texts, count), "mr"
    # [CLS] + words + [SEP]: 12-64 tokens.
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 62))) for _ in range(count)], "synthetic"


def make_tasks(backbone, count: int, seed: int) -> list:
    import torch

    from lpt_serve.model.adapter import AdapterConfig, TaskAdapter

    adapters = []
    for i in range(count):
        config = AdapterConfig(task=f"t{i:02d}", labels=[f"c{j}" for j in range(2 + i % 4)], generator="npg",
                               prompt_layer=backbone.num_layers // 2, prompt_length=5, bottleneck=128, head="linear",
                               pooling="mean", backbone=backbone.fingerprint.as_dict())
        torch.manual_seed(seed + i)
        adapters.append(TaskAdapter(config).eval())
    return adapters


# ------------------------------------------------------------------------------------------------ engines
def batches(count: int, size: int) -> list[range]:
    return [range(i, min(i + size, count)) for i in range(0, count, size)]


def raw_pass(model, padded: Sequence[tuple[Any, Any]]) -> None:
    import torch

    with torch.inference_mode():
        for ids, mask in padded:
            model(input_ids=ids, attention_mask=mask)


def engine_pass(backbone, adapters: Sequence, encoded: Sequence, chunks: Sequence[range]) -> list:
    from lpt_serve.model.engine import classify_rows

    out = []
    for chunk in chunks:
        out.append(classify_rows(backbone, [adapters[i] for i in chunk], [encoded[i] for i in chunk]))
    return out


def timed(run: Callable[[], Any], rows: int) -> float:
    started = time.perf_counter()
    run()
    return rows / (time.perf_counter() - started)


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.runtime", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--texts", type=int, default=512, help="texts per pass")
    p.add_argument("--batch-sizes", default="32,64", help="rows per forward pass, comma-separated")
    p.add_argument("--tasks", default="1,16,64", help="tasks mixed in a pass, comma-separated")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (the table gives medians)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, and ONNX Runtime intra-op threads")
    p.add_argument("--ort-spinning", choices=("on", "off", "both"), default="both",
                   help="ORT worker threads spin-wait between runs (ORT's default), sleep (off), or measure both")
    p.add_argument("--onnx-cache", type=Path, default=None, help="ONNX cache directory (default: the per-user one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-wait", action="store_true", help="do not wait for `lpt train` processes to finish")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 texts, batch 32, one repetition")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/runtime[-quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.batch_sizes, args.reps = min(args.texts, 64), "32", 1
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    args.tasks = [int(t) for t in str(args.tasks).split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wait, monitor = start_run(args)
    import onnxruntime
    import torch
    from transformers import AutoModel

    from lpt_serve.model.backbone import Backbone, default_backbone_path
    from lpt_serve.model.engine import encode_texts, pad_rows

    started = time.perf_counter()
    machine = machine_info()
    machine["onnxruntime"] = onnxruntime.__version__
    on_torch = Backbone.load(device="cpu", dtype="float32", runtime="torch")
    t0 = time.perf_counter()
    on_ort = Backbone.load(device="cpu", dtype="float32", runtime="onnxruntime", onnx_cache_dir=args.onnx_cache,
                           runtime_threads=args.threads)
    ort_build = {"seconds": round(time.perf_counter() - t0, 2), "exported": list(on_ort.runtime.exported),
                 "cache_dir": str(on_ort.runtime.cache_dir), "threads": on_ort.runtime.threads}
    engines: dict[str, Any] = {LPT_TORCH: on_torch}
    if args.ort_spinning in ("on", "both"):
        engines[LPT_ORT] = on_ort
    if args.ort_spinning in ("off", "both"):
        no_spin = Backbone.load(device="cpu", dtype="float32", runtime="torch")
        no_spin.use_runtime("onnxruntime", cache_dir=args.onnx_cache, threads=args.threads, spinning=False)
        engines[LPT_ORT_NO_SPIN] = no_spin
    raw = AutoModel.from_pretrained(default_backbone_path(), add_pooling_layer=False, attn_implementation="sdpa",
                                    dtype=torch.float32, local_files_only=True).eval()

    texts, source = load_texts(args.texts, args.seed)
    encoded = encode_texts(on_torch, texts)
    pad_id = on_torch.tokenizer.pad_token_id or 0
    adapters = make_tasks(on_torch, max(args.tasks), args.seed)
    assignment = {}  # tasks -> each text's adapter, one seeded draw shared by every engine
    for n in args.tasks:
        rng = random.Random(args.seed + n)
        assignment[n] = [adapters[rng.randrange(n)] for _ in texts]
    chunks = {b: batches(len(texts), b) for b in args.batch_sizes}
    padded = {b: [pad_rows([encoded[i].input_ids for i in c], pad_id) for c in chunks[b]] for b in args.batch_sizes}
    tokens = sum(len(e.input_ids) for e in encoded)

    # Agreement, and warm-up: first-touch allocations and ORT's first runs stay out of the timing.
    agreement: dict[str, dict[str, float]] = {}
    for b in args.batch_sizes:
        raw_pass(raw, padded[b][:2])
        for n in args.tasks:
            first = chunks[b][:1]
            probs = {name: engine_pass(bb, assignment[n], encoded, first)[0] for name, bb in engines.items()}
            agreement[f"b{b}-t{n}"] = {
                name: max(float((p - q).abs().max()) for p, q in zip(probs[name], probs[LPT_TORCH], strict=True))
                for name in engines if name != LPT_TORCH}
            for bb in engines.values():
                engine_pass(bb, assignment[n], encoded, chunks[b][:2])

    samples: dict[str, list[float]] = {}
    lpt_names = list(engines)
    for rep in range(args.reps):
        print(f"[runtime] repetition {rep + 1}/{args.reps} ...", file=sys.stderr, flush=True)
        order = lpt_names if rep % 2 == 0 else lpt_names[::-1]
        for b in args.batch_sizes:
            samples.setdefault(f"b{b}|{RAW}", []).append(timed(lambda b=b: raw_pass(raw, padded[b]), len(texts)))
            for n in args.tasks:
                for name in order:
                    run = lambda bb=engines[name], n=n, b=b: engine_pass(bb, assignment[n], encoded, chunks[b])  # noqa: E731
                    samples.setdefault(f"b{b}|t{n}|{name}", []).append(timed(run, len(texts)))

    def median(key: str) -> float:
        return statistics.median(samples[key])

    results: dict[str, Any] = {}
    rows = []
    for b in args.batch_sizes:
        raw_rate = median(f"b{b}|{RAW}")
        results[f"b{b}"] = {"raw": {"rows_per_s": raw_rate, "samples": samples[f"b{b}|{RAW}"]}}
        rows.append([RAW, "-", b, fmt(raw_rate, 1), "1.00", "", ""])
        for n in args.tasks:
            torch_rate = median(f"b{b}|t{n}|{LPT_TORCH}")
            entry = {}
            for name in engines:
                rate = median(f"b{b}|t{n}|{name}")
                entry[name] = {"rows_per_s": rate, "samples": samples[f"b{b}|t{n}|{name}"],
                               "vs_raw": ratio(rate, raw_rate),
                               "vs_lpt_torch": ratio(rate, torch_rate),
                               "max_abs_prob_diff_vs_torch": agreement[f"b{b}-t{n}"].get(name)}
                rows.append([name, n, b, fmt(rate, 1), fmt(ratio(rate, raw_rate), 2),
                             "" if name == LPT_TORCH else fmt(ratio(rate, torch_rate), 2),
                             "" if name == LPT_TORCH else f"{agreement[f'b{b}-t{n}'][name]:.1e}"])
            results[f"b{b}"][f"t{n}"] = entry
    table = markdown_table(["engine", "tasks", "batch", "rows/s", "vs raw transformers", "vs lpt torch",
                            "max |p - p_torch|"], rows)
    ort_note = (f"ONNX export: {len(ort_build['exported'])} graph(s) exported, load took {ort_build['seconds']:.1f} s "
                f"(cache {ort_build['cache_dir']})")
    notes = (f"{len(texts)} {source} texts ({tokens / len(texts):.1f} tokens on average), median of {args.reps} "
             f"interleaved repetitions, fp32, {args.threads} torch threads and {args.threads} ORT intra-op threads, "
             f"onnxruntime {onnxruntime.__version__}. {ort_note}.")
    cpu = monitor.stop()
    print(header("Encoder runtimes: lpt engine on torch and ONNX Runtime vs raw transformers", machine, notes, cpu))
    print()
    print(table)
    payload = {
        "benchmark": NAME, "date": now_iso(), "machine": machine, "quick": args.quick, "wait": wait,
        "cpu_contention": cpu, "settings": {**vars(args), "text_source": source, "mean_tokens": tokens / len(texts)},
        "ort_build": ort_build, "results": results, "tables": {"main": table},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    save_results(NAME, args, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
