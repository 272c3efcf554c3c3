"""Encoder runtimes: the mixed-task engine on torch and on ONNX Runtime, against a raw transformers forward, in
process and over HTTP.

In process, three ways to run the same token ids through the default backbone (all-MiniLM-L6-v2), fp32 on the CPU:

* raw transformers: `AutoModel` (sdpa attention, no pooler), eval, inference mode, on the batches padded to their
  longest row; the encoder alone, no prompts, no heads, torch at `--threads` threads. The reference the ratios
  divide by.
* lpt engine on torch: `classify_rows` (the server's mixed pass: length buckets, shared lower layers, prompts
  inserted at their layer, each task's head, softmax) on a backbone loaded with `runtime="torch"` (padding-free
  layers), run as the server runs it: on the CPU two passes at once, each on `--threads` / 2 torch threads; on an
  accelerator one pass at a time.
* lpt engine on ORT: the same on a backbone loaded with `runtime="onnxruntime"` (one session for the embeddings and
  one per layer, the layers exported unpadded, cached; the export is timed apart and never inside a measurement),
  set up as the server runs it: ORT at `--threads` intra-op threads, its workers sleeping between runs, torch (the
  prompts, heads and glue) at 1 thread. `--ort-spinning on|both` adds ORT with spinning workers.

torch's thread count is process-wide, so it is set before every measurement to what that engine runs with.

Tasks: `--tasks` (1, 16, 64) adapters shaped like the trainer's defaults (NPG, prompt layer N//2, 5 prompt tokens,
bottleneck 128, linear head, 2-5 labels), random weights (speed does not depend on what they learned), committed to
a temporary store and loaded from it as the server does (`bench.serving.make_adapters`, `load_served`). Each text
gets a task drawn uniformly (seeded), the same draw for every engine. Texts: `--texts` (512) sentences of the MR
dataset when `lpt_serve.training.data.materialize("mr")` has it, synthetic sentences of 12-64 tokens otherwise;
tokenized once, outside the timing, the same ids for every engine.

A measurement is one pass over all texts in consecutive batches of `--batch-sizes` (32, 64) rows; rows/s = texts /
seconds; CPU ms/row is this process's CPU time (all its threads, spinning included) per row. `--clock cpu` takes
the seconds of rows/s from the process's CPU time instead of the wall clock: on a machine shared with other work,
where torch's OpenMP threads wait for a descheduled partner at every op and a wall-clock pass can take several
times its own cost, `--threads 1 --clock cpu` measures the work itself (how much each engine computes, and how
efficiently), and the ratios hold; the wall clock at 2 threads measures what a shared machine gives. Repetitions are
interleaved (each repetition measures every engine and setting once), and the tables give medians. A shared
machine's speed drifts by tens of percent within a minute (the same pass, the same CPU time per row, 155 to 220
rows/s a few seconds apart), so the ratios are paired, and finely: within a repetition's (batch size, task count)
cell, the raw forward and the engines take turns on `--slices` (2) runs of consecutive batches (the raw forward
first in each, the engines in alternating order), a measurement being the sum over the slices; an engine's ratio is
the median over repetitions of its rate over the raw forward's in the same cell (beside it, its median rate over
the median of all the batch size's raw samples). Each setting also
reports how far ORT's class probabilities lie from torch's on the first batch (max absolute difference).

Over HTTP (unless `--no-http`): one `lpt-serve` subprocess per runtime (`bench.serving.Server`: the real entry
point, uvicorn, a free local port, `--threads` torch threads, the same store), both started before anything is
timed; then, interleaved, each server under `lpt_client.loadgen.run_load` (`bench.serving.closed_loop`:
`--concurrency` (32) closed-loop clients, one text per request from the same texts, on aiohttp unless `--loadgen`
says otherwise) for `--http-duration` seconds,
with requests spread over the 16 tasks and with every request naming one task. Reported: rows/s, that over the raw
forward at batch `--concurrency` (the most rows a batch of one-text clients can hold), and mixed over one task,
each paired: the raw forward is measured in this process (servers idle) before every HTTP run and after the last,
a run is divided by the geometric mean of the raw rates around it, and mixed by the one-task run of its repetition;
medians over `--http-reps` (5) repetitions.

    python -m bench.runtime            # ~13 min on 2 shared CPU cores (plus a one-off ONNX export, ~10 s)
    python -m bench.runtime --threads 1 --clock cpu --no-http    # the work itself, on a shared machine
    OMP_WAIT_POLICY=PASSIVE python -m bench.runtime    # torch's OpenMP threads sleep instead of spinning

On a shared 2-core VM, torch at 2 threads with libgomp's default spin-wait ran the raw forward 2.3x slower than at
1 thread (its workers spin against other processes at every op); OMP_WAIT_POLICY=PASSIVE (read at process start,
so an environment variable, inherited by the servers) removes that, and is the fairer 2-thread baseline there.
    python -m bench.runtime --quick    # smoke run

In half precision (`--dtype bfloat16`, or float16), on the CPU or an accelerator (`--device cuda`): the same table
for raw transformers and the lpt engine on torch (ONNX Runtime serves fp32 on the CPU: its rows are left out),
plus the raw forward in fp32, measured in the same turns, and a second table of each engine over the raw forward
in fp32 and in its own dtype; the notes give how far the engine's probabilities lie from the same engine in fp32
over every text, and how often the top class differs. On an accelerator the model and every batch are on the
device, each measurement ended by `torch.cuda.synchronize()`, the HTTP server started with the same device and
dtype. CUDA graphs and `torch.compile` are not used by the engine yet; this mode is what would show whether they
help.

    python -m bench.runtime --dtype bfloat16    # a CPU with bf16 matmuls (AMX)
    python -m bench.runtime --device cuda --dtype bfloat16 --threads 4 --batch-sizes 32,64,256
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
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
RAW_PAR = "raw transformers, passes at once"
RAW_FP32 = "raw transformers, float32"
LPT_TORCH = "lpt engine, torch"
LPT_ORT = "lpt engine, onnxruntime"
LPT_ORT_SPIN = "lpt engine, onnxruntime (spinning)"
# The acceptance figures (2 cores, ratios in one run).
TARGET_ORT_VS_RAW = 1.6
TARGET_HTTP_VS_RAW = 1.2
TARGET_MIXED_VS_ONE_TASK = 0.95
HTTP_TASKS = 16
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


# ------------------------------------------------------------------------------------------------ engines
class Engine:
    """A backbone, the torch thread count it runs with (torch's count is process-wide: set before each run), and
    how many passes it runs at once (the server's inference workers)."""

    def __init__(self, name: str, backbone: Any, torch_threads: int, workers: int = 1) -> None:
        self.name, self.backbone, self.torch_threads, self.workers = name, backbone, torch_threads, workers

    def prepare(self) -> None:
        import torch

        torch.set_num_threads(self.torch_threads)


def batches(count: int, size: int) -> list[range]:
    return [range(i, min(i + size, count)) for i in range(0, count, size)]


def raw_pass(model, padded: Sequence[tuple[Any, Any]], workers: int = 1) -> None:
    import torch

    def run(part: Sequence[tuple[Any, Any]]) -> None:
        with torch.inference_mode():
            for ids, mask in part:
                model(input_ids=ids, attention_mask=mask)

    on_threads(run, padded, workers)


def on_threads(run: Callable[[Sequence], Any], items: Sequence, workers: int) -> list:
    """`run` over `items` split round-robin between `workers` threads, as the server's inference workers take
    batches in turn; the results in the items' order (`run` returns one per item, or None)."""
    if workers == 1:
        return [run(items)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, [items[i::workers] for i in range(workers)]))


def engine_pass(backbone, adapters: Sequence, encoded: Sequence, chunks: Sequence[range], workers: int = 1) -> list:
    from lpt_serve.model.engine import classify_rows

    def run(part: Sequence[range]) -> list:
        return [classify_rows(backbone, [adapters[i] for i in chunk], [encoded[i] for i in chunk]) for chunk in part]

    parts = on_threads(run, chunks, workers)
    # Back to the chunks' order: part w holds chunks w, w + workers, ...
    ordered: list = [None] * len(chunks)
    for w, part in enumerate(parts):
        ordered[w::workers] = part
    return ordered


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def synchronize(device: str) -> None:
    """Wait for the accelerator's queued work: a pass on CUDA returns before its kernels have run."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def timed(run: Callable[[], Any], rows: int, clock: str, device: str = "cpu") -> tuple[float, float]:
    """(rows/s by `clock`, CPU ms per row) of one run."""
    return rate_of([elapsed(run, clock, device)], rows)


def elapsed(run: Callable[[], Any], clock: str, device: str = "cpu") -> tuple[float, float]:
    """(seconds by `clock`, CPU seconds of this process) of one run."""
    synchronize(device)
    started, cpu = CLOCKS[clock](), time.process_time()
    run()
    synchronize(device)
    return CLOCKS[clock]() - started, time.process_time() - cpu


def rate_of(parts: Sequence[tuple[float, float]], rows: int) -> tuple[float, float]:
    """(rows/s, CPU ms per row) of runs that together covered `rows` rows."""
    return rows / sum(p[0] for p in parts), sum(p[1] for p in parts) / rows * 1000


def slices(count: int, parts: int) -> list[slice]:
    """`count` batches as up to `parts` runs of consecutive batches, as even as they divide."""
    parts = max(1, min(parts, count))
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return [slice(a, z) for a, z in zip(bounds, bounds[1:], strict=False) if z > a]


# ---------------------------------------------------------------------------------------------------- HTTP
def http_runs(store: Path, tasks: list[str], texts: list[str], args: argparse.Namespace,
              ort_cache: str, raw_rate: Callable[[], float]) -> dict[str, Any]:
    """Each runtime's server under closed-loop load, mixed tasks and one task, interleaved over `--http-reps`.

    `raw_rate()` (the raw forward's rows/s, in this process while the servers idle) is measured before every run and
    after the last: each run records the geometric mean of the two around it as its own reference."""
    from bench.serving import Server, closed_loop, free_port

    if on_accelerator(args):
        runtimes = {"torch": ["--runtime", "torch", "--device", args.device, "--dtype", args.dtype]}
    else:
        runtimes = {"torch": ["--runtime", "torch"],
                    "onnxruntime": ["--runtime", "onnxruntime", "--onnx-cache-dir", ort_cache]}
    servers: dict[str, Server] = {}
    results: dict[str, Any] = {}
    try:
        for runtime, extra in runtimes.items():
            # bench.serving.Server reads these: the server's batching settings and torch threads, and extra flags.
            settings = argparse.Namespace(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                                          server_threads=args.threads, server_args=extra)
            servers[runtime] = Server(store, free_port(), settings)
        for runtime, server in servers.items():
            results[runtime] = {"start_s": server.wait_ready()}
            # Warm the connections, the tokenizer and the allocator before anything is timed.
            closed_loop(server, tasks, texts, args.concurrency, min(2.0, args.http_duration), args.seed + 1,
                        args.loadgen)
        before = raw_rate()
        for rep in range(args.http_reps):
            order = list(servers) if rep % 2 == 0 else list(servers)[::-1]
            for load, load_tasks in (("mixed", tasks), ("one_task", tasks[:1])):
                for runtime in order:
                    print(f"[runtime] HTTP {rep + 1}/{args.http_reps}: {runtime}, {load} ...", file=sys.stderr,
                          flush=True)
                    run = closed_loop(servers[runtime], load_tasks, texts, args.concurrency, args.http_duration,
                                      args.seed + rep, args.loadgen)
                    after = raw_rate()
                    run["raw_rows_per_s_around"] = [before, after]
                    run["raw_rows_per_s"] = math.sqrt(before * after)
                    run["rep"] = rep
                    before = after
                    results[runtime].setdefault(load, []).append(run)
    finally:
        for runtime, server in servers.items():
            results.setdefault(runtime, {})["log_tail"] = server.tail(1500)
            server.stop()
    return results


def _median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run of median throughput; of an even number, the lower middle one."""
    return sorted(runs, key=lambda r: r["throughput"])[(len(runs) - 1) // 2]


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.runtime", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--texts", type=int, default=512, help="texts per pass")
    p.add_argument("--batch-sizes", default="32,64", help="rows per forward pass, comma-separated")
    p.add_argument("--tasks", default="1,16,64", help="tasks mixed in a pass, comma-separated")
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions (the table gives medians)")
    p.add_argument("--slices", type=int, default=2,
                   help="in each repetition and cell, the raw forward and the engines take turns on this many runs "
                        "of consecutive batches (finer pairing on a machine whose speed drifts; each slice ends when "
                        "the engine's last pass does, so many slices leave a core idle at their ends)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (raw, lpt on torch, the servers), and ONNX Runtime intra-op threads")
    p.add_argument("--ort-workers", type=int, default=None,
                   help="passes the ORT engine runs at once, each on --threads / workers ORT threads (default: what "
                        "lpt-serve plans: 2 on 2 or more threads); the raw forward is also run that way, apart")
    p.add_argument("--ort-torch-threads", type=int, default=1,
                   help="torch threads beside ONNX Runtime (the backbone's torch_threads_with_onnxruntime)")
    p.add_argument("--ort-spinning", choices=("on", "off", "both"), default="off",
                   help="ORT worker threads spin-wait between runs (ORT's default), sleep (off, the server's), or both")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="in-process rows/s by the wall clock, or by CPU seconds (a shared machine: with --threads 1)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N: torch rows only, on the accelerator")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the backbone's dtype (raw transformers and the lpt engine alike); not float32: torch only")
    p.add_argument("--onnx-cache", type=Path, default=None, help="ONNX cache directory (default: the per-user one)")
    p.add_argument("--no-http", action="store_true", help="skip the HTTP measurements")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop HTTP clients")
    p.add_argument("--http-duration", type=float, default=15.0, help="seconds per HTTP measurement")
    p.add_argument("--http-reps", type=int, default=5, help="interleaved repetitions of the HTTP measurements")
    p.add_argument("--loadgen", choices=("auto", "aiohttp", "httpx"), default="auto",
                   help="the load generator's HTTP engine (auto: aiohttp when installed, ~0.15 ms CPU per request; "
                        "httpx ~3 ms at 32 connections, CPU taken from the server on the same cores)")
    p.add_argument("--max-batch-size", type=int, default=64, help="server LPT_MAX_BATCH_SIZE")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="server LPT_MAX_WAIT_MS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-wait", action="store_true", help="do not wait for `lpt train` processes to finish")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 texts, batch 32, one repetition, 2 s HTTP")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/runtime[-quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.batch_sizes, args.reps = min(args.texts, 64), "32", 1
        args.http_duration, args.http_reps = min(args.http_duration, 2.0), 1
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    args.tasks = [int(t) for t in str(args.tasks).split(",")]
    return args


