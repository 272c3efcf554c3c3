"""Many tasks on one server: time to ready, resident memory, throughput and latency with traffic spread over
every task (uniform and Zipf-skewed), and the latency of a task's first (cold) request.

    python -m bench.scale            # 100, 1,000 and 10,000 tasks; host budget 500 tasks
    python -m bench.scale --quick    # 100 and 1,000 tasks, short runs

Each store holds copies of the demo `mr` adapter under new names: every task's config is its own small file (it
names the task), its weights a hard link to one file, so 10,000 tasks take little disk. The server is a real
`lpt-serve` subprocess (`--runtime torch`, the default backbone); a 3-task store is the baseline for time to
ready and RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine_info, markdown_table, now_iso, result_path, write_json
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
    def __init__(self, store: Path, host_budget_mb: float, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "lpt_serve.api.main", "--store", str(store), "--port", str(self.port),
                "--runtime", "torch", "--log-level", "warning", "--host-budget-mb", str(host_budget_mb),
                "--no-seed-demo-tasks", "--max-queue", "8192"]
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


async def cold_loads(url: str, names: list[str], count: int) -> dict[str, Any]:
    """The first request to `count` tasks never asked before, one at a time."""
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for name in names[-count:]:
            started = time.perf_counter()
            r = await client.post(f"/classify/{name}", json={"text": TEXTS[0]})
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)
    return {"n": count, "p50_ms": pct(latencies, 0.5) * 1e3, "p99_ms": pct(latencies, 0.99) * 1e3}


async def traffic(url: str, names: list[str], *, skew: float | None, concurrency: int, duration_s: float,
                  seed: int = 0) -> dict[str, Any]:
    """Closed-loop clients for `duration_s`; each request picks a task uniformly or by Zipf(skew) over rank."""
    rng = random.Random(seed)
    weights = None if skew is None else [1.0 / (rank + 1) ** skew for rank in range(len(names))]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop = time.monotonic() + duration_s

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            task = rng.choices(names, weights)[0] if weights else rng.choice(names)
            started = time.perf_counter()
            r = await client.post(f"/classify/{task}", json={"text": rng.choice(TEXTS)})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        began = time.monotonic()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    return {"skew": skew, "requests": len(latencies), "rps": len(latencies) / elapsed, "errors": errors,
            "p50_ms": (pct(latencies, 0.5) or 0) * 1e3, "p99_ms": (pct(latencies, 0.99) or 0) * 1e3}


def measure(tasks: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    store = work / f"store-{tasks}"
    names = build_store(store, tasks)
    adapter_mb = (DEMO / WEIGHTS_NAME).stat().st_size / 2**20 * 1.1  # a little over the file: tensors in memory
    server = Server(store, host_budget_mb=adapter_mb * args.host_tasks, log=work / f"server-{tasks}.log")
    try:
        ready_s = server.wait_ready()
        ready_rss = rss_mb(server.proc.pid)
        result: dict[str, Any] = {"tasks": tasks, "ready_s": ready_s, "ready_rss_mb": ready_rss}
        if tasks == 3:
            return result
        result["cold"] = asyncio.run(cold_loads(server.url, names, min(args.cold, tasks)))
        result["uniform"] = asyncio.run(traffic(server.url, names, skew=None, concurrency=args.concurrency,
                                                duration_s=args.duration))
        result["zipf"] = asyncio.run(traffic(server.url, names, skew=args.zipf, concurrency=args.concurrency,
                                             duration_s=args.duration, seed=1))
        result["end_rss_mb"] = rss_mb(server.proc.pid)
        return result
    finally:
        server.stop()
        shutil.rmtree(store, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 tasks, short runs")
    parser.add_argument("--sizes", type=int, nargs="*", help="task counts (default 100 1000 10000)")
    parser.add_argument("--host-tasks", type=int, default=500, help="host budget, in adapters (default 500)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=None, help="seconds per traffic pattern")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the skewed traffic")
    parser.add_argument("--cold", type=int, default=50, help="cold first requests timed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sizes = args.sizes or ([100, 1000] if args.quick else [100, 1000, 10_000])
    args.duration = args.duration or (3.0 if args.quick else 20.0)
    if args.quick:
        args.cold = min(args.cold, 10)
    results = []
    with tempfile.TemporaryDirectory(prefix="lpt-scale-") as tmp:
        work = Path(tmp)
        for tasks in [3, *sizes]:
            print(f"... {tasks} tasks", file=sys.stderr, flush=True)
            results.append(measure(tasks, args, work))
    base = results[0]
    rows = []
    for r in results[1:]:
        rows.append([r["tasks"], f"{r['ready_s']:.2f} ({r['ready_s'] - base['ready_s']:+.2f})",
                     f"{r['ready_rss_mb']:.0f} ({r['ready_rss_mb'] - base['ready_rss_mb']:+.0f})",
                     f"{r['cold']['p50_ms']:.1f} / {r['cold']['p99_ms']:.1f}",
                     f"{r['uniform']['rps']:.0f}: {r['uniform']['p50_ms']:.1f} / {r['uniform']['p99_ms']:.1f}",
                     f"{r['zipf']['rps']:.0f}: {r['zipf']['p50_ms']:.1f} / {r['zipf']['p99_ms']:.1f}",
                     f"{r['end_rss_mb']:.0f}"])
    print(f"## Scale (host budget {args.host_tasks} tasks, concurrency {args.concurrency}, {args.duration:.0f} s "
          f"per pattern; 3-task store: ready {base['ready_s']:.2f} s, {base['ready_rss_mb']:.0f} MiB)\n")
    print(markdown_table(["tasks", "ready s (vs 3)", "RSS MiB at ready (vs 3)", "cold p50/p99 ms",
                          "uniform req/s: p50/p99 ms", f"Zipf {args.zipf} req/s: p50/p99 ms", "RSS MiB at end"],
                         rows))
    path = write_json(result_path("scale", args.quick, args.out), {
        "date": now_iso(), "machine": machine_info(), "settings": vars(args), "results": results})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
