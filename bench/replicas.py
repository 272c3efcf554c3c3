"""Replicas: throughput per replica through Ray Serve's proxy at 1, 2 and 4 replicas, and how long an upload takes
to reach every replica.

These 2 cores cannot run 4 real encoders side by side, so each replica simulates an accelerator: the encoder is
the tiny random one of the unit tests and every forward pass lasts `--pass-ms` (250 ms): the real forward, then
sleep, freeing the cores as a pass on a GPU would (`LPT_SIMULATED_PASS_MS`). A replica can then answer at most
`max_batch_size` (64) rows per pass, and what the benchmark measures is what routing and convergence cost: N
replicas should give N times the rows/s of one. Requests carry `--texts` (16) texts of one task (tasks drawn from
16), from `--clients-per-replica` (16) closed-loop clients per replica: four passes' worth of rows in flight, so
that a replica's queue does not run dry when the proxy's spread is momentarily uneven. The run order is 1, 2, 4
and 1 replicas again; the baseline is the mean of the two 1-replica runs.

The CPU each part used is measured per run (the load generator, Ray's proxy, the replicas, Ray's controller, raylet
and GCS) as CPU milliseconds per request and cores busy: where the cores are the limit, that shows. The pass time
is long because these processes need about 23 ms of CPU per request of 16 texts between them: at 100 ms per pass,
4 replicas would need 3-4 cores.

Convergence: with every client asking for one task, an upload of that task goes through the proxy; a replica has
converged at its first answer with the new version after which every request sent to it got the new version, and
the convergence time is the latest replica's, from the upload's answer (each replica polls the store every 0.5 s;
a request admitted before its replica's sync answers with the version it was admitted on, up to a few passes
later).

Ray runs with `lpt_serve.api.ray_serve.THROUGHPUT_ENV` (`--ray-defaults` to compare without).

    python -m bench.replicas                # ~5 min
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


ROLES = ("load generator", "proxy", "replicas", "ray (controller, raylet, gcs)")


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process and everything under it (Ray's processes are its descendants), by role."""
    import psutil

    me = psutil.Process()
    seen: dict[int, tuple[str, float]] = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue  # exited meanwhile
        if process.pid == me.pid:
            role = ROLES[0]
        elif "ProxyActor" in command:
            role = ROLES[1]
        elif "ServeReplica" in command:
            role = ROLES[2]
        else:
            role = ROLES[3]
        seen[process.pid] = (role, times.user + times.system)
    return seen


