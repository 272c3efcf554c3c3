"""Compact adapters: what storing a task's weights in fp16 or bf16 (half the bytes) changes in its answers.

For each demo task (`adapters_store/`: mr, bbc, tweets) the fp32 adapter is copied to fp16 and to bf16 with
`compact_adapter` (what `lpt compact` does), and all three are scored on the task's test split (the fixed-seed
split `lpt train`/`lpt eval --data NAME` use) through the server's mixed pass (`classify_rows`), in fp32 on the
CPU: the compact weights are cast to fp32 when they run. Metrics are `lpt eval`'s (`probability_metrics`:
accuracy, macro-F1, expected calibration error, log loss); beside them, how many test rows change their predicted
label against fp32 and the largest change of any probability. Bytes: the weights file, and the adapter in memory
as loaded (compact adapters stay in their stored dtype).

    python -m bench.compact            # the three demo tasks' test splits (~1,000 rows)
    python -m bench.compact --quick    # 64 rows of each
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import fmt, header, machine_info, markdown_table, now_iso, save_results, start_run

NAME = "compact"
DTYPES = ("fp32", "fp16", "bf16")
DEMO = Path(__file__).resolve().parents[1] / "adapters_store"


def probabilities(backbone, adapter, texts: Sequence[str], batch_size: int = 64):
    import torch

    from lpt_serve.model.engine import classify_rows, encode_texts

    encoded = encode_texts(backbone, list(texts), adapter.config.template, adapter.config.max_length)
    rows = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        rows += classify_rows(backbone, [adapter] * len(chunk), chunk)
    return torch.stack(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compact", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", default="mr,bbc,tweets", help="demo tasks, comma-separated")
    p.add_argument("--limit", type=int, default=None, help="test rows per task (default: the whole split)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--no-wait", action="store_true", help="do not wait for `lpt train` processes to finish")
    p.add_argument("--quick", action="store_true", help="64 test rows per task")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/compact[-quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.limit = min(args.limit or 64, 64)
    args.tasks = [t for t in args.tasks.split(",") if t]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wait, monitor = start_run(args)
    from lpt_serve.format import WEIGHTS_NAME
    from lpt_serve.model.adapter import compact_adapter, load_adapter
    from lpt_serve.model.backbone import Backbone
    from lpt_serve.training.data import materialize, read_examples
    from lpt_serve.training.trainer import probability_metrics

    started = time.perf_counter()
    machine = machine_info()
    backbone = Backbone.load(device="cpu", dtype="float32", runtime="torch")
    results: dict[str, dict[str, dict[str, float]]] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="lpt-compact-") as tmp:
        for task in args.tasks:
            source = DEMO / task / "v1"
            examples = read_examples(materialize(task)["test"])[: args.limit]
            texts = [t for t, _ in examples]
            folders = {"fp32": source}
            for dtype in DTYPES[1:]:
                folders[dtype] = compact_adapter(source, dtype, Path(tmp) / f"{task}-{dtype}", backbone)
            reference = None
            results[task] = {}
            for dtype in DTYPES:
                adapter = load_adapter(folders[dtype], backbone)
                index = {label: i for i, label in enumerate(adapter.labels)}
                probs = probabilities(backbone, adapter, texts)
                metrics = probability_metrics(probs, [index[y] for _, y in examples], len(adapter.labels))
                if reference is None:
                    reference = probs
                entry = metrics | {
                    "rows": len(examples),
                    "weights_file_bytes": (folders[dtype] / WEIGHTS_NAME).stat().st_size,
                    "in_memory_bytes": sum(t.numel() * t.element_size() for t in adapter.state_dict().values()),
                    "labels_changed_vs_fp32": int((probs.argmax(-1) != reference.argmax(-1)).sum()),
                    "max_abs_prob_change_vs_fp32": float((probs - reference).abs().max()),
                }
                results[task][dtype] = entry
                print(f"[compact] {task} {dtype}: accuracy {entry['accuracy']:.4f}", file=sys.stderr, flush=True)
                base = results[task]["fp32"]
                rows.append([task, dtype, entry["rows"], fmt(entry["accuracy"], 4),
                             f"{entry['accuracy'] - base['accuracy']:+.4f}", fmt(entry["macro_f1"], 4),
                             fmt(entry["ece"], 4), fmt(entry["log_loss"], 4), entry["labels_changed_vs_fp32"],
                             f"{entry['max_abs_prob_change_vs_fp32']:.1e}", entry["weights_file_bytes"],
                             entry["in_memory_bytes"]])
    table = markdown_table(["task", "weights", "test rows", "accuracy", "vs fp32", "macro-F1", "ECE", "log loss",
                            "labels changed", "max |p - p_fp32|", "file bytes", "memory bytes"], rows)
    cpu = monitor.stop()
    print(header("Compact adapters: fp32 vs fp16 vs bf16 weights on the demo tasks", machine,
                 "test splits (seed 0), served in fp32 on the CPU, compact weights cast when used", cpu))
    print()
    print(table)
    payload = {"benchmark": NAME, "date": now_iso(), "machine": machine, "quick": args.quick, "wait": wait,
               "cpu_contention": cpu, "settings": vars(args), "results": results, "tables": {"main": table},
               "total_seconds": round(time.perf_counter() - started, 1)}
    save_results(NAME, args, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
