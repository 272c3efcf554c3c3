"""`lpt`: train, evaluate and manage LPT task adapters; talk to a running server.

Every known failure ends with one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_USAGE = 2

DEFAULT_URL = "http://127.0.0.1:8000"
DATA_HELP = "a JSONL/CSV file of text,label rows, or a dataset name (mr, bbc, tweets) to use its fixed-seed splits"
ADMIN_HINT = "set LPT_ADMIN_TOKEN to the server's token or pass --token"
ENVIRONMENT_HELP = f"""environment variables (a flag wins over its variable):
  LPT_URL          the server of classify, tasks, upload, rollback and delete
                   (default {DEFAULT_URL})
  LPT_ADMIN_TOKEN  the server's admin token, for upload, rollback and delete
  LPT_BACKBONE     the model folder of train, eval and store commit
                   (default: the all-MiniLM-L6-v2 package)
  LPT_STORE        the adapter store of the store commands
                   (default ~/.local/share/lpt-serve/store, as lpt-serve's)
  LPT_DATA_DIR     the cache of the datasets mr, bbc and tweets
                   (default ~/.cache/lpt-serve/data)"""


class CliError(Exception):
    """A one-sentence failure that the user can act on."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where X tells the reader something.

    Not for None or off switches (argparse would print "None"/"False"), required or positional arguments, nor
    help that already says its default in words. Description and epilog: each unindented line is a paragraph
    filled to the terminal; indented lines (the environment table) stay as written. No line breaks at a hyphen,
    so names like all-MiniLM-L6-v2 and paths stay whole.
    """

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is None or action.default is False or action.default is argparse.SUPPRESS
                or action.required or not action.option_strings or "default" in text):
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(line if line.startswith(" ") or not line
                         else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent,
                                            break_on_hyphens=False)
                         for line in text.splitlines())


def _load_backbone(args: argparse.Namespace):
    from lpt_serve.model.backbone import Backbone

    return Backbone.load(args.backbone, device=args.device, dtype=args.dtype)


def _check_device(args: argparse.Namespace) -> None:
    """Refuse an unusable --device/--dtype (BackboneError, one sentence) before data is read or fetched."""
    from lpt_serve.model.backbone import resolve_device, resolve_dtype

    resolve_dtype(args.dtype, resolve_device(args.device))


def check_task_name(task: str) -> str:
    from lpt_serve.format import validate_task_name

    return validate_task_name(task)  # InvalidTaskName says the rule


def check_adapter_dir(folder: str) -> Path:
    """The directory an upload reads, checked here so a wrong path is a sentence, not a trace after a request."""
    from lpt_serve.format import ADAPTER_FILES

    path = Path(folder)
    wanted = " and ".join(ADAPTER_FILES)
    if not path.exists():
        raise CliError(f"adapter directory {folder} does not exist: pass the directory `lpt train --out` wrote "
                       f"(it holds {wanted})")
    if not path.is_dir():
        raise CliError(f"{folder} is a file, not an adapter directory: pass the directory that holds {wanted}")
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise CliError(f"{folder} is not an adapter directory: it has no {' and no '.join(missing)} "
                       f"(an adapter directory holds {wanted})")
    return path


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
    from lpt_serve.errors import InvalidTaskName
    from lpt_serve.training.trainer import Trainer, TrainSettings, evaluate, save_full_model, save_lora_model

    if args.task is not None:
        check_task_name(args.task)
    _check_device(args)
    train_rows, data_name, splits = _resolve_data(args.data, "train")
    if args.task is None:
        try:
            check_task_name(data_name)
        except InvalidTaskName as exc:
            raise CliError(f"{exc}; the name comes from the data file's name, so pass --task NAME") from None
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
    lora_targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    settings = TrainSettings(
        method=args.method, generator=args.generator, prompt_layer=args.prompt_layer,
        prompt_length=args.prompt_length, bottleneck=args.bottleneck, dropout=args.dropout, head=args.head,
        pooling=args.pooling, template=args.template, label_words=label_words, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, cache_lower=not args.no_cache,
        patience=args.patience, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_targets=lora_targets,
    )
    backbone = _load_backbone(args)
    trainer = Trainer(backbone, settings, progress=not args.no_progress)
    result = trainer.train(task, train_rows, dev_rows, data_name)
    out = Path(args.out)
    summary = {"task": task, "method": args.method, "best_epoch": result.best_epoch,
               "dev": {k: round(v, 4) for k, v in result.dev_metrics.items()},
               "trainable_parameters": result.trainable_parameters, "seconds": round(result.seconds, 1)}
    if test_rows is not None:
        # The served adapter is scored through the server's own mixed pass; full and LoRA through their model.
        test = evaluate(backbone, result.adapter, test_rows) if result.adapter else trainer.score(result, test_rows)
        summary["test"] = {k: round(v, 4) for k, v in test.items()}
        result.extra["training"] |= {"test": summary["test"], "test_size": len(test_rows)}
    if result.adapter is None:
        (save_lora_model if args.method == "lora" else save_full_model)(result, out)
    else:
        result.adapter.config.training = result.extra["training"]
        result.adapter.save(out)
    print(json.dumps(summary | {"out": str(out)}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lpt_serve.model.adapter import load_adapter
    from lpt_serve.training.trainer import LORA_CONFIG_NAME, Trainer, evaluate, load_lora_model

    _check_device(args)
    rows, _, _ = _resolve_data(args.data, args.split)
    backbone = _load_backbone(args)
    if (Path(args.adapter) / LORA_CONFIG_NAME).is_file():  # what `lpt train --method lora` wrote
        result, settings = load_lora_model(args.adapter, backbone)
        task = result.extra["training"].get("data") or Path(args.adapter).name
        metrics = Trainer(backbone, settings, progress=False).score(result, rows)
    else:
        adapter = load_adapter(args.adapter, backbone)
        task = adapter.task
        metrics = evaluate(backbone, adapter, rows)
    print(json.dumps({"task": task, "rows": len(rows), **{k: round(v, 4) for k, v in metrics.items()}}, indent=2))
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from lpt_serve.format import WEIGHTS_NAME
    from lpt_serve.model.adapter import compact_adapter

    source = check_adapter_dir(args.adapter_dir)
    out = Path(args.out) if args.out else source.with_name(f"{source.name}-{args.dtype}")
    before = (source / WEIGHTS_NAME).stat().st_size
    compact_adapter(source, args.dtype, out)
    after = (out / WEIGHTS_NAME).stat().st_size
    print(json.dumps({"out": str(out), "dtype": args.dtype, "weights_bytes": after, "source_weights_bytes": before}))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from lpt_serve.training.data import materialize

    splits = materialize(args.name, seed=args.seed, force=args.force)
    print(json.dumps({k: str(v) for k, v in splits.items()}, indent=2))
    return 0


def _client(args: argparse.Namespace):
    from lpt_client import LptClient

    # Only admin commands have --token; the variable is read here, not as the flag's default, so that
    # `--help` never prints the secret.
    token = getattr(args, "token", None) or os.environ.get("LPT_ADMIN_TOKEN") or None
    return LptClient(args.url, admin_token=token, timeout=args.timeout)


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
    check_task_name(args.task)
    folder = check_adapter_dir(args.adapter_dir)
    with _client(args) as client:
        result = client.upload(args.task, folder)
    print(json.dumps({"task": result.task, "version": result.version}))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    check_task_name(args.task)
    with _client(args) as client:
        result = client.rollback(args.task)
    print(json.dumps({"task": result.task, "version": result.version}))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    check_task_name(args.task)
    with _client(args) as client:
        client.delete(args.task)
    print(f"deleted task {args.task}: it is no longer served and all its versions left the store")
    return 0


def build_parser(extend: Callable[[Any, type[argparse.HelpFormatter]], None] | None = None) -> argparse.ArgumentParser:
    """`lpt`'s parser; `extend(subparsers, formatter)` adds commands of layers this one may not import
    (`lpt_serve.cli` adds `lpt store`)."""
    parser = argparse.ArgumentParser(
        prog="lpt",
        description="Late Prompt Tuning: train tiny task adapters for one frozen encoder, evaluate them, "
                    "and talk to an lpt-serve server.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def backbone_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backbone", default=os.environ.get("LPT_BACKBONE") or None,
                       help="local BERT/RoBERTa model folder (default: LPT_BACKBONE if set, else the "
                            "all-MiniLM-L6-v2 package)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (CUDA when there is a GPU)")
        p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, float16, bfloat16")

    p = sub.add_parser("train", help="train a task adapter (or a full fine-tune for comparison)",
                       formatter_class=HelpFormatter,
                       description="Train one task. LPT caches the frozen layers below the prompt layer once and "
                                   "reuses them every epoch. The epoch with the best dev accuracy is kept; among "
                                   "epochs of equal dev accuracy, the one with the lowest dev loss (cross-entropy), "
                                   "the better calibrated. Dev and test metrics include the expected calibration "
                                   "error (ECE, 15 equal-width bins of the top-class confidence).")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--task", help="task name (default: the data's name); a-z, 0-9, '_' and '-'")
    p.add_argument("--out", required=True, help="directory to write the adapter to")
    p.add_argument("--dev", help="dev data (file or dataset name); default: the dataset's dev split or --dev-split")
    p.add_argument("--dev-split", type=float, default=0.1, help="fraction of --data held out for dev when no --dev")
    p.add_argument("--test", help="test data to report after training (recorded in the adapter's config)")
    p.add_argument("--method", choices=["lpt", "prompt", "lora", "full"], default="lpt",
                   help="lpt: late prompt (servable); prompt: classic prompt tuning at the input (servable); "
                        "lora: LoRA with PEFT, for comparison (writes lora_model.safetensors, which `lpt eval` "
                        "scores but the server does not serve); full: full fine-tuning, for comparison")
    p.add_argument("--generator", choices=["npg", "mppg", "appg"], default="npg", help="prompt generator (lpt)")
    p.add_argument("--prompt-layer", type=int, default=None,
                   help="layer k after which the prompt enters (default: the middle layer, N//2)")
    p.add_argument("--prompt-length", type=int, default=5, help="prompt vectors L")
    p.add_argument("--bottleneck", type=int, default=128, help="generator bottleneck d")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="dropout rate in the prompt generator and the head while training")
    p.add_argument("--head", choices=["linear", "verbalizer"], default="linear",
                   help="verbalizer needs a backbone with an MLM head, --template and --label-words")
    p.add_argument("--pooling", choices=["mean", "cls", "mean_prompt"], default="mean", help="linear head pooling")
    p.add_argument("--template", help="e.g. '{text} . It was <mask> .'")
    p.add_argument("--label-words", help="comma-separated, one per label in sorted label order, e.g. terrible,great")
    p.add_argument("--epochs", type=int, default=12,
                   help="passes over the training data; the epoch with the best dev accuracy is kept, ties going "
                        "to the lower dev loss")
    p.add_argument("--patience", type=int, default=None,
                   help="stop early after this many epochs without a better dev epoch (default: run every epoch)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: lpt 2e-3, prompt 3e-2, lora 1e-3, full 3e-5)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank r (--method lora)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha; updates are scaled by alpha/r")
    p.add_argument("--lora-targets", default="query,value",
                   help="comma-separated names of the linear layers LoRA adapts (--method lora), e.g. "
                        "query,key,value,dense")
    p.add_argument("--batch-size", type=int, default=32, help="training rows per optimiser step")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text (longer texts are cut)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed: initial weights, batch order and the --dev-split hold-out")
    p.add_argument("--no-cache", action="store_true", help="recompute the lower layers every step (for benchmarks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    backbone_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy, macro-F1 and calibration of an adapter on labelled data",
                       formatter_class=HelpFormatter,
                       description="Score an adapter on labelled data; prints accuracy, macro-F1, expected "
                                   "calibration error (ece: 15 equal-width bins of the top-class confidence) and "
                                   "log loss (mean cross-entropy) as JSON.")
    p.add_argument("--adapter", required=True,
                   help="adapter directory (or the directory `lpt train --method lora` wrote)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--split", default="test", choices=["train", "dev", "test"], help="split, for a dataset name")
    backbone_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="materialise an offline dataset as train/dev/test JSONL",
                       formatter_class=HelpFormatter,
                       description="Fetch a dataset once (cached in LPT_DATA_DIR, default ~/.cache/lpt-serve/data), "
                                   "split it into train/dev/test JSONL files and print their paths. "
                                   "`lpt train --data NAME` does this by itself.")
    p.add_argument("name", choices=["mr", "bbc", "tweets"],
                   help="mr: movie-review sentiment; bbc: news topics; tweets: tweet sentiment")
    p.add_argument("--seed", type=int, default=0, help="random seed of the train/dev/test split")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("compact", help="copy an adapter with its weights in fp16 or bf16 (half the bytes)",
                       formatter_class=HelpFormatter,
                       description="Write a copy of an adapter directory whose weights are stored in fp16 or bf16: "
                                   "half the bytes on disk and in a server's memory; the server casts them to its "
                                   "own dtype when it runs them. bf16 keeps fp32's range; fp16 keeps more digits "
                                   "but refuses weights beyond +-65504. Upload the copy like any adapter.")
    p.add_argument("adapter_dir", help="directory with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--dtype", required=True, choices=["fp16", "bf16"], help="dtype of the copy's weights")
    p.add_argument("--out", help="directory to write the copy to (default: ADAPTER_DIR-DTYPE beside it)")
    p.set_defaults(func=cmd_compact)

    def server_args(p: argparse.ArgumentParser, *, admin: bool = False) -> None:
        p.add_argument("--url", default=os.environ.get("LPT_URL", DEFAULT_URL),
                       help="server URL; the LPT_URL variable sets it")
        if admin:
            p.add_argument("--token", default=None,
                           help="the server's admin token (default: the LPT_ADMIN_TOKEN variable; prefer it, as a "
                                "flag shows in `ps`)")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")

    def server_command(name: str, summary: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                           formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = server_command("classify", "classify texts with a served task", cmd_classify)
    p.add_argument("task", help="a served task (`lpt tasks` lists them)")
    p.add_argument("texts", nargs="+", help="texts to classify, one argument each; prints label, score, text")
    server_args(p)

    p = server_command("tasks", "list the served tasks", cmd_tasks)
    server_args(p)

    p = server_command("upload", "hot-upload an adapter directory as a new version of a task", cmd_upload)
    p.add_argument("task", help="task name: a new task, or the next version of a served one")
    p.add_argument("adapter_dir", help="directory with adapter_config.json and adapter_model.safetensors "
                                       "(what `lpt train --out` wrote)")
    server_args(p, admin=True)

    p = server_command("rollback", "serve the previous version of a task again", cmd_rollback)
    p.add_argument("task", help="a served task with more than one version")
    server_args(p, admin=True)

    p = server_command("delete", "stop serving a task and remove all its versions from the store", cmd_delete)
    p.add_argument("task", help="the task to delete")
    server_args(p, admin=True)
    if extend is not None:
        extend(sub, HelpFormatter)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from lpt_serve.errors import LptServeError

    errors: list[type[BaseException]] = [CliError, LptServeError]
    # An error class can only have been raised if its module was imported; importing the trainer here would load
    # torch (seconds) just to print a sentence about a mistyped path.
    for module, name in (("lpt_serve.training.data", "DataError"), ("lpt_serve.training.trainer", "TrainError"),
                         ("lpt_client", "LptError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: list[str] | None = None, *, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    if getattr(args, "store_command", None):
        args.command = f"store {args.store_command}"  # errors name the whole command: "lpt store commit: ..."
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import httpx

    from lpt_client import AuthError, LptConnectionError

    try:
        return args.func(args)
    except LptConnectionError as exc:
        print(f"lpt {args.command}: cannot reach the server at {args.url} ({exc.message}); is lpt-serve running? "
              "Set --url or LPT_URL", file=sys.stderr)
        return EXIT_USAGE
    except AuthError as exc:
        sent = getattr(args, "token", None) or os.environ.get("LPT_ADMIN_TOKEN")
        hint = ADMIN_HINT if sent else f"no admin token was sent: {ADMIN_HINT}"
        print(f"lpt {args.command}: the server refused the admin request (HTTP {exc.status}: {exc.message}); {hint}",
              file=sys.stderr)
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