def cpu_between(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each role used between two snapshots (a process new since `before` counts from zero)."""
    used = dict.fromkeys(ROLES, 0.0)
    for pid, (role, seconds) in after.items():
        used[role] += seconds - before.get(pid, (role, 0.0))[1]
    return used


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


async def convergence(url: str, task: str, files: tuple[bytes, bytes], replicas: int, clients: int, texts: int,
                      watch_s: float = 5.0) -> dict[str, Any]:
    """How long after an upload's answer every replica answers with the new version, seen in traffic for that task.

    All the clients ask for `task` through the change; each answer is logged (when sent and answered, relative to
    the upload's answer; which replica; which version). A replica has converged at the first answer with the new
    version after which every request sent to it got the new version; the convergence time is the latest replica's.
    Traffic rather than probes: the proxy may send a burst of probes all to one replica, round after round."""
    import httpx

    from lpt_serve.api.ray_serve import REPLICA_HEADER

    answers: list[tuple[float, float, str, int]] = []
    failures = 0
    uploaded: float | None = None
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def traffic(seed: int) -> None:
            nonlocal failures
            rng = random.Random(seed)
            while not stop.is_set():
                body = {"texts": [rng.choice(TEXTS) for _ in range(texts)]}
                sent = time.monotonic()
                r = await client.post(f"/classify/{task}", json=body)
                if r.status_code != 200:
                    failures += 1
                elif uploaded is not None:
                    answers.append((sent - uploaded, time.monotonic() - uploaded, r.headers.get(REPLICA_HEADER, "?"),
                                    r.json()["version"]))

        background = [asyncio.create_task(traffic(seed)) for seed in range(clients)]
        await asyncio.sleep(1.0)
        config, weights = files
        r = await client.put(f"/admin/tasks/{task}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                             files={"config": ("adapter_config.json", config),
                                    "weights": ("adapter_model.safetensors", weights)})
        uploaded = time.monotonic()
        r.raise_for_status()
        new = r.json()["version"]
        await asyncio.sleep(watch_s)
        stop.set()
        await asyncio.gather(*background)
    by_replica: dict[str, list[tuple[float, float, int]]] = {}
    for sent, answered, replica, version in answers:
        by_replica.setdefault(replica, []).append((sent, answered, version))
    converged: dict[str, float | None] = {}
    for replica, seen in by_replica.items():
        seen.sort()  # by send time
        last_old = max((i for i, (_, _, version) in enumerate(seen) if version != new), default=-1)
        after = [answered for _, answered, _ in seen[last_old + 1:]]
        converged[replica] = min(after) if after else None
    complete = len(converged) == replicas and all(t is not None for t in converged.values())
    return {"seconds": max(converged.values()) if complete else None,  # type: ignore[type-var]
            "by_replica": converged, "version": new, "failed_requests": failures, "answers": len(answers)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--replicas", default="1,2,4,1",
                   help="replica counts in the order run, comma-separated; the first count's runs are the baseline")
    p.add_argument("--pass-ms", type=float, default=250.0, help="the simulated accelerator's time per pass")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--texts", type=int, default=16, help="texts per request")
    p.add_argument("--clients-per-replica", type=int, default=16,
                   help="closed-loop clients per replica: enough rows in flight to fill every replica's passes")
    p.add_argument("--ray-defaults", action="store_true",
                   help="run Ray Serve with its default settings, not lpt_serve.api.ray_serve.THROUGHPUT_ENV")
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
    from lpt_serve.api.ray_serve import THROUGHPUT_ENV

    # Before Ray starts: its processes (proxy, replicas) read these from the environment they inherit.
    ray_env = {} if args.ray_defaults else THROUGHPUT_ENV
    os.environ.update(ray_env)
    import ray
    from ray import serve

    from lpt_serve.api import ray_serve
    from lpt_serve.model.backbone import Backbone
    from tests.helpers import adapter_files, free_port, make_adapter

    started = time.perf_counter()
    machine = machine_info()
    counts = [int(n) for n in args.replicas.split(",")]
    runs: list[dict[str, Any]] = []
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
                cpu_before = cpu_by_process()
                run = asyncio.run(closed_loop(url, tasks, clients, args.texts, args.duration, args.seed))
                used = cpu_between(cpu_before, cpu_by_process())
                requests = sum(run["requests_by_replica"].values()) or 1
                run["replicas"] = n
                run["cores_busy"] = {role: seconds / run["seconds"] for role, seconds in used.items()}
                run["cpu_ms_per_request"] = {role: 1000 * seconds / requests for role, seconds in used.items()}
                upload = adapter_files(make_adapter(backbone, tasks[0], seed=100 + len(runs)),
                                       Path(tmp) / f"upload-{len(runs)}")
                run["convergence"] = asyncio.run(convergence(url, tasks[0], upload, n, clients, args.texts))
                runs.append(run)
                serve.delete("lpt")
        finally:
            serve.shutdown()
            ray.shutdown()
    # The baseline: the mean over every run at the first count (`1,2,4,1` measures one replica before and after).
    baseline = [r["rows_per_s"] / r["replicas"] for r in runs if r["replicas"] == counts[0]]
    one = sum(baseline) / len(baseline)
    rows = []
    for r in runs:
        n = r["replicas"]
        per_replica = r["rows_per_s"] / n
        r["per_replica_vs_one"] = ratio(per_replica, one)
        rows.append([n, fmt(r["rows_per_s"], 0), fmt(per_replica, 0), fmt(r["per_replica_vs_one"], 2),
                     ", ".join(str(v) for v in sorted(r["requests_by_replica"].values())),
                     fmt(sum(r["cores_busy"].values()), 2),
                     " / ".join(fmt(r["cpu_ms_per_request"][role], 1) for role in ROLES),
                     fmt(r["convergence"]["seconds"], 2), str(r["convergence"]["failed_requests"]),
                     str(sum(r["errors"].values()))])
    table = markdown_table(["replicas", "rows/s", "rows/s per replica", "per replica vs 1", "requests per replica",
                            "cores busy", "CPU ms per request: " + " / ".join(ROLES),
                            "upload served by all (s)", "failed during upload", "errors"], rows)
    cpu = monitor.stop()
    print(header("Replicas through Ray Serve's proxy (simulated accelerator)", machine,
                 f"{args.pass_ms:.0f} ms per pass, batches of at most {args.max_batch_size} rows, {args.texts} texts "
                 f"per request, {args.clients_per_replica} clients per replica, {args.duration:.0f} s each", cpu))
    print()
    print(table)
    print(f"\ntarget: per replica >= {TARGET_PER_REPLICA} of one replica's; an upload served by all within 2 s")
    save_results(NAME, args, {"name": NAME, "date": now_iso(), "machine": machine, "wait": wait,
                              "settings": vars(args), "ray_env": ray_env, "runs": runs, "cpu_contention": cpu,
                              "table": table,
                              "total_seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
