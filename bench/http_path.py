"""The HTTP path's own cost: server CPU milliseconds per request outside the forward pass.

The server runs a tiny random encoder (4 layers of width 32, as the unit tests use), so a forward pass costs
little and what the server spends per request is the HTTP path: parsing, validation, tokenising, queueing, the
batcher, the answer's serialisation, metrics. 32 closed-loop clients, one text per request, tasks drawn from 16
(and, for comparison, one task). The server's torch runs one thread, so the inference thread's CPU time in passes
(`lpt_forward_cpu_seconds` in its /metrics) is the forward's whole CPU time and can be taken out:

    CPU ms per request outside the forward = (server CPU seconds - forward seconds) / requests

CPU time, not wall time, so the figure holds on a busy machine better than a throughput would; it is still a
sample: run twice and compare.

    python -m bench.http_path            # ~1 min
    python -m bench.http_path --quick    # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import fmt, header, machine_info, markdown_table, now_iso, save_results, start_run
from bench.serving import Server, closed_loop, free_port

NAME = "http_path"
TEXTS = ["a gripping, funny film", "the plot drags and the jokes fall flat", "markets rallied on the news",
         "the striker scored twice in the final", "new phone launches with a bigger screen",
         "i can't believe how bad the service was", "what a wonderful day at the beach"]


def make_store(root: Path, n_tasks: int) -> tuple[Path, list[str]]:
    """A tiny random BERT folder and a store of `n_tasks` adapters on it."""
    from lpt_serve.model.backbone import Backbone
    from lpt_serve.serving.store import AdapterStore
    from tests.helpers import make_adapter
    from tests.tiny import make_tiny_bert

    folder = make_tiny_bert(root / "tiny-bert")
    backbone = Backbone.load(folder, device="cpu", dtype="float32")
    store = AdapterStore(root / "store")
    names = [f"t{i:02d}" for i in range(n_tasks)]
    for i, name in enumerate(names):
        store.commit_dir(name, make_adapter(backbone, name, seed=i).save(root / "src" / name))
    return folder, names


def per_request(run: dict[str, Any]) -> dict[str, Any]:
    requests = run["requests"]
    wall = run["wall_s"]
    cpu_s = run["server_cpu_cores"] * wall
    forward_s = run["server"]["forward_cpu_s"]
    return {"requests": requests, "throughput": run["throughput"], "server_cpu_ms": cpu_s / requests * 1000,
            "forward_ms": forward_s / requests * 1000, "outside_forward_ms": (cpu_s - forward_s) / requests * 1000,
            "rows_per_batch": run["server"]["mean_batch_rows"], "errors": run["errors"]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.http_path", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=15.0, help="seconds per measurement")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-wait", action="store_true", help="do not wait for `lpt train` processes to finish")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 s per measurement")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 3.0)
    args.server_threads = 1  # so that the forward's wall time is its CPU time
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wait, monitor = start_run(args)
    started = time.perf_counter()
    machine = machine_info()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lpt-bench-http-") as tmp:
        folder, tasks = make_store(Path(tmp), args.tasks)
        args.server_args = ["--backbone", str(folder)]
        server = Server(Path(tmp) / "store", free_port(), args)
        try:
            server.wait_ready()
            closed_loop(server, tasks, TEXTS, args.concurrency, min(2.0, args.duration), args.seed + 1)  # warm up
            print("[http_path] mixed tasks ...", file=sys.stderr, flush=True)
            results["mixed"] = per_request(closed_loop(server, tasks, TEXTS, args.concurrency, args.duration,
                                                       args.seed))
            print("[http_path] one task ...", file=sys.stderr, flush=True)
            results["single"] = per_request(closed_loop(server, tasks[:1], TEXTS, args.concurrency, args.duration,
                                                        args.seed))
        finally:
            server.stop()
    rows = [[label, n, fmt(r["throughput"], 1), fmt(r["server_cpu_ms"], 2), fmt(r["forward_ms"], 2),
             fmt(r["outside_forward_ms"], 2), fmt(r["rows_per_batch"], 1), str(sum(r["errors"].values()))]
            for label, n, r in (("mixed", args.tasks, results["mixed"]), ("one task", 1, results["single"]))]
    table = markdown_table(["traffic", "tasks", "req/s", "server CPU ms/req", "forward ms/req",
                            "outside forward ms/req", "rows/batch", "errors"], rows)
    cpu = monitor.stop()
    print(header("HTTP path: server CPU per request (tiny encoder)", machine,
                 f"{args.concurrency} closed-loop clients, one text per request, {args.duration:.0f} s each", cpu))
    print()
    print(table)
    save_results(NAME, args, {"name": NAME, "date": now_iso(), "machine": machine, "wait": wait, "settings": vars(args),
                              "results": results, "cpu_contention": cpu, "table": table,
                              "total_seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
