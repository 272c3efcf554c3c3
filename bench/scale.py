"""Many tasks on one server: time to ready, resident memory, throughput and latency with traffic spread over
every task (uniform and Zipf-skewed), and the latency of a task's first (cold) request; and, in process, a pass
of 64 rows over 64 distinct tasks against the raw encoder.

    python -m bench.scale            # 100, 1,000 and 10,000 tasks; host budget 500 tasks
    python -m bench.scale --quick    # 100 and 1,000 tasks, short runs

Each store holds copies of the demo `mr` adapter under new names: every task's config is its own small file (it
names the task), its weights a hard link to one file, so 10,000 tasks take little disk. The server is a real
`lpt-serve` subprocess with its default settings (the default backbone and runtime; `--runtime` picks another);
a 3-task store is the baseline for time to ready and RSS. `--cold` (200) tasks picked at random are asked once
each, one at a time, before any traffic (every answer must succeed: the count of failures is in the JSON), then
once more: their first (cold) latency against their second (warm) one is what a cold task adds.

Throughput is compared with the same traffic over `--resident-tasks` (16) tasks, all in memory: that server runs
beside the one under test, idle while the other is measured, and the two take turns pattern by pattern for
`--rounds` rounds (medians), so both see the same machine. Patterns run one after the other, each first warming
the server under test with `--warmup` seconds of its own traffic (not counted; its cold share is in the JSON):
host memory starts empty, and a server runs for hours, so the figure is the steady state, not the minute after a
start or after a different pattern filled host memory with other tasks. Each traffic phase also reads the
server's own metrics (passes, rows and distinct tasks per pass, the share of the phase the inference thread spent
in passes, and the loads: the requests that found their task outside host memory).

The last table runs `bench.generators` in this process: batches of 64 rows, each over 64 distinct tasks (drawn
from a pool of 256 random adapters shaped like `mr`), through the engine and through the raw encoder (transformers'
`AutoModel`) on the same padded rows.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from bench.common import fmt, machine_info, markdown_table, now_iso, ratio, result_path, write_json
from lpt_serve.format import CONFIG_NAME, WEIGHTS_NAME

DEMO = Path(__file__).resolve().parents[1] / "adapters_store" / "mr" / "v1"
TEXTS = ["a gripping, funny film", "dull and far too long", "the cast is wonderful", "I want my money back"]


def build_store(root: Path, tasks: int) -> list[str]:
    """`tasks` copies of the demo adapter, weights hard-linked."""
    config = json.loads((DEMO / CONFIG_NAME).read_text())
    weights = DEMO / WEIGHTS_NAME
    root.mkdir(parents=True)
    (root / ".seeded").write_text("")
    names = [f"task-{i:05d}" for i in range(tasks)]
    for name in names:
        version = root / name / "v1"
        version.mkdir(parents=True)
        (version / CONFIG_NAME).write_text(json.dumps(config | {"task": name}))
        try:
            os.link(weights, version / WEIGHTS_NAME)
        except OSError:  # another file system: copy
            shutil.copyfile(weights, version / WEIGHTS_NAME)
        (root / name / "state.json").write_text('{"current": 1, "history": [1]}')
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, store: Path, host_budget_mb: float, log: Path, runtime: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "lpt_serve.api.main", "--store", str(store), "--port", str(self.port),
                "--log-level", "warning", "--host-budget-mb", str(host_budget_mb),
                "--no-seed-demo-tasks", "--max-queue", "8192"]
        if runtime is not None:
            argv += ["--runtime", runtime]
        self.log = log.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600.0) -> float:
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lpt-serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise TimeoutError("not ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def cold_loads(url: str, picked: list[str]) -> dict[str, Any]:
    """The first request to each task in `picked` (none asked before), one at a time; then a second, warm one."""
    cold: list[float] = []
    warm: list[float] = []
    failed: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for latencies in (cold, warm):
            for name in picked:
                started = time.perf_counter()
                r = await client.post(f"/classify/{name}", json={"text": TEXTS[0]})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failed[str(r.status_code)] = failed.get(str(r.status_code), 0) + 1
    out: dict[str, Any] = {"n": len(picked), "succeeded": len(cold), "failed": failed}
    for name, latencies in (("", cold), ("warm_", warm)):
        out[f"{name}p50_ms"] = (pct(latencies, 0.5) or float("nan")) * 1e3
        out[f"{name}p99_ms"] = (pct(latencies, 0.99) or float("nan")) * 1e3
    out["extra_p99_ms"] = out["p99_ms"] - out["warm_p99_ms"]
    return out


SERVER_SERIES = {"lpt_forward_duration_seconds_sum": "pass_s", "lpt_forward_duration_seconds_count": "passes",
                 "lpt_batch_size_sum": "rows", "lpt_batch_tasks_sum": "task_slots",
                 "lpt_forward_cpu_seconds_total": "pass_cpu_s", "lpt_adapter_loads_total": "loads"}


def server_counters(url: str) -> dict[str, float]:
    """The server's pass counters from /metrics (what the dashboard reads too)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = dict.fromkeys(SERVER_SERIES.values(), 0.0)
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in SERVER_SERIES:
                out[SERVER_SERIES[sample.name]] += sample.value
    return out