def on_accelerator(args: argparse.Namespace) -> bool:
    """Torch rows only (an accelerator, or half precision): ONNX Runtime serves fp32 on the CPU."""
    return args.device != "cpu" or args.dtype != "float32"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wait, monitor = start_run(args)
    import onnxruntime
    import torch
    from transformers import AutoModel

    from bench.serving import load_served, make_adapters
    from lpt_serve.model.backbone import Backbone, default_backbone_path
    from lpt_serve.model.engine import encode_texts, pad_rows

    started = time.perf_counter()
    machine = machine_info()
    machine["onnxruntime"] = onnxruntime.__version__
    device, dtype = args.device, args.dtype
    ort_workers = args.ort_workers or (2 if args.threads >= 2 else 1)
    if device.startswith("cuda"):
        machine["accelerator"] = torch.cuda.get_device_name(device)
    on_torch = Backbone.load(device=device, dtype=dtype, runtime="torch")
    # As `lpt_serve.serving.service.plan_inference`: passes at once on the CPU (fp32 or bf16), one on a GPU.
    torch_workers = 1 if device != "cpu" else ort_workers
    engines: list[Engine] = [Engine(LPT_TORCH, on_torch, max(1, args.threads // torch_workers), torch_workers)]
    on_ort, ort_build = None, {"seconds": 0.0, "exported": [], "cache_dir": "", "threads": 0, "layer_forms": []}
    if not on_accelerator(args):
        t0 = time.perf_counter()
        on_ort = Backbone.load(device="cpu", dtype="float32", runtime="onnxruntime", onnx_cache_dir=args.onnx_cache,
                               runtime_threads=max(1, args.threads // ort_workers),
                               torch_threads_with_onnxruntime=args.ort_torch_threads)
        ort_build = {"seconds": round(time.perf_counter() - t0, 2), "exported": list(on_ort.runtime.exported),
                     "cache_dir": str(on_ort.runtime.cache_dir), "threads": on_ort.runtime.threads,
                     "layer_forms": list(on_ort.runtime.forms)}
    if on_ort is not None and args.ort_spinning in ("off", "both"):
        engines.append(Engine(LPT_ORT, on_ort, args.ort_torch_threads, ort_workers))
    if on_ort is not None and args.ort_spinning in ("on", "both"):
        spinning = Backbone.load(device="cpu", dtype="float32", runtime="torch")
        spinning.use_runtime("onnxruntime", cache_dir=args.onnx_cache, threads=args.threads, spinning=True,
                             torch_threads=args.ort_torch_threads)
        engines.append(Engine(LPT_ORT_SPIN, spinning, args.ort_torch_threads))
    raw_model = AutoModel.from_pretrained(default_backbone_path(), add_pooling_layer=False,
                                          attn_implementation="sdpa", dtype=getattr(torch, dtype),
                                          local_files_only=True).eval().to(device)
    raw = Engine(RAW, raw_model, args.threads)
    # In half precision, the fp32 forward too: what a cheaper datatype buys over the model as usually run.
    raw_fp32 = None
    if dtype != "float32":
        raw_fp32_model = AutoModel.from_pretrained(default_backbone_path(), add_pooling_layer=False,
                                                   attn_implementation="sdpa", dtype=torch.float32,
                                                   local_files_only=True).eval().to(device)
        raw_fp32 = Engine(RAW_FP32, raw_fp32_model, args.threads)
    references = [raw] if raw_fp32 is None else [raw, raw_fp32]  # the forwards every engine is divided by
    # The raw forward the way the ORT engine runs: passes at once, the threads split between them.
    raw_par = Engine(RAW_PAR, raw_model, max(1, args.threads // ort_workers), ort_workers)

    texts, source = load_texts(args.texts, args.seed)
    encoded = encode_texts(on_torch, texts)
    pad_id = on_torch.tokenizer.pad_token_id or 0
    chunks = {b: batches(len(texts), b) for b in args.batch_sizes}
    padded = {b: [pad_rows([encoded[i].input_ids for i in c], pad_id) for c in chunks[b]] for b in args.batch_sizes}
    tokens = sum(len(e.input_ids) for e in encoded)
    computed = {b: sum(ids.numel() for ids, _ in padded[b]) for b in args.batch_sizes}
    # The raw forward's inputs wait on the device, as a server's would after their copy; the engine copies its own.
    padded = {b: [(ids.to(device), mask.to(device)) for ids, mask in padded[b]] for b in args.batch_sizes}

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lpt-bench-runtime-") as tmp:
        store = Path(tmp) / "store"
        names = make_adapters(on_torch, store, max(max(args.tasks), HTTP_TASKS), None, args.seed)
        # Loaded once per backbone: an adapter's verbalizer or dtype may depend on it; here both are the same.
        served = {engine.name: load_served(engine.backbone, store, names) for engine in engines}
        assignment = {}  # tasks -> each text's task, one seeded draw shared by every engine
        for n in args.tasks:
            rng = random.Random(args.seed + n)
            assignment[n] = [names[rng.randrange(n)] for _ in texts]

        def run_engine(engine: Engine, n: int, chunk_list: Sequence[range]) -> list:
            adapters = [served[engine.name][task] for task in assignment[n]]
            return engine_pass(engine.backbone, adapters, encoded, chunk_list, engine.workers)

        # Agreement, and warm-up: first-touch allocations and ORT's first runs stay out of the timing.
        agreement: dict[str, dict[str, float]] = {}
        for b in args.batch_sizes:
            for reference in references:
                reference.prepare()
                raw_pass(reference.backbone, padded[b][:2])
            for n in args.tasks:
                probs = {}
                for engine in engines:
                    engine.prepare()
                    probs[engine.name] = run_engine(engine, n, chunks[b][:1])[0]
                    run_engine(engine, n, chunks[b][:2])
                agreement[f"b{b}-t{n}"] = {
                    name: max(float((p - q).abs().max()) for p, q in zip(got, probs[LPT_TORCH], strict=True))
                    for name, got in probs.items() if name != LPT_TORCH}

        if dtype != "float32":
            # What the cheaper datatype changes: the lpt engine in `dtype` against the same engine in fp32, every
            # text, each task count (max |p - p_fp32| and how often the top class differs).
            reference = Backbone.load(device=device, dtype="float32", runtime="torch")
            served_fp32 = load_served(reference, store, names)
            first = args.batch_sizes[0]
            engines[0].prepare()
            results["agreement_vs_float32"] = {}
            for n in args.tasks:
                got = [p for batch in run_engine(engines[0], n, chunks[first]) for p in batch]
                expected = [p for batch in engine_pass(reference, [served_fp32[t] for t in assignment[n]], encoded,
                                                       chunks[first]) for p in batch]
                pairs = list(zip(got, expected, strict=True))
                results["agreement_vs_float32"][f"t{n}"] = {
                    "max_abs_prob_diff": max(float((p.float() - q).abs().max()) for p, q in pairs),
                    "top_class_agreement": sum(int(p.argmax()) == int(q.argmax()) for p, q in pairs) / len(pairs)}
            del reference, served_fp32

        samples: dict[str, list[tuple[float, float]]] = {}
        slices_used: dict[int, int] = {}
        most_workers = max(e.workers for e in engines)
        for rep in range(args.reps):
            print(f"[runtime] repetition {rep + 1}/{args.reps} ...", file=sys.stderr, flush=True)
            for b in args.batch_sizes:
                for n in args.tasks:
                    # The raw forward and the engines take turns on slices of the batches (the raw forward first
                    # in each, the engines in alternating order), and each cell sums its slices: the machine's
                    # speed drifts by tens of percent within a minute, so an engine is compared with raw passes a
                    # second or two from its own (paired), not with one measured a cell or a minute away.
                    spent: dict[str, list[float]] = {}
                    # At least two batches per pass at once in a slice, or a slice's last batch leaves a core idle.
                    parts = slices(len(chunks[b]), min(args.slices, len(chunks[b]) // (2 * most_workers)))
                    slices_used[b] = len(parts)
                    for s, part in enumerate(parts):
                        for reference in references:
                            reference.prepare()
                            spent.setdefault(reference.name, []).append(elapsed(
                                lambda r=reference, b=b, part=part: raw_pass(r.backbone, padded[b][part]),
                                args.clock, device))
                        for engine in engines if (rep + s) % 2 == 0 else engines[::-1]:
                            engine.prepare()
                            spent.setdefault(engine.name, []).append(
                                elapsed(lambda e=engine, n=n, b=b, part=part: run_engine(e, n, chunks[b][part]),
                                        args.clock, device))
                    for name, runs in spent.items():
                        sample = rate_of(runs, len(texts))
                        samples.setdefault(f"b{b}|t{n}|{name}", []).append(sample)
                        if name in (RAW, RAW_FP32):
                            samples.setdefault(f"b{b}|{name}", []).append(sample)
                # After the cells, not before one: right after passes on two 1-thread workers, the raw forward on 2
                # threads ran ~12% slower than after the engines (measured), which would flatter its cell.
                if on_ort is not None and ort_workers > 1:
                    raw_par.prepare()
                    samples.setdefault(f"b{b}|{RAW_PAR}", []).append(
                        timed(lambda b=b: raw_pass(raw_model, padded[b], ort_workers), len(texts), args.clock,
                              device))

        http = None
        if not args.no_http:
            ort_cache = "" if on_ort is None else str(on_ort.runtime.cache_dir.parent)
            raw_ref = args.concurrency if args.concurrency in args.batch_sizes else args.batch_sizes[0]

            def measure_raw() -> float:
                raw.prepare()
                return timed(lambda: raw_pass(raw_model, padded[raw_ref]), len(texts), "wall", device)[0]

            http = http_runs(store, names[:HTTP_TASKS], texts, args, ort_cache, measure_raw)

    def median(key: str, index: int = 0) -> float:
        return statistics.median(s[index] for s in samples[key])

    def paired(key: str, reference: str) -> float:
        """The median over repetitions of each one's rate over its reference's rate in the same repetition."""
        return statistics.median(s[0] / r[0] for s, r in zip(samples[key], samples[reference], strict=True))

    rows, fp32_rows = [], []
    for b in args.batch_sizes:
        raw_rate = median(f"b{b}|{RAW}")
        results[f"b{b}"] = {"raw": {"rows_per_s": raw_rate, "cpu_ms_per_row": median(f"b{b}|{RAW}", 1),
                                    "samples": samples[f"b{b}|{RAW}"]}}
        rows.append([RAW, "-", b, fmt(raw_rate, 1), "1.00", "1.00", "", fmt(median(f"b{b}|{RAW}", 1), 1), ""])
        if f"b{b}|{RAW_PAR}" in samples:
            par_rate = median(f"b{b}|{RAW_PAR}")
            results[f"b{b}"]["raw_passes_at_once"] = {"rows_per_s": par_rate, "workers": ort_workers,
                                                      "vs_raw": ratio(par_rate, raw_rate),
                                                      "samples": samples[f"b{b}|{RAW_PAR}"]}
            rows.append([f"{RAW_PAR} ({ort_workers})", "-", b, fmt(par_rate, 1), "", fmt(ratio(par_rate, raw_rate), 2),
                         "", fmt(median(f"b{b}|{RAW_PAR}", 1), 1), ""])
        if f"b{b}|{RAW_FP32}" in samples:
            fp32_rate = median(f"b{b}|{RAW_FP32}")
            results[f"b{b}"]["raw_float32"] = {"rows_per_s": fp32_rate, "samples": samples[f"b{b}|{RAW_FP32}"],
                                               "cpu_ms_per_row": median(f"b{b}|{RAW_FP32}", 1)}
            rows.append([RAW_FP32, "-", b, fmt(fp32_rate, 1), "", fmt(ratio(fp32_rate, raw_rate), 2), "",
                         fmt(median(f"b{b}|{RAW_FP32}", 1), 1), ""])
        for n in args.tasks:
            cell_raw = f"b{b}|t{n}|{RAW}"
            entry = {}
            for engine in engines:
                key = f"b{b}|t{n}|{engine.name}"
                rate = median(key)
                diff = agreement[f"b{b}-t{n}"].get(engine.name)
                vs_raw, vs_torch = paired(key, cell_raw), paired(key, f"b{b}|t{n}|{LPT_TORCH}")
                entry[engine.name] = {"rows_per_s": rate, "cpu_ms_per_row": median(key, 1), "samples": samples[key],
                                      "vs_raw": vs_raw, "vs_raw_of_medians": ratio(rate, raw_rate),
                                      "raw_samples": samples[cell_raw], "vs_lpt_torch": vs_torch,
                                      "max_abs_prob_diff_vs_torch": diff}
                if raw_fp32 is not None:
                    entry[engine.name]["vs_raw_float32"] = paired(key, f"b{b}|t{n}|{RAW_FP32}")
                    fp32_rows.append([engine.name, n, b, fmt(rate, 1), fmt(entry[engine.name]["vs_raw_float32"], 2),
                                      fmt(vs_raw, 2)])
                rows.append([engine.name, n, b, fmt(rate, 1), fmt(vs_raw, 2), fmt(ratio(rate, raw_rate), 2),
                             "" if engine.name == LPT_TORCH else fmt(vs_torch, 2),
                             fmt(median(key, 1), 1), "" if diff is None else f"{diff:.1e}"])
            results[f"b{b}"][f"t{n}"] = entry
    table = markdown_table(["engine", "tasks", "batch", "rows/s", "vs raw (paired)", "vs raw (medians)",
                            "vs lpt torch (paired)", "CPU ms/row", "max |p - p_torch|"], rows)
    if fp32_rows:
        table += "\n\n" + markdown_table(["engine", "tasks", "batch", "rows/s", "vs raw float32 (paired)",
                                          f"vs raw {dtype} (paired)"], fp32_rows)

    acceptance = []
    for b in args.batch_sizes:
        got = results[f"b{b}"].get("t16", {}).get(LPT_ORT, {}).get("vs_raw")
        if got is not None:
            acceptance.append([f"in process, 16 tasks on ORT vs raw, batch {b}", fmt(got, 2),
                               f">= {TARGET_ORT_VS_RAW}"])
    http_table = ""
    if http is not None:
        raw_ref = args.concurrency if args.concurrency in args.batch_sizes else args.batch_sizes[0]
        http_rows = []
        results["http"] = {"raw_reference_batch": raw_ref, "runs": http}
        for runtime, runs in http.items():
            if "mixed" not in runs:
                continue
            mixed, single = _median_run(runs["mixed"]), _median_run(runs["one_task"])
            # Paired: each run over the raw forward measured around it; mixed over the one-task run of its repetition.
            summary = {"mixed_rows_per_s": mixed["throughput"], "one_task_rows_per_s": single["throughput"],
                       "mixed_vs_raw": statistics.median(r["throughput"] / r["raw_rows_per_s"] for r in runs["mixed"]),
                       "one_task_vs_raw": statistics.median(
                           r["throughput"] / r["raw_rows_per_s"] for r in runs["one_task"]),
                       "mixed_vs_one_task": statistics.median(
                           m["throughput"] / o["throughput"]
                           for m, o in zip(runs["mixed"], runs["one_task"], strict=True)),
                       "mixed_vs_one_task_of_medians": ratio(mixed["throughput"], single["throughput"])}
            results["http"][runtime] = summary
            for load, run, tasks_n in (("mixed", mixed, HTTP_TASKS), ("one task", single, 1)):
                srv = run["server"]
                errors = sum(run["errors"].values()) if run["errors"] else 0
                http_rows.append([runtime, tasks_n, fmt(run["throughput"], 1), fmt(run["raw_rows_per_s"], 1),
                                  fmt(summary["mixed_vs_raw" if load == "mixed" else "one_task_vs_raw"], 2),
                                  fmt(summary["mixed_vs_one_task"], 2) if load == "mixed" else "",
                                  fmt(run["p50_ms"], 1), fmt(run["p99_ms"], 1), fmt(srv["mean_batch_rows"], 1),
                                  fmt(srv["forward_busy_fraction"], 2), fmt(run["server_cpu_cores"], 2),
                                  fmt(run["client_cpu_cores"], 2), fmt(run["cpu_contention"]["other_cores"], 2),
                                  str(errors)])
            acceptance.append([f"HTTP, 16 tasks on {runtime} vs raw (batch {raw_ref})",
                               fmt(summary["mixed_vs_raw"], 2), f">= {TARGET_HTTP_VS_RAW}"])
            acceptance.append([f"HTTP, 16 tasks vs one task, {runtime}", fmt(summary["mixed_vs_one_task"], 2),
                               f">= {TARGET_MIXED_VS_ONE_TASK}"])
        http_table = markdown_table(
            ["server runtime", "tasks", "rows/s", f"raw b{raw_ref} around it", "vs raw (paired)",
             "mixed / one task (paired)", "p50 ms", "p99 ms", "rows/batch", "forward busy", "server CPU",
             "client CPU", "other CPU", "errors"], http_rows)
    acceptance_table = markdown_table(["acceptance (issue 8)", "measured", "target"], acceptance)

    padding = ", ".join(f"batch {b}: {1 - tokens / computed[b]:.0%}" for b in args.batch_sizes)
    notes = (f"{args.clock} clock in process. {len(texts)} {source} texts ({tokens / len(texts):.1f} tokens on "
             f"average; the raw forward's padded positions: {padding}), median of {args.reps} interleaved "
             "repetitions (paired: each engine over the raw forward measured in turns with it, on "
             f"{'/'.join(str(slices_used.get(b, 1)) for b in args.batch_sizes)} slice(s) of the batches (by batch "
             "size), in the same cell and repetition; medians: median over median), "
             f"{dtype} on {machine.get('accelerator', device)}. "
             f"Threads: raw {args.threads} torch threads; lpt on torch {torch_workers} pass(es) at once, each on "
             f"{max(1, args.threads // torch_workers)} torch thread(s)")
    if on_ort is not None:
        notes += (f"; lpt on ORT {ort_workers} pass(es) at once, each on {max(1, args.threads // ort_workers)} ORT "
                  f"intra-op thread(s) and {args.ort_torch_threads} torch thread(s), as lpt-serve runs it; "
                  f"onnxruntime {onnxruntime.__version__}. ONNX export: {len(ort_build['exported'])} graph(s) "
                  f"exported, load {ort_build['seconds']:.1f} s, layers "
                  f"{'/'.join(sorted(set(ort_build['layer_forms'])))} (cache {ort_build['cache_dir']})")
    notes += "."
    if "agreement_vs_float32" in results:
        worst = max(a["max_abs_prob_diff"] for a in results["agreement_vs_float32"].values())
        agree = min(a["top_class_agreement"] for a in results["agreement_vs_float32"].values())
        notes += (f" The lpt engine in {dtype} against the same engine in float32, every text (random adapters): "
                  f"max |p - p_fp32| {worst:.1e}, the same top class for {agree:.1%} of the rows (worst task count).")
    if http is not None:
        notes += (f" HTTP: {args.concurrency} closed-loop clients ({args.loadgen} load generator engine), one text "
                  "per request from the same texts, "
                  f"{args.http_duration:.0f} s per measurement, {args.http_reps} interleaved repetitions; rows/s "
                  "from the run of median throughput, ratios the median over repetitions of each run over the raw "
                  "forward measured around it (in this process, servers idle); the servers and the load generator "
                  "share this machine's cores.")
    cpu = monitor.stop()
    title = ("Encoder runtimes: lpt engine on torch and ONNX Runtime vs raw transformers" if on_ort is not None
             else f"lpt engine on torch vs raw transformers, {dtype} on {machine.get('accelerator', device)}")
    print(header(title, machine, notes, cpu))
    for part in (table, http_table, acceptance_table):
        if part:
            print()
            print(part)
    payload = {
        "benchmark": NAME, "date": now_iso(), "machine": machine, "quick": args.quick, "wait": wait,
        "cpu_contention": cpu, "settings": {**vars(args), "text_source": source, "mean_tokens": tokens / len(texts),
                                            "slices_used": slices_used},
        "ort_build": ort_build, "results": results,
        "tables": {"main": table, "http": http_table, "acceptance": acceptance_table},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    save_results(NAME, args, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
