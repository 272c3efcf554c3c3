"""Closed-loop load generator for lpt-serve.

`concurrency` workers each send `POST /classify/{task}` (one text per request) back to back until the duration
or request budget runs out. Client-side retries are off so that shed requests (429/503) show up in the report
instead of being hidden as extra latency.

Two HTTP engines. `aiohttp` (the default when installed: `pip install "lpt-serve-client[loadgen]"`) costs
~0.15 ms of CPU per request; `httpx`, through `AsyncLptClient`, ~3 ms at 32 connections (its pool's bookkeeping
grows with the connections). A load generator shares the machine with the server it measures far more often than
not, so the cheap one is the default; `--engine httpx` exercises the client library itself.

    python -m lpt_client.loadgen --url http://localhost:8000 --tasks sst2,agnews --concurrency 32 --duration 10 \
        --texts-file texts.txt --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import random
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from lpt_client.client import AsyncLptClient, LptConnectionError, LptError, UnexpectedResponseError
from lpt_client.schemas import ClassifyResult

__all__ = ["LoadReport", "main", "percentile", "run_load"]

Pick = Literal["random", "round_robin"]
Engine = Literal["auto", "aiohttp", "httpx"]
ENGINES = ("auto", "aiohttp", "httpx")

DEFAULT_TEXTS = [
    "The film was a delight from start to finish.",
    "I want a refund, the product broke after two days.",
    "Stocks rallied after the central bank held rates steady.",
    "The striker scored twice in the second half.",
    "New GPU architecture doubles inference throughput.",
    "Honestly it was fine, nothing special.",
]


@dataclass(frozen=True)
class _Sample:
    task: str
    outcome: str  # "ok", an HTTP status as text, "connection" or "invalid_response"
    latency_ms: float


@dataclass
class LoadReport:
    """Result of one run. Latency percentiles cover every completed request, errors included."""

    requests: int
    ok: int
    errors: dict[str, int]  # HTTP status ("429", "503", ...), "connection" or "invalid_response" -> count
    by_task: dict[str, int]
    concurrency: int
    duration_s: float
    throughput: float  # completed requests per second of wall time
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def error_count(self) -> int:
        return self.requests - self.ok

    @classmethod
    def from_samples(cls, samples: Sequence[_Sample], *, duration_s: float, concurrency: int) -> LoadReport:
        latencies = sorted(s.latency_ms for s in samples)
        errors = Counter(s.outcome for s in samples if s.outcome != "ok")
        return cls(
            requests=len(samples),
            ok=sum(1 for s in samples if s.outcome == "ok"),
            errors=dict(sorted(errors.items())),
            by_task=dict(sorted(Counter(s.task for s in samples).items())),
            concurrency=concurrency,
            duration_s=duration_s,
            throughput=len(samples) / duration_s if duration_s > 0 else 0.0,
            p50_ms=percentile(latencies, 50),
            p95_ms=percentile(latencies, 95),
            p99_ms=percentile(latencies, 99),
            mean_ms=sum(latencies) / len(latencies) if latencies else math.nan,
            max_ms=latencies[-1] if latencies else math.nan,
            latencies_ms=latencies,
        )

    def as_dict(self, *, include_latencies: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not include_latencies:
            del data["latencies_ms"]
        # NaN (no samples) is not valid JSON; null is.
        return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in data.items()}

    def format_table(self) -> str:
        errors = ", ".join(f"{key}={count}" for key, count in self.errors.items()) or "none"
        rows = [
            ("requests", f"{self.requests} (ok {self.ok})"),
            ("errors", errors),
            ("concurrency", str(self.concurrency)),
            ("duration", f"{self.duration_s:.2f} s"),
            ("throughput", f"{self.throughput:.1f} req/s"),
            ("latency p50", f"{self.p50_ms:.1f} ms"),
            ("latency p95", f"{self.p95_ms:.1f} ms"),
            ("latency p99", f"{self.p99_ms:.1f} ms"),
            ("latency max", f"{self.max_ms:.1f} ms"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linearly interpolated percentile (numpy's default method) of already-sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = (len(sorted_values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def _outcome(error: LptError) -> str:
    if isinstance(error, LptConnectionError):
        return "connection"
    if isinstance(error, UnexpectedResponseError):
        # Its status is a 2xx; keying it by status would make a broken response look like a success.
        return "invalid_response"
    return str(error.status)


async def run_load(
    base_url: str,
    tasks: list[str],
    texts: list[str],
    concurrency: int,
    duration_s: float | None = None,
    total_requests: int | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    *,
    seed: int = 0,
    pick: Pick = "random",
    timeout: float = 30.0,
    engine: Engine = "auto",
) -> LoadReport:
    """Run the load and report. Stops at `duration_s` or after `total_requests`, whichever comes first.

    Requests in flight when the duration expires still complete and count. Task choice per request is seeded
    random per worker (`pick="random"`) or round-robin over the global request sequence (`pick="round_robin"`).
    `engine="auto"` is aiohttp when it is installed and no httpx `transport` is given, else httpx.
    """
    if not tasks or not texts:
        raise ValueError("need at least one task and one text")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if duration_s is None and total_requests is None:
        raise ValueError("give duration_s, total_requests, or both")
    engine = _pick_engine(engine, transport)
    if transport is None and engine == "httpx":
        # Without matching pool limits, httpx's default of 100 connections would queue extra workers in the
        # client and the report would blame the server for that wait.
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        transport = httpx.AsyncHTTPTransport(limits=limits)

    samples: list[_Sample] = []
    issued = 0
    start = time.perf_counter()
    deadline = start + duration_s if duration_s is not None else math.inf

    async def worker(send: Send, worker_id: int) -> None:
        nonlocal issued
        rng = random.Random(seed * 1_000_003 + worker_id)
        while time.perf_counter() < deadline and (total_requests is None or issued < total_requests):
            # Claim the slot before awaiting so concurrent workers never overshoot total_requests.
            sequence = issued
            issued += 1
            task = tasks[sequence % len(tasks)] if pick == "round_robin" else rng.choice(tasks)
            text = rng.choice(texts)
            sent = time.perf_counter()
            outcome = await send(task, text)
            samples.append(_Sample(task, outcome, (time.perf_counter() - sent) * 1000))

    if engine == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            send = _aiohttp_sender(session, base_url)
            await asyncio.gather(*(worker(send, i) for i in range(concurrency)))
    else:
        async with AsyncLptClient(base_url, timeout=timeout, max_retries=0, transport=transport) as client:
            send = _httpx_sender(client)
            await asyncio.gather(*(worker(send, i) for i in range(concurrency)))
    return LoadReport.from_samples(samples, duration_s=time.perf_counter() - start, concurrency=concurrency)


Send = Callable[[str, str], Awaitable[str]]  # (task, text) -> outcome: "ok", a status, "connection", ...


def _pick_engine(engine: Engine, transport: httpx.AsyncBaseTransport | None) -> Literal["aiohttp", "httpx"]:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    if engine == "aiohttp" and transport is not None:
        raise ValueError("an httpx transport needs engine='httpx'")
    if engine == "auto":
        return "aiohttp" if transport is None and importlib.util.find_spec("aiohttp") else "httpx"
    return engine


def _answers(task: str, result: ClassifyResult) -> bool:
    """Both engines count a 200 as a success only if it is one prediction for the task asked."""
    return result.task == task and len(result.predictions) == 1


def _httpx_sender(client: AsyncLptClient) -> Send:
    async def send(task: str, text: str) -> str:
        try:
            result = await client.classify(task, text)
        except LptError as exc:
            return _outcome(exc)
        return "ok" if _answers(task, result) else "invalid_response"

    return send


def _aiohttp_sender(session: Any, base_url: str) -> Send:
    import aiohttp
    import pydantic

    prefix = base_url.rstrip("/")  # the full URL: aiohttp's own base_url would drop a path prefix (/lpt/classify)

    async def send(task: str, text: str) -> str:
        try:
            url = f"{prefix}/classify/{urllib.parse.quote(task, safe='')}"
            async with session.post(url, json={"text": text}) as r:
                body = await r.read()
        except (aiohttp.ClientError, TimeoutError):
            return "connection"
        if r.status != 200:
            return str(r.status)
        try:  # the client library's own schema check
            result = ClassifyResult.model_validate_json(body)
        except pydantic.ValidationError:
            return "invalid_response"
        return "ok" if _answers(task, result) else "invalid_response"

    return send


def _read_texts(path: Path) -> list[str]:
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise SystemExit(f"{path}: no non-empty lines")
    return texts


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lpt_client.loadgen", description="Closed-loop load generator for lpt-serve."
    )
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://localhost:8000")
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=None, help="seconds (default 10 unless --requests)")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many requests")
    parser.add_argument("--texts-file", type=Path, default=None, help="one text per line (default: built-in)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pick", choices=["random", "round_robin"], default="random")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="HTTP engine: aiohttp (~0.15 ms CPU per request; the default when installed) or httpx "
                             "(the client library, ~3 ms at 32 connections)")
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks:
        parser.error("--tasks is empty")
    if args.duration is None and args.requests is None:
        args.duration = 10.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    texts = _read_texts(args.texts_file) if args.texts_file else DEFAULT_TEXTS
    report = asyncio.run(
        run_load(
            args.url,
            args.tasks,
            texts,
            args.concurrency,
            duration_s=args.duration,
            total_requests=args.requests,
            seed=args.seed,
            pick=args.pick,
            timeout=args.timeout,
            engine=args.engine,
        )
    )
    print(report.format_table())
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    # Non-zero when nothing succeeded, so scripts notice a dead or misconfigured server.
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