async def traffic(url: str, names: list[str], *, skew: float | None, concurrency: int, duration_s: float,
                  seed: int = 0) -> dict[str, Any]:
    """Closed-loop clients for `duration_s`; each request picks a task uniformly or by Zipf(skew) over rank."""
    rng = random.Random(seed)
    # Cumulative weights once: `choices` with plain weights sums all 10,000 of them again for every request, CPU
    # the client would take from the server it measures.
    weights = None if skew is None else list(itertools.accumulate(1.0 / (rank + 1) ** skew
                                                                  for rank in range(len(names))))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    before = await asyncio.to_thread(server_counters, url)
    stop = time.monotonic() + duration_s

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop:
            task = rng.choices(names, cum_weights=weights)[0] if weights else rng.choice(names)
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/classify/{task}", json={"text": rng.choice(TEXTS)}) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError) as exc:  # counted, not fatal: the table shows it
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                await asyncio.sleep(0.05)  # a server that went away must not turn this into a busy loop
                continue
            if status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    # aiohttp, not httpx: ~0.15 ms of CPU per request against ~3 ms at 32 connections, CPU the client would take
    # from the server it measures on the same cores (see lpt_client.loadgen).
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        began = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    after = await asyncio.to_thread(server_counters, url)
    delta = {k: after[k] - before[k] for k in after}
    passes = max(delta["passes"], 1.0)
    return {"skew": skew, "requests": len(latencies), "rps": len(latencies) / elapsed, "errors": errors,
            "p50_ms": (pct(latencies, 0.5) or 0) * 1e3, "p99_ms": (pct(latencies, 0.99) or 0) * 1e3,
            # The requests that found their task outside host memory, as the server counted its loads.
            "cold_share": delta["loads"] / max(1, len(latencies) + sum(errors.values())),
            "passes": delta["passes"], "rows_per_pass": delta["rows"] / passes,
            "tasks_per_pass": delta["task_slots"] / passes, "pass_ms": delta["pass_s"] / passes * 1e3,
            "busy_share": delta["pass_s"] / elapsed, "pass_cpu_share": delta["pass_cpu_s"] / max(delta["pass_s"], 1e-9)}


def start(tasks: int, args: argparse.Namespace, work: Path) -> tuple[Server, list[str], dict[str, Any]]:
    """A server on a new store of `tasks` tasks, ready: with its time to ready (median of `--ready-runs` starts)
    and RSS."""
    store = work / f"store-{tasks}"
    names = build_store(store, tasks)
    # The store at rest, as a server finds it in production: without this the first start would also wait for the
    # disk to write out the thousands of files just made.
    os.sync()
    adapter_mb = (DEMO / WEIGHTS_NAME).stat().st_size / 2**20 * 1.1  # a little over the file: tensors in memory
    starts: list[float] = []
    while True:
        server = Server(store, host_budget_mb=adapter_mb * args.host_tasks, log=work / f"server-{tasks}.log",
                        runtime=args.runtime)
        try:
            starts.append(server.wait_ready())
        except BaseException:
            server.stop()
            raise
        if len(starts) >= args.ready_runs:
            break
        server.stop()
    return server, names, {"tasks": tasks, "ready_s": statistics.median(starts), "ready_runs_s": starts,
                           "ready_rss_mb": rss_mb(server.proc.pid)}


def patterns(args: argparse.Namespace) -> dict[str, float | None]:
    return {"zipf": args.zipf, "uniform": None}


