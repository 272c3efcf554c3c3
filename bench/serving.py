"""Serving overhead: the HTTP server's throughput against the bare mixed-task forward it wraps.

Setup: `--tasks` (16) adapters in a temporary store, all on the real backbone (fingerprints match), shaped like
the trainer's defaults (NPG, prompt layer 3, 5 prompt tokens, bottleneck 128, linear head, 2-5 labels) with
random weights: throughput does not depend on what the weights learned. `--adapter-dir` copies one trained
adapter under every name instead. Texts: the MR test split (400 short movie-review sentences), one text per
request, picked at random.

The server is the real thing: `lpt_serve.api.main.main` (the `lpt-serve` entry point: `Backbone.load`, `create_app`,
uvicorn) in a subprocess, on a free local port, log level warning (no access log), with the settings below.
A subprocess and not a thread, so that the load generator (asyncio + httpx, in this process) and the server do
not share one GIL; they still share the CPU cores, which on a 2-core box is the largest cost (see the CPU
columns: CPU seconds each process used per second of wall time).

* (a) in-process forward: `classify_rows` on pre-tokenized batches of `--batch-rows` (32 = the concurrency, the
  most rows the server can ever batch from 32 one-text clients) with tasks drawn uniformly from the 16;
  (a1) the same with one task. Rows/s. No HTTP, no tokenization, no batcher. The server's batches come out
  smaller than 32 (while one pass runs, the clients it answered send the next rows, which form the next batch),
  so after (b) and (c), (a*) and (a1*) repeat (a) and (a1) at the mean batch size the server actually formed
  (read from its /metrics): the like-for-like reference for (b)/(a*).
* (b) HTTP at saturation: `lpt_client.loadgen.run_load`, closed loop, 32 concurrent clients, each request one text
  for a task drawn uniformly from the 16. (c) the same with every request naming one task.
* (d) latency under load: an open-loop Poisson arrival process at `--latency-load` (0.5) x the rate measured in
  (b), tasks uniform over the 16. Open loop because a closed loop slows its own arrivals down when the server
  slows (coordinated omission) and so under-reports tail latency. Latency is measured from each request's
  scheduled arrival time, so client-side scheduling lag counts against the server, not for it.

Server-side figures (mean rows per forward pass, the fraction of wall time the inference thread spent in
forward passes) come from the server's own /metrics, read before and after each run.

    python -m bench.serving            # ~2.5 min
    python -m bench.serving --quick    # smoke run, ~30 s
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    CpuMonitor,
    fmt,
    header,
    machine_info,
    markdown_table,
    now_iso,
    proc_cpu_seconds,
    ratio,
    save_results,
    set_threads,
    start_run,
)

NAME = "serving"
TARGET_HTTP_VS_FORWARD = 0.85
TARGET_MIXED_VS_SINGLE = 0.95


# ---------------------------------------------------------------------------------------------- adapters
def make_adapters(backbone, store_root: Path, n_tasks: int, adapter_dir: Path | None, seed: int) -> list[str]:
    """Commit `n_tasks` adapters (t00, t01, ...) into a fresh store; random weights unless `adapter_dir` is given."""
    import torch

    from lpt_serve.model.adapter import AdapterConfig, TaskAdapter
    from lpt_serve.serving.store import AdapterStore

    store = AdapterStore(store_root)
    names = [f"t{i:02d}" for i in range(n_tasks)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            if adapter_dir is not None:
                src = adapter_dir
            else:
                labels = [f"c{j}" for j in range(2 + i % 4)]
                config = AdapterConfig(task=name, labels=labels, generator="npg", prompt_layer=backbone.num_layers // 2,
                                       prompt_length=5, bottleneck=128, head="linear", pooling="mean",
                                       backbone=backbone.fingerprint.as_dict())
                torch.manual_seed(seed + i)
                src = TaskAdapter(config).eval().save(Path(tmp) / name)
            store.commit_dir(name, src)
    return names


def load_served(backbone, store_root: Path, names: Sequence[str]) -> dict[str, Any]:
    """The adapters as the server's registry prepares them (loaded from the store, backbone dtype, eval)."""
    from lpt_serve.model.adapter import load_adapter
    from lpt_serve.serving.store import AdapterStore

    store = AdapterStore(store_root)
    return {n: load_adapter(store.get(n).path(), backbone).to(backbone.device, backbone.dtype).eval() for n in names}


