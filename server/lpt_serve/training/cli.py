"""`lpt`: train, evaluate and manage LPT task adapters; talk to a running server.

Every known failure ends with one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

EXIT_USAGE = 2

DATA_HELP = "a JSONL/CSV file of text,label rows, or a dataset name (mr, bbc, tweets) to use its fixed-seed splits"


class CliError(Exception):
    """A one-sentence failure that the user can act on."""


def _load_backbone(args: argparse.Namespace):
    from lpt_serve.model.backbone import Backbone

    return Backbone.load(args.backbone, device=args.device, dtype=args.dtype)


def _resolve_data(spec: str, split: str) -> tuple[list[tuple[str, str]], str, dict[str, Path] | None]:
    """A path reads that file; a dataset name materialises it (cached) and reads the split."""
    from lpt_serve.training.data import DATASETS, materialize, read_examples

    path = Path(spec)
    if path.exists() or spec not in DATASETS:
        return read_examples(path), path.stem, None
    splits = materialize(spec)
    return read_examples(splits[split]), spec, splits


def _dev_split(rows: list[tuple[str, str]], fraction: float, seed: int) -> tuple[list, list]:
    import random

    if not 0.0 < fraction < 0.9:
        raise CliError(f"--dev-split must lie between 0 and 0.9, not {fraction}")
    by_label: dict[str, list] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    rng = random.Random(seed)
    train, dev = [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        cut = max(1, round(len(group) * fraction)) if len(group) > 1 else 0
        dev += group[:cut]
        train += group[cut:]
    return train, dev


def cmd_train(args: argparse.Namespace) -> int:
    from lpt_serve.training.trainer import Trainer, TrainSettings, evaluate, save_full_model

    train_rows, data_name, splits = _resolve_data(args.data, "train")
    if args.dev:
        dev_rows, _, _ = _resolve_data(args.dev, "dev")
    elif splits is not None:
        from lpt_serve.training.data import read_examples

        dev_rows = read_examples(splits["dev"])
    else:
        train_rows, dev_rows = _dev_split(train_rows, args.dev_split, args.seed)
    test_rows = None
    if args.test:
        test_rows, _, _ = _resolve_data(args.test, "test")
    elif splits is not None:
        from lpt_serve.training.data import read_examples

        test_rows = read_examples(splits["test"])
    task = args.task or data_name
    label_words = [w.strip() for w in args.label_words.split(",")] if args.label_words else None
    settings = TrainSettings(
        method=args.method, generator=args.generator, prompt_layer=args.prompt_layer,
        prompt_length=args.prompt_length, bottleneck=args.bottleneck, dropout=args.dropout, head=args.head,
        pooling=args.pooling, template=args.template, label_words=label_words, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, cache_lower=not args.no_cache,
    )
    backbone = _load_backbone(args)
    result = Trainer(backbone, settings, progress=not args.no_progress).train(task, train_rows, dev_rows, data_name)
    out = Path(args.out)
    summary = {"task": task, "method": args.method, "best_epoch": result.best_epoch,
               "dev": {k: round(v, 4) for k, v in result.dev_metrics.items()},
               "trainable_parameters": result.trainable_parameters, "seconds": round(result.seconds, 1)}
    if result.adapter is None:
        save_full_model(result, out)
    else:
        if test_rows is not None:
            test = evaluate(backbone, result.adapter, test_rows)
            summary["test"] = {k: round(v, 4) for k, v in test.items()}
            result.adapter.config.training = (result.adapter.config.training or {}) | {
                "test": summary["test"], "test_size": len(test_rows)}
        result.adapter.save(out)
    print(json.dumps(summary | {"out": str(out)}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lpt_serve.model.adapter import load_adapter
    from lpt_serve.training.trainer import evaluate

    rows, _, _ = _resolve_data(args.data, args.split)
    backbone = _load_backbone(args)
    adapter = load_adapter(args.adapter, backbone)
    metrics = evaluate(backbone, adapter, rows)
    print(json.dumps({"task": adapter.task, "rows": len(rows), **{k: round(v, 4) for k, v in metrics.items()}},
                     indent=2))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from lpt_serve.training.data import materialize

    splits = materialize(args.name, seed=args.seed, force=args.force)
    print(json.dumps({k: str(v) for k, v in splits.items()}, indent=2))
    return 0


def _client(args: argparse.Namespace):
    from lpt_client import LptClient

    return LptClient(args.url, admin_token=args.token, timeout=args.timeout)


def cmd_classify(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.classify(args.task, list(args.texts))
    for text, pred in zip(args.texts, result.predictions, strict=True):
        print(f"{pred.label}\t{pred.score:.4f}\t{text}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        tasks = client.tasks()
    print(f"{'task':<20} {'version':>7} {'generator':<9} {'layer':>5} {'len':>4} {'params':>9} {'where':<5} labels")
    for t in tasks:
        print(f"{t.task:<20} {t.version:>7} {t.generator:<9} {t.prompt_layer:>5} {t.prompt_length:>4} "
              f"{t.parameters:>9} {t.location:<5} {','.join(t.labels)}")
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.upload(args.task, args.adapter_dir)
    print(json.dumps({"task": result.task, "version": result.version}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpt",
        description="Late Prompt Tuning: train tiny task adapters for one frozen encoder, evaluate them, "
                    "and talk to an lpt-serve server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def backbone_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backbone", default=os.environ.get("LPT_BACKBONE") or None,
                       help="local BERT/RoBERTa model folder (default: the all-MiniLM-L6-v2 package)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
        p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, float16, bfloat16")

    p = sub.add_parser("train", help="train a task adapter (or a full fine-tune for comparison)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train one task. LPT caches the frozen layers below the prompt layer once and "
                                   "reuses them every epoch; the best epoch on dev data is kept.")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--task", help="task name (default: the data's name); a-z, 0-9, '_' and '-'")
    p.add_argument("--out", required=True, help="directory to write the adapter to")
    p.add_argument("--dev", help="dev data (file or dataset name); default: the dataset's dev split or --dev-split")
    p.add_argument("--dev-split", type=float, default=0.1, help="fraction of --data held out for dev when no --dev")
    p.add_argument("--test", help="test data to report after training (recorded in the adapter's config)")
    p.add_argument("--method", choices=["lpt", "prompt", "full"], default="lpt",
                   help="lpt: late prompt; prompt: classic prompt tuning at the input; full: full fine-tuning")
    p.add_argument("--generator", choices=["npg", "mppg", "appg"], default="npg", help="prompt generator (lpt)")
    p.add_argument("--prompt-layer", type=int, default=None,
                   help="layer k after which the prompt enters (default N//2)")
    p.add_argument("--prompt-length", type=int, default=5, help="prompt vectors L")
    p.add_argument("--bottleneck", type=int, default=128, help="generator bottleneck d")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--head", choices=["linear", "verbalizer"], default="linear",
                   help="verbalizer needs a backbone with an MLM head, --template and --label-words")
    p.add_argument("--pooling", choices=["mean", "cls", "mean_prompt"], default="mean", help="linear head pooling")
    p.add_argument("--template", help="e.g. '{text} . It was <mask> .'")
    p.add_argument("--label-words", help="comma-separated, one per label in sorted label order, e.g. terrible,great")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: lpt 2e-3, prompt 3e-2, full 3e-5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256, help="tokens per text (longer texts are cut)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the lower layers every step (for benchmarks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    backbone_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy and macro-F1 of an adapter on labelled data",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--split", default="test", choices=["train", "dev", "test"], help="split, for a dataset name")
    backbone_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="materialise an offline dataset as train/dev/test JSONL",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("name", choices=["mr", "bbc", "tweets"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.set_defaults(func=cmd_data)

    def server_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("LPT_URL", "http://127.0.0.1:8000"), help="server URL")
        p.add_argument("--token", default=os.environ.get("LPT_ADMIN_TOKEN"), help="admin token (uploads)")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")

    p = sub.add_parser("classify", help="classify texts with a served task")
    p.add_argument("task")
    p.add_argument("texts", nargs="+")
    server_args(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("tasks", help="list the served tasks")
    server_args(p)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("upload", help="hot-upload an adapter directory as a new version of a task")
    p.add_argument("task")
    p.add_argument("adapter_dir")
    server_args(p)
    p.set_defaults(func=cmd_upload)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from lpt_serve.errors import LptServeError
    from lpt_serve.training.data import DataError
    from lpt_serve.training.trainer import TrainError

    errors: list[type[BaseException]] = [CliError, LptServeError, DataError, TrainError]
    try:
        from lpt_client import LptError

        errors.append(LptError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import httpx
    from lpt_client import LptConnectionError

    try:
        return args.func(args)
    except LptConnectionError as exc:
        print(f"lpt {args.command}: cannot reach the server at {args.url} ({exc.message}); is lpt-serve running? "
              "Set --url or LPT_URL", file=sys.stderr)
        return EXIT_USAGE
    except _known_errors() as exc:
        print(f"lpt {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except httpx.HTTPError as exc:
        print(f"lpt {args.command}: cannot reach the server at {getattr(args, 'url', '?')}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