def measure(tasks: int, args: argparse.Namespace, work: Path, resident: tuple[Server, list[str]],
            log) -> dict[str, Any]:
    """Ready time, RSS, cold first requests, then each traffic pattern on this server and on the resident one in
    turns, `args.rounds` times."""
    server, names, result = start(tasks, args, work)
    resident_server, resident_names = resident
    try:
        picked = random.Random(tasks).sample(names, min(args.cold, tasks))
        result["cold"] = asyncio.run(cold_loads(server.url, picked))
        phases: dict[str, list[dict[str, Any]]] = {}
        warmups: dict[str, dict[str, Any]] = {}
        for pattern, skew in patterns(args).items():
            if args.warmup > 0:
                log(f"{tasks} tasks: {args.warmup:.0f} s of {pattern} traffic to warm the many server (not counted)")
                warmups[pattern] = asyncio.run(traffic(server.url, names, skew=skew, concurrency=args.concurrency,
                                                       duration_s=args.warmup, seed=999))
            for rnd in range(args.rounds):
                turns = [("many", server.url, names), ("resident", resident_server.url, resident_names)]
                for who, url, pool in (turns if rnd % 2 == 0 else turns[::-1]):
                    log(f"{tasks} tasks, round {rnd + 1}/{args.rounds}: {pattern} on the {who} server")
                    phases.setdefault(f"{pattern}|{who}", []).append(asyncio.run(traffic(
                        url, pool, skew=skew, concurrency=args.concurrency, duration_s=args.duration,
                        seed=1000 * rnd + (1 if skew else 0))))
        for pattern in patterns(args):
            many, base = phases[f"{pattern}|many"], phases[f"{pattern}|resident"]
            result[pattern] = summarize(many)
            result[pattern]["resident"] = summarize(base)
            result[pattern]["warmup"] = warmups.get(pattern)
            # Each round's two phases ran back to back on the same machine: their ratio cancels what the machine did
            # meanwhile (single phases here vary by +-30% from round to round), so the figure is the median ratio.
            result[pattern]["vs_resident"] = statistics.median(
                ratio(a["rps"], b["rps"]) for a, b in zip(many, base, strict=True))
        result["end_rss_mb"] = rss_mb(server.proc.pid)
        if any(result[pattern]["errors"] for pattern in patterns(args)):
            server.log.flush()  # what the server said about the failed requests, before its store goes away
            result["server_log_tail"] = Path(server.log.name).read_text(errors="replace")[-4000:]
        return result
    finally:
        server.stop()
        shutil.rmtree(work / f"store-{tasks}", ignore_errors=True)