# ------------------------------------------------------------------------------------------- (a) forward
def forward_throughput(backbone, adapters: dict, tasks: Sequence[str], texts: Sequence[str], batch_rows: int,
                       duration_s: float, seed: int) -> dict[str, Any]:
    from lpt_serve.model.engine import classify_rows, encode_texts

    rng = random.Random(seed)
    pool = [(rng.choice(texts), rng.choice(tasks)) for _ in range(batch_rows * 64)]
    t0 = time.perf_counter()
    encoded = encode_texts(backbone, [t for t, _ in pool], None, None)
    tokenize_s_per_row = (time.perf_counter() - t0) / len(pool)
    batches = []
    for i in range(0, len(pool), batch_rows):
        chunk = list(range(i, i + batch_rows))
        batches.append(([adapters[pool[j][1]] for j in chunk], [encoded[j] for j in chunk]))
    classify_rows(backbone, *batches[0])  # warm-up
    monitor = CpuMonitor()
    rows, n_batches, i = 0, 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration_s:
        adapters_b, encoded_b = batches[i % len(batches)]
        classify_rows(backbone, adapters_b, encoded_b)
        rows += len(encoded_b)
        n_batches += 1
        i += 1
    elapsed = time.perf_counter() - start
    return {"rows": rows, "batches": n_batches, "seconds": elapsed, "rows_per_s": rows / elapsed,
            "batch_ms": elapsed / n_batches * 1000, "batch_rows": batch_rows, "tasks": len(set(tasks)),
            "tokenize_ms_per_row": tokenize_s_per_row * 1000, "cpu_contention": monitor.stop()}


# --------------------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_worker(argv: Sequence[str], threads: int) -> None:
    """Runs in the server subprocess: pin torch's threads, then the real `lpt-serve` entry point."""
    set_threads(threads)
    from lpt_serve.api.main import main as serve_main

    serve_main(list(argv))


class Server:
    def __init__(self, store: Path, port: int, args: argparse.Namespace) -> None:
        self.url = f"http://127.0.0.1:{port}"
        serve_args = ["--store", str(store), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                      "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
                      *getattr(args, "server_args", ())]
        # As a module from the repository root, so that `bench` imports whatever the working directory is.
        self.argv = [sys.executable, "-m", "bench.serving", "--serve", "--server-threads", str(args.server_threads),
                     "--", *serve_args]
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        import httpx

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server was not ready within {timeout_s:.0f}s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        self.log.seek(0)
        return self.log.read()[-chars:]

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def metrics(self) -> dict[str, float]:
        """The sums and counts the tables need, from the server's Prometheus text."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in ("lpt_batch_size_sum", "lpt_batch_size_count", "lpt_forward_duration_seconds_sum",
                                   "lpt_batch_tasks_sum", "lpt_forward_cpu_seconds_total"):
                    out[sample.name] = out.get(sample.name, 0.0) + sample.value
                elif sample.name == "lpt_queue_duration_seconds_sum":
                    out["queue_sum"] = out.get("queue_sum", 0.0) + sample.value
                elif sample.name == "lpt_queue_duration_seconds_count":
                    out["queue_count"] = out.get("queue_count", 0.0) + sample.value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _server_delta(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, Any]:
    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    batches = d("lpt_batch_size_count")
    return {
        "batches": batches,
        "mean_batch_rows": d("lpt_batch_size_sum") / batches if batches else None,
        "mean_batch_tasks": d("lpt_batch_tasks_sum") / batches if batches else None,
        "forward_busy_fraction": d("lpt_forward_duration_seconds_sum") / wall_s if wall_s else None,
        "forward_ms_per_batch": d("lpt_forward_duration_seconds_sum") / batches * 1000 if batches else None,
        "forward_cpu_s": d("lpt_forward_cpu_seconds_total"),
        "mean_queue_ms": d("queue_sum") / d("queue_count") * 1000 if d("queue_count") else None,
    }


def measured(server: Server, run) -> dict[str, Any]:
    """Run a load coroutine factory, with server metrics and both processes' CPU time around it."""
    before = server.metrics()
    monitor = CpuMonitor()
    cpu_server0, cpu_client0, t0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
    report = asyncio.run(run())
    wall = time.perf_counter() - t0
    cpu_server, cpu_client = server.cpu_seconds() - cpu_server0, time.process_time() - cpu_client0
    cpu = monitor.stop()  # the server is not reaped yet, so its CPU counts as "other" there: take it out
    cpu["other_cores"] = round(max(0.0, cpu["other_cores"] - cpu_server / wall), 3)
    out = report if isinstance(report, dict) else report.as_dict()
    out |= {"server": _server_delta(before, server.metrics(), wall), "server_cpu_cores": cpu_server / wall,
            "client_cpu_cores": cpu_client / wall, "wall_s": wall, "cpu_contention": cpu}
    return out


