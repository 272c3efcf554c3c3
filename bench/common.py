"""Helpers shared by the benchmark scripts: machine info, waiting for a quiet CPU, memory readings, tables, JSON.

Every script writes `bench/results/<name>.json` (or `<name>-quick.json` for `--quick`), holding the date, the
machine, the exact settings and the measurements, and prints a markdown table of the same numbers.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
# Another process training adapters makes every number here worthless; wait for it to finish first.
BUSY_PATTERN = "lpt train"


# ------------------------------------------------------------------------------------------------- machine
def set_threads(threads: int) -> int:
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total_mb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total_mb = round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "mem_total_mb": mem_total_mb,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def busy_processes(pattern: str = BUSY_PATTERN) -> list[str]:
    """Command lines of other processes matching `pattern` (pgrep -f), this process excluded."""
    try:
        out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return []
    mine = {os.getpid(), os.getppid()}
    return [line for line in out.splitlines() if line and int(line.split()[0]) not in mine]


def wait_until_quiet(timeout_s: float = 25 * 60, poll_s: float = 30.0, settle_s: float = 10.0,
                     pattern: str = BUSY_PATTERN) -> dict[str, Any]:
    """Block while another process matching `pattern` runs (polling); return what was waited for, for the JSON.

    Quiet must hold for `settle_s` (checked every 2 s), so the gap between two back-to-back training runs of a
    script does not count as quiet.
    """
    started = time.monotonic()
    first = busy_processes(pattern)
    busy = first
    while time.monotonic() - started < timeout_s:
        if busy:
            print(f"[bench] waiting for {len(busy)} process(es) matching {pattern!r} to finish "
                  f"({time.monotonic() - started:.0f}s so far)", file=sys.stderr, flush=True)
            time.sleep(poll_s)
            busy = busy_processes(pattern)
            continue
        settle_end = time.monotonic() + settle_s
        while not busy and time.monotonic() < settle_end:
            time.sleep(2.0)
            busy = busy_processes(pattern)
        if not busy:
            break
    if busy:
        print(f"[bench] WARNING: still busy after {timeout_s:.0f}s; numbers are taken under contention",
              file=sys.stderr, flush=True)
    return {"waited_s": round(time.monotonic() - started, 1), "busy_at_start": first, "busy_at_measure": busy}


def _machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU-seconds of the whole machine since boot, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def _own_cpu_seconds() -> float:
    """CPU time of this process and of its children that have been waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class CpuMonitor:
    """How much CPU *other* processes used while a benchmark ran: the check that the numbers are uncontended.

    other = machine busy CPU-seconds - this process's and its (reaped) children's, per wall second. Hypervisor
    steal (another VM on the host) is reported apart. Stop it after every child process has been waited for.
    """

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._busy0, self._steal0 = _machine_cpu_seconds()
        self._own0 = _own_cpu_seconds()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        busy, steal = _machine_cpu_seconds()
        own = _own_cpu_seconds() - self._own0
        busy -= self._busy0
        return {
            "wall_s": round(wall, 1),
            "own_cores": round(own / wall, 3) if wall else 0.0,
            "other_cores": round(max(0.0, busy - own) / wall, 3) if wall else 0.0,
            "steal_cores": round((steal - self._steal0) / wall, 3) if wall else 0.0,
        }


def contention_line(cpu: dict[str, float]) -> str:
    verdict = "quiet" if cpu["other_cores"] < 0.1 and cpu["steal_cores"] < 0.1 else "CONTENDED: treat times with care"
    return (f"CPU during the run: this benchmark {cpu['own_cores']:.2f} cores, other processes "
            f"{cpu['other_cores']:.2f} cores, hypervisor steal {cpu['steal_cores']:.2f} cores ({verdict}).")


# -------------------------------------------------------------------------------------------------- memory
def rss_mb() -> float:
    """Current resident set size of this process (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process (from /proc/<pid>/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15 of stat)


# -------------------------------------------------------------------------------------------------- output
def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).astimezone().isoformat(timespec="seconds")


def result_path(name: str, quick: bool, out: str | Path | None = None) -> Path:
    if out is not None:
        return Path(out)
    return RESULTS_DIR / (f"{name}-quick.json" if quick else f"{name}.json")


def _clean(value: Any) -> Any:
    # NaN and inf are not JSON; null is.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def header(title: str, machine: dict[str, Any], extra: str = "", cpu: dict[str, float] | None = None) -> str:
    line = (f"## {title}\n\n{machine['cpu_count']} CPU(s) ({machine['cpu_model'] or 'unknown'}), "
            f"torch {machine['torch']} with {machine['torch_threads']} thread(s), {now_iso()}")
    for more in (extra, contention_line(cpu) if cpu else ""):
        if more:
            line += f"\n{more}"
    return line



def start_run(args: Any) -> tuple[dict[str, Any], CpuMonitor]:
    """What every benchmark does first: quiet transformers, fix the thread count, wait for the machine to be quiet
    (unless `--no-wait`; the wait is recorded with the results), and start watching the CPU."""
    from lpt_serve.model.backbone import quiet_transformers

    quiet_transformers()
    set_threads(args.threads)
    wait = {"skipped": True} if args.no_wait else wait_until_quiet()
    return wait, CpuMonitor()


def save_results(name: str, args: Any, payload: dict[str, Any]) -> Path:
    """Write a run's JSON where `--out` (or `--quick`) says, and tell the user where and how long it took."""
    path = write_json(result_path(name, args.quick, args.out), payload)
    print(f"\nwrote {path} (total {payload['total_seconds']:.0f}s)")
    return path
