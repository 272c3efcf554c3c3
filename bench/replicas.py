"""Replicas: throughput per replica through Ray Serve's proxy at 1, 2 and 4 replicas, and how long an upload takes
to reach every replica.

These 2 cores cannot run 4 real encoders side by side, so each replica simulates an accelerator: the encoder is
the tiny random one of the unit tests and every forward pass also sleeps `--pass-ms` (100 ms), freeing the cores
as a pass on a GPU would (`LPT_SIMULATED_PASS_MS`). A replica can then answer at most `max_batch_size` (64) rows
per pass, and what the benchmark measures is what routing and convergence cost: N replicas should give N times the
rows/s of one. Requests carry `--texts` (16) texts of one task (tasks drawn from 16), from `--clients-per-replica`
(8) closed-loop clients per replica, enough to fill every pass.

Convergence: with traffic running, one upload goes through the proxy; rounds of concurrent requests then ask for
that task until, in one round, every replica has answered and all with the new version. The time from the
upload's answer to that round is the convergence time (each replica polls the store every 0.5 s).

    python -m bench.replicas                # ~4 min
    python -m bench.replicas --quick        # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import fmt, header, machine_info, markdown_table, now_iso, ratio, save_results, start_run
from bench.http_path import TEXTS, make_store

NAME = "replicas"
TARGET_PER_REPLICA = 0.9
ADMIN_TOKEN = "bench-admin-token"


async def closed_loop(url: str, tasks: list[str], clients: int, texts: int, duration_s: float,
                      seed: int) -> dict[str, Any]:
    import httpx

    from lpt_serve.api.ray_serve import REPLICA_HEADER

    rng = random.Random(seed)
    rows, errors = 0, Counter()
    replicas: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        deadline = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal rows
            while time.perf_counter() < deadline:
                body = {"texts": [rng.choice(TEXTS) for _ in range(texts)]}
                r = await client.post(f"/classify/{rng.choice(tasks)}", json=body)
                if r.status_code != 200:
                    errors[str(r.status_code)] += 1
                    continue
                rows += texts
                replicas[r.headers.get(REPLICA_HEADER, "?")] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {"rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed, "errors": dict(errors),
            "requests_by_replica": dict(replicas)}


async def convergence(url: str, task: str, files: tuple[bytes, bytes], replicas: int, tasks: list[str],
                      clients: int, texts: int) -> dict[str, Any]:
    """Seconds from an upload's answer until a round in which every replica answered with the new version."""
    import httpx

    from lpt_serve.api.ray_serve import REPLICA_HEADER

    failures = 0
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def traffic() -> None:
            nonlocal failures
            rng = random.Random(1)
            while not stop.is_set():
                body = {"texts": [rng.choice(TEXTS) for _ in range(texts)]}
                r = await client.post(f"/classify/{rng.choice(tasks)}", json=body)
                failures += r.status_code != 200

        background = [asyncio.create_task(traffic()) for _ in range(clients)]
        await asyncio.sleep(1.0)
        config, weights = files
        r = await client.put(f"/admin/tasks/{task}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                             files={"config": ("adapter_config.json", config),
                                    "weights": ("adapter_model.safetensors", weights)})
        uploaded = time.monotonic()
        r.raise_for_status()
        new = r.json()["version"]
        converged = None
        while time.monotonic() - uploaded < 15:
            batch = await asyncio.gather(*(client.post(f"/classify/{task}", json={"text": "good"})
                                           for _ in range(4 * replicas)))
            seen: dict[str, set[int]] = {}
            for response in batch:
                failures += response.status_code != 200
                if response.status_code == 200:
                    seen.setdefault(response.headers.get(REPLICA_HEADER, "?"), set()).add(response.json()["version"])
            if len(seen) == replicas and all(v == {new} for v in seen.values()):
                converged = time.monotonic() - uploaded
                break
        stop.set()
        await asyncio.gather(*background)
    return {"seconds": converged, "version": new, "failed_requests": failures}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--replicas", default="1,2,4", help="replica counts, comma-separated")
    p.add_argument("--pass-ms", type=float, default=100.0, help="the simulated accelerator's time per pass")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--texts", type=int, default=16, help="texts per request")
    p.add_argument("--clients-per-replica", type=int, default=8)
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of traffic per replica count")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-wait", action="store_true", help="do not wait for `lpt train` processes to finish")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 2 replicas, 5 s each")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.replicas, args.duration = "1,2", min(args.duration, 5.0)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wait, monitor = start_run(args)
    import ray
    from ray import serve

    from lpt_serve.api import ray_serve
    from lpt_serve.model.backbone import Backbone
    from tests.helpers import adapter_files, free_port, make_adapter

    started = time.perf_counter()
    machine = machine_info()
    counts = [int(n) for n in args.replicas.split(",")]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lpt-bench-replicas-") as tmp:
        folder, tasks = make_store(Path(tmp), args.tasks)
        backbone = Backbone.load(folder, device="cpu", dtype="float32")
        os.environ["LPT_STORE"] = str(Path(tmp) / "store")
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        port = free_port()
        ray.init(num_cpus=max(counts) + 2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}"
            args_for_replicas = ray_serve.check_args({
                "backbone": str(folder), "admin_token": ADMIN_TOKEN, "seed_demo_tasks": False, "log_level": "warning",
                "simulated_pass_ms": args.pass_ms, "max_batch_size": args.max_batch_size, "max_wait_ms": 5})
            for n in counts:
                print(f"[replicas] {n} replica(s) ...", file=sys.stderr, flush=True)
                app = ray_serve.LptServe.options(num_replicas=n, ray_actor_options={"num_cpus": 1})
                serve.run(app.bind(args_for_replicas), name="lpt", route_prefix="/")
                clients = args.clients_per_replica * n
                asyncio.run(closed_loop(url, tasks, clients, args.texts, 3.0, args.seed + 1))  # warm up
                run = asyncio.run(closed_loop(url, tasks, clients, args.texts, args.duration, args.seed))
                files = adapter_files(make_adapter(backbone, tasks[0], seed=100 + n), Path(tmp) / f"upload-{n}")
                run["convergence"] = asyncio.run(convergence(url, tasks[0], files, n, tasks, clients, args.texts))
                results[str(n)] = run
                serve.delete("lpt")
        finally:
            serve.shutdown()
            ray.shutdown()
    one = results[str(counts[0])]["rows_per_s"] / counts[0]
    rows = []
    for n in counts:
        r = results[str(n)]
        per_replica = r["rows_per_s"] / n
        r["per_replica_vs_one"] = ratio(per_replica, one)
        rows.append([n, fmt(r["rows_per_s"], 0), fmt(per_replica, 0), fmt(r["per_replica_vs_one"], 2),
                     ", ".join(str(v) for v in sorted(r["requests_by_replica"].values())),
                     fmt(r["convergence"]["seconds"], 2), str(r["convergence"]["failed_requests"]),
                     str(sum(r["errors"].values()))])
    table = markdown_table(["replicas", "rows/s", "rows/s per replica", "per replica vs 1", "requests per replica",
                            "upload served by all (s)", "failed during upload", "errors"], rows)
    cpu = monitor.stop()
    print(header("Replicas through Ray Serve's proxy (simulated accelerator)", machine,
                 f"{args.pass_ms:.0f} ms per pass, batches of at most {args.max_batch_size} rows, {args.texts} texts "
                 f"per request, {args.clients_per_replica} clients per replica, {args.duration:.0f} s each", cpu))
    print()
    print(table)
    print(f"\ntarget: per replica >= {TARGET_PER_REPLICA} of one replica's; an upload served by all within 2 s")
    save_results(NAME, args, {"name": NAME, "date": now_iso(), "machine": machine, "wait": wait,
                              "settings": vars(args), "results": results, "cpu_contention": cpu, "table": table,
                              "total_seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