# ----------------------------------------------------------------------------------------------- (b)-(d)
def closed_loop(server: Server, tasks: list[str], texts: list[str], concurrency: int, duration_s: float,
                seed: int, engine: str = "auto") -> dict[str, Any]:
    """`lpt_client.loadgen.run_load` on its cheapest HTTP engine unless `engine` says otherwise."""
    from lpt_client.loadgen import run_load

    return measured(server, lambda: run_load(server.url, tasks, texts, concurrency, duration_s=duration_s, seed=seed,
                                             engine=engine))


async def _open_loop(url: str, tasks: list[str], texts: list[str], rate: float, duration_s: float,
                     seed: int) -> dict[str, Any]:
    import httpx

    from lpt_client.client import AsyncLptClient, LptError
    from lpt_client.loadgen import percentile

    rng = random.Random(seed)
    from_schedule: list[float] = []
    from_send: list[float] = []
    errors: dict[str, int] = {}
    lags: list[float] = []
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)

    async def one(client: AsyncLptClient, task: str, text: str, scheduled: float) -> None:
        sent = time.perf_counter()
        try:
            await client.classify(task, text)
        except LptError as exc:
            key = str(getattr(exc, "status", type(exc).__name__))
            errors[key] = errors.get(key, 0) + 1
            return
        done = time.perf_counter()
        from_schedule.append((done - scheduled) * 1000)
        from_send.append((done - sent) * 1000)

    async with AsyncLptClient(url, timeout=30.0, max_retries=0,
                              transport=httpx.AsyncHTTPTransport(limits=limits)) as client:
        pending: set[asyncio.Task] = set()
        start = time.perf_counter()
        at = 0.0
        while True:
            at += rng.expovariate(rate)
            if at >= duration_s:
                break
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, time.perf_counter() - (start + at)) * 1000)
            job = asyncio.create_task(one(client, rng.choice(tasks), rng.choice(texts), start + at))
            pending.add(job)
            job.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        elapsed = time.perf_counter() - start
    from_schedule.sort()
    from_send.sort()
    lags.sort()
    n = len(from_schedule) + sum(errors.values())
    return {
        "target_rate": rate, "requests": n, "ok": len(from_schedule), "errors": errors, "duration_s": elapsed,
        "throughput": n / elapsed,
        "p50_ms": percentile(from_schedule, 50), "p95_ms": percentile(from_schedule, 95),
        "p99_ms": percentile(from_schedule, 99), "max_ms": from_schedule[-1] if from_schedule else None,
        "p50_from_send_ms": percentile(from_send, 50), "p99_from_send_ms": percentile(from_send, 99),
        "schedule_lag_p99_ms": percentile(lags, 99),
    }