def summarize(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of every figure of a traffic phase, the rounds themselves kept."""
    keys = [k for k, v in phases[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    out: dict[str, Any] = {k: statistics.median(p[k] for p in phases) for k in keys if k != "skew"}
    out["errors"] = {code: sum(p["errors"].get(code, 0) for p in phases)
                     for code in {c for p in phases for c in p["errors"]}}
    out["rounds"] = phases
    return out


def distinct_tasks_pass(args: argparse.Namespace) -> dict[str, Any]:
    """64 rows over 64 distinct tasks per batch, engine vs raw encoder, in this process (`bench.generators`)."""
    from bench.common import set_threads
    from bench.generators import ENGINE, load_raw_encoder, make_pool
    from bench.generators import measure as measure_pass
    from bench.runtime import load_texts
    from lpt_serve.model.backbone import Backbone, quiet_transformers

    quiet_transformers()
    set_threads(args.threads)
    backbone = Backbone.load(device="cpu", dtype="float32", runtime="torch")
    pool = make_pool(backbone, 256, ("npg",), seed=0)
    texts, source = load_texts(64 * args.pass_batches * 2, seed=0)
    out = measure_pass(backbone, load_raw_encoder(), pool, texts, rows=64, tasks=64, batches=args.pass_batches,
                       reps=args.pass_reps, seed=0, clock=args.clock)
    return {"rows": 64, "tasks": 64, "text_source": source, "clock": args.clock, "threads": args.threads,
            "raw_ms": out["raw_ms"], "engine_ms": out[ENGINE]["pass_ms"], "vs_raw": out[ENGINE]["vs_raw"],
            "detail": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 tasks, short runs")
    parser.add_argument("--sizes", type=int, nargs="*", help="task counts (default 100 1000 10000)")
    parser.add_argument("--host-tasks", type=int, default=500, help="host budget, in adapters (default 500)")
    parser.add_argument("--resident-tasks", type=int, default=16, help="tasks of the all-resident baseline server")
    parser.add_argument("--rounds", type=int, default=None, help="turns of each pattern on both servers (medians)")
    parser.add_argument("--ready-runs", type=int, default=3, help="starts per store for the time to ready (median)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=None, help="seconds per traffic phase")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds of each pattern's traffic on the many server before its rounds (default 20)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the skewed traffic")
    parser.add_argument("--cold", type=int, default=200, help="tasks picked at random for a first (cold) request")
    parser.add_argument("--runtime", choices=("auto", "torch", "onnxruntime"), default=None,
                        help="the servers' encoder runtime (default: the server's own default)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the in-process pass (64 tasks)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="clock of the in-process pass: wall, or CPU seconds (a shared machine, --threads 1)")
    parser.add_argument("--pass-batches", type=int, default=4, help="batches of the in-process pass")
    parser.add_argument("--pass-reps", type=int, default=5, help="repetitions of the in-process pass (medians)")
    parser.add_argument("--no-pass", action="store_true", help="skip the in-process 64-task pass")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sizes = args.sizes or ([100, 1000] if args.quick else [100, 1000, 10_000])
    args.duration = args.duration or (3.0 if args.quick else 15.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.warmup = (3.0 if args.quick else 20.0) if args.warmup is None else args.warmup
    if args.quick:
        args.cold, args.pass_reps, args.pass_batches, args.ready_runs = min(args.cold, 10), 1, 2, 1

    def log(line: str) -> None:
        print(f"... {line}", file=sys.stderr, flush=True)

    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="lpt-scale-") as tmp:
        work = Path(tmp)
        log("3 tasks (the baseline of time to ready and RSS)")
        server, _, base = start(3, args, work)
        server.stop()
        log(f"{args.resident_tasks} resident tasks (the baseline of throughput)")
        resident, resident_names, resident_info = start(args.resident_tasks, args, work)
        try:
            for tasks in sizes:
                results.append(measure(tasks, args, work, (resident, resident_names), log))
        finally:
            resident.stop()
    passes = None if args.no_pass else distinct_tasks_pass(args)
    rows = []
    for r in results:
        z, u = r["zipf"], r["uniform"]
        rows.append([r["tasks"], f"{r['ready_s']:.2f} ({r['ready_s'] - base['ready_s']:+.2f})",
                     f"{r['ready_rss_mb']:.0f} ({r['ready_rss_mb'] - base['ready_rss_mb']:+.0f})",
                     f"{r['cold']['p50_ms']:.1f} / {r['cold']['p99_ms']:.1f}",
                     f"{r['cold']['extra_p99_ms']:+.1f}", f"{r['cold']['succeeded']}/{r['cold']['n']}",
                     f"{u['rps']:.0f}: {u['p50_ms']:.0f} / {u['p99_ms']:.0f}", fmt(u["vs_resident"], 2),
                     f"{z['rps']:.0f}: {z['p50_ms']:.0f} / {z['p99_ms']:.0f}", fmt(z["vs_resident"], 2),
                     f"{r['end_rss_mb']:.0f}"])
    print(f"## Scale (host budget {args.host_tasks} tasks, concurrency {args.concurrency}, {args.duration:.0f} s "
          f"per phase, median of {args.rounds} round(s); 3-task store: ready {base['ready_s']:.2f} s, "
          f"{base['ready_rss_mb']:.0f} MiB; resident baseline: {args.resident_tasks} tasks)\n")
    print(markdown_table(["tasks", "ready s (vs 3)", "RSS MiB at ready (vs 3)", "cold p50/p99 ms",
                          "cold p99 - warm p99 ms", "first requests ok",
                          "uniform req/s: p50/p99 ms", "uniform vs resident",
                          f"Zipf {args.zipf} req/s: p50/p99 ms", "Zipf vs resident", "RSS MiB at end"], rows))
    detail = []
    for r in results:
        for pattern in patterns(args):
            for who, figures in (("many", r[pattern]), ("resident", r[pattern]["resident"])):
                detail.append([r["tasks"] if who == "many" else f"{args.resident_tasks} (resident)", pattern,
                               f"{figures['rps']:.0f}", f"{figures['cold_share']:.3f}", f"{figures['passes']:.0f}",
                               f"{figures['rows_per_pass']:.1f}", f"{figures['tasks_per_pass']:.1f}",
                               f"{figures['pass_ms']:.0f}", f"{figures['busy_share']:.2f}",
                               sum(figures["errors"].values())])
    print("\n### Where the time goes (server metrics per phase, medians)\n")
    print(markdown_table(["tasks", "traffic", "req/s", "cold share", "passes", "rows/pass", "tasks/pass",
                          "ms/pass", "inference busy share", "errors"], detail))
    if passes is not None:
        print(f"\n### 64 rows over 64 distinct tasks per pass ({passes['clock']} clock, {passes['threads']} "
              f"thread(s), {passes['text_source']} texts)\n")
        print(markdown_table(["raw encoder ms/batch", "engine ms/batch", "engine vs raw (raw ms / engine ms)"],
                             [[fmt(passes["raw_ms"], 1), fmt(passes["engine_ms"], 1), fmt(passes["vs_raw"], 2)]]))
    path = write_json(result_path("scale", args.quick, args.out), {
        "date": now_iso(), "machine": machine_info(), "settings": vars(args), "baseline": base,
        "resident": resident_info, "results": results, "distinct_tasks_pass": passes,
        "total_seconds": round(time.monotonic() - started, 1)})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