def open_loop(server: Server, tasks: list[str], texts: list[str], rate: float, duration_s: float,
              seed: int) -> dict[str, Any]:
    return measured(server, lambda: _open_loop(server.url, tasks, texts, rate, duration_s, seed))


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", type=int, default=16, help="tasks served (and mixed in (a) and (b))")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients in (b) and (c)")
    p.add_argument("--batch-rows", type=int, default=None, help="rows per batch in (a) (default: concurrency)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per measurement")
    p.add_argument("--latency-load", type=float, default=0.5, help="(d) arrival rate as a fraction of (b)'s rate")
    p.add_argument("--max-batch-size", type=int, default=64, help="server LPT_MAX_BATCH_SIZE")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="server LPT_MAX_WAIT_MS")
    p.add_argument("--threads", type=int, default=2, help="torch threads in this process (the in-process forward)")
    p.add_argument("--server-threads", type=int, default=2, help="torch threads in the server process")
    p.add_argument("--adapter-dir", type=Path, default=None, help="copy this trained adapter under every task name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-wait", action="store_true", help="do not wait for `lpt train` processes to finish")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per measurement")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/serving[-quick].json)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("serve_args", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 2.0)
    args.batch_rows = args.batch_rows or args.concurrency
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve_worker(args.serve_args, args.server_threads)
        return 0
    wait, monitor = start_run(args)
    from lpt_serve.model.backbone import Backbone
    from lpt_serve.training.data import materialize, read_examples

    started = time.perf_counter()
    machine = machine_info()
    backbone = Backbone.load()
    texts = [t for t, _ in read_examples(materialize("mr")["test"])]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lpt-bench-store-") as tmp:
        store = Path(tmp)
        tasks = make_adapters(backbone, store, args.tasks, args.adapter_dir, args.seed)
        adapters = load_served(backbone, store, tasks)

        def forward(task_names: Sequence[str], rows: int) -> dict[str, Any]:
            return forward_throughput(backbone, adapters, task_names, texts, rows, args.duration, args.seed)

        print(f"[serving] (a) in-process forward, {args.batch_rows}-row batches ...", file=sys.stderr, flush=True)
        results["a_forward_mixed"] = forward(tasks, args.batch_rows)
        results["a1_forward_single"] = forward(tasks[:1], args.batch_rows)
        server = Server(store, free_port(), args)
        try:
            results["server_start_s"] = server.wait_ready()
            # Warm the connections, the tokenizer threads and the allocator before anything is timed.
            closed_loop(server, tasks, texts, args.concurrency, min(2.0, args.duration), args.seed + 1)
            print("[serving] (b) HTTP, mixed tasks ...", file=sys.stderr, flush=True)
            results["b_http_mixed"] = closed_loop(server, tasks, texts, args.concurrency, args.duration, args.seed)
            print("[serving] (c) HTTP, one task ...", file=sys.stderr, flush=True)
            results["c_http_single"] = closed_loop(server, tasks[:1], texts, args.concurrency, args.duration, args.seed)
            rate = args.latency_load * results["b_http_mixed"]["throughput"]
            print(f"[serving] (d) open loop at {rate:.1f} req/s ...", file=sys.stderr, flush=True)
            results["d_open_loop"] = open_loop(server, tasks, texts, rate, args.duration, args.seed)
        finally:
            server.stop()
        # The server's batches are smaller than `concurrency` (while one pass runs, the next gathers), so the
        # like-for-like reference is the bare forward on batches of the size the server actually formed.
        served_rows = {key: max(1, round(results[key]["server"]["mean_batch_rows"] or args.batch_rows))
                       for key in ("b_http_mixed", "c_http_single")}
        print(f"[serving] (a*) in-process forward at the server's batch sizes {served_rows} ...", file=sys.stderr,
              flush=True)
        results["a_star_forward_mixed"] = forward(tasks, served_rows["b_http_mixed"])
        results["a1_star_forward_single"] = forward(tasks[:1], served_rows["c_http_single"])

    a, a1 = results["a_forward_mixed"], results["a1_forward_single"]
    a_s, a1_s = results["a_star_forward_mixed"], results["a1_star_forward_single"]
    b, c, d = results["b_http_mixed"], results["c_http_single"], results["d_open_loop"]

    def srv(r: dict, key: str, digits: int = 1) -> str:
        return fmt(r["server"][key], digits)

    rows = []
    for label, r, n_tasks in (("(a) in-process classify_rows", a, len(tasks)),
                              ("(a1) in-process classify_rows", a1, 1),
                              ("(a*) in-process, server's batch size", a_s, len(tasks)),
                              ("(a1*) in-process, server's batch size", a1_s, 1)):
        rows.append([label, n_tasks, f"{r['batch_rows']}-row batches", fmt(r["rows_per_s"], 1), "", "",
                     fmt(r["batch_ms"], 1), str(r["batch_rows"]), "", "", fmt(r["cpu_contention"]["other_cores"], 2),
                     ""])
    for label, r, n_tasks, load in (("(b) HTTP closed loop", b, len(tasks), f"{args.concurrency} clients"),
                                    ("(c) HTTP closed loop", c, 1, f"{args.concurrency} clients"),
                                    ("(d) HTTP open loop", d, len(tasks), f"Poisson {d['target_rate']:.1f}/s")):
        errs = sum(r["errors"].values()) if r["errors"] else 0
        rows.append([label, n_tasks, load, fmt(r["throughput"], 1), fmt(r["p50_ms"], 1), fmt(r["p99_ms"], 1),
                     srv(r, "forward_ms_per_batch"), srv(r, "mean_batch_rows"),
                     fmt(r["server_cpu_cores"], 2), fmt(r["client_cpu_cores"], 2),
                     fmt(r["cpu_contention"]["other_cores"], 2), str(errs)])
    table = markdown_table(["measurement", "tasks", "load", "rows/s", "p50 ms", "p99 ms", "forward ms/batch",
                            "rows/batch", "server CPU", "client CPU", "other CPU", "errors"], rows)
    ratios = {
        "b_over_a_star": ratio(b["throughput"], a_s["rows_per_s"]),
        "b_over_a": ratio(b["throughput"], a["rows_per_s"]),
        "b_over_c": ratio(b["throughput"], c["throughput"]),
        "c_over_a1_star": ratio(c["throughput"], a1_s["rows_per_s"]),
        "a_over_a1": ratio(a["rows_per_s"], a1["rows_per_s"]),
        "a_star_over_a1_star": ratio(a_s["rows_per_s"], a1_s["rows_per_s"]),
    }
    ratio_table = markdown_table(["ratio", "value", "target"], [
        ["(b)/(a*) HTTP mixed vs in-process mixed, same batch size", fmt(ratios["b_over_a_star"], 3),
         f">= {TARGET_HTTP_VS_FORWARD}"],
        [f"(b)/(a) HTTP mixed vs in-process mixed, {args.batch_rows}-row batches", fmt(ratios["b_over_a"], 3),
         f">= {TARGET_HTTP_VS_FORWARD}"],
        ["(b)/(c) HTTP mixed vs HTTP one task", fmt(ratios["b_over_c"], 3), f">= {TARGET_MIXED_VS_SINGLE}"],
        ["(c)/(a1*) HTTP one task vs in-process one task, same batch size", fmt(ratios["c_over_a1_star"], 3), ""],
        ["(a)/(a1) in-process mixed vs one task", fmt(ratios["a_over_a1"], 3), ""],
        ["(a*)/(a1*) in-process mixed vs one task, server's batch sizes", fmt(ratios["a_star_over_a1_star"], 3), ""],
    ])
    notes = (f"{len(tasks)} tasks, MR test texts (1 per request), server max_batch_size {args.max_batch_size}, "
             f"max_wait_ms {args.max_wait_ms}, {args.server_threads} torch threads in the server, "
             f"{args.duration:.0f} s per measurement. The load generator and the server share this machine's "
             f"{machine['cpu_count']} cores: 'server CPU' / 'client CPU' are CPU-seconds per wall second "
             "of each process, 'other CPU' that of every other process (contention check). "
             "(d) latency counts from each request's scheduled Poisson arrival.")
    cpu = monitor.stop()
    print(header("Serving overhead: HTTP server vs bare mixed-task forward", machine, notes, cpu))
    print()
    print(table)
    print()
    print(ratio_table)
    srv_b = b["server"]
    diagnosis = (
        f"(b): the server's inference thread was busy {srv_b['forward_busy_fraction']:.0%} of the time; a pass "
        f"of ~{a_s['batch_rows']} rows took {srv_b['forward_ms_per_batch']:.0f} ms there vs {a_s['batch_ms']:.0f} "
        f"ms in-process ({ratio(srv_b['forward_ms_per_batch'], a_s['batch_ms']):.2f}x), while the server used "
        f"{b['server_cpu_cores']:.2f} and the load generator {b['client_cpu_cores']:.2f} of the "
        f"{machine['cpu_count']} cores.")
    print()
    print(diagnosis)
    payload = {
        "benchmark": NAME, "date": now_iso(), "machine": machine, "quick": args.quick,
        "wait": wait, "cpu_contention": cpu,
        "settings": {k: v for k, v in vars(args).items() if k not in ("serve", "serve_args")},
        "targets": {"b_over_a_star": TARGET_HTTP_VS_FORWARD, "b_over_a": TARGET_HTTP_VS_FORWARD,
                    "b_over_c": TARGET_MIXED_VS_SINGLE},
        "results": results, "ratios": ratios, "tables": {"main": table, "ratios": ratio_table},
        "diagnosis": diagnosis,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    save_results(NAME, args, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
