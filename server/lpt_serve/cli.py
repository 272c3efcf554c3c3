"""`lpt`, the command line: the commands of `lpt_serve.training.cli` (train, eval, data, compact, and the running
server's classify, tasks, upload, rollback, delete) and `lpt store`, which changes an adapter store directly.

`lpt store` lives here, above the layers: it needs the serving layer's store, which the training layer may not
import (tests/test_layers.py).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from lpt_serve.training.cli import CliError, check_adapter_dir, check_task_name
from lpt_serve.training.cli import build_parser as training_parser
from lpt_serve.training.cli import main as training_main


def _open_store(args: argparse.Namespace, *, change: bool = True):
    """The store the servers share, which must exist and look like a store: opening a store for a change recovers
    it (removes staging leftovers), so a mistyped path is a sentence, never a new store or a cleaned-up folder."""
    from lpt_serve.paths import default_store_dir
    from lpt_serve.serving.store import GENERATION_NAME, LOCK_NAME, SEEDED_NAME, AdapterStore

    root = Path(args.store) if args.store else default_store_dir()
    hint = "pass the directory lpt-serve serves (--store or LPT_STORE); a server creates it on its first start"
    if not root.is_dir():
        raise CliError(f"no adapter store at {root}: {hint}")
    if not any((root / marker).exists() for marker in (LOCK_NAME, GENERATION_NAME, SEEDED_NAME)):
        raise CliError(f"{root} is not an adapter store (it has no {LOCK_NAME} or {GENERATION_NAME} file): {hint}")
    if not change:
        return AdapterStore.read_only(root)
    keep = getattr(args, "keep_versions", None)
    if keep is None and args.store_command == "commit":
        try:
            keep = _non_negative(os.environ.get("LPT_KEEP_VERSIONS", "5"))
        except argparse.ArgumentTypeError as exc:
            raise CliError(f"LPT_KEEP_VERSIONS: {exc}") from None
    # A read-only store opens; the change then fails with StoreUnwritable, which says what to fix.
    return AdapterStore(root, keep_versions=keep or None)


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of versions, 0 or more, not {text!r}")
    return value


def cmd_store_list(args: argparse.Namespace) -> int:
    store = _open_store(args, change=False)
    tasks = store.tasks()
    print(json.dumps({"store": str(store.root), "generation": store.generation(),
                      "tasks": {t: {"version": r.current, "versions": list(r.versions)} for t, r in tasks.items()}},
                     indent=2))
    return 0


def cmd_store_commit(args: argparse.Namespace) -> int:
    from lpt_serve.format import CONFIG_NAME, WEIGHTS_NAME
    from lpt_serve.model.adapter import build_adapter, with_task_name
    from lpt_serve.model.backbone import Backbone

    task = check_task_name(args.task)
    folder = check_adapter_dir(args.adapter_dir)
    store = _open_store(args)
    try:
        config = with_task_name((folder / CONFIG_NAME).read_bytes(), task)
        weights = (folder / WEIGHTS_NAME).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read the adapter in {folder}: {exc.strerror or exc}") from exc
    # The server's own checks before anything is stored, at the servers' dtype (values must fit its range): every
    # replica must be able to load what lands here.
    build_adapter(config, weights, Backbone.load(args.backbone, device="cpu", dtype=args.dtype, runtime="torch"))
    record = store.commit(task, config, weights)
    print(json.dumps({"task": task, "version": record.current, "generation": store.generation()}))
    return 0


def cmd_store_rollback(args: argparse.Namespace) -> int:
    task = check_task_name(args.task)
    store = _open_store(args)
    record = store.rollback(task)
    print(json.dumps({"task": task, "version": record.current, "generation": store.generation()}))
    return 0


def cmd_store_delete(args: argparse.Namespace) -> int:
    task = check_task_name(args.task)
    store = _open_store(args)
    store.retire(task)
    print(json.dumps({"task": task, "deleted": True, "generation": store.generation()}))
    return 0


def add_store_commands(sub: Any, HelpFormatter: type[argparse.HelpFormatter]) -> None:  # noqa: N803 - a class
    store_help = ("change an adapter store directly, without a server: every lpt-serve replica on that store "
                  "serves the change within its --sync-interval-s")
    p = sub.add_parser("store", help=store_help, formatter_class=HelpFormatter,
                       description=store_help[0].upper() + store_help[1:] + ". For pipelines that publish adapters "
                                   "to a shared volume, and for a store whose servers are down. Changes take the "
                                   "store's lock, as a server's do.")
    store_sub = p.add_subparsers(dest="store_command", required=True, metavar="STORE_COMMAND")

    def store_command(name: str, summary: str, func) -> argparse.ArgumentParser:
        q = store_sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                                 formatter_class=HelpFormatter)
        q.add_argument("--store", default=os.environ.get("LPT_STORE") or None,
                       help="the store directory (default: LPT_STORE if set, else lpt-serve's default store)")
        q.set_defaults(func=func)
        return q

    store_command("list", "the store's tasks, their current version and versions kept, and its generation",
                  cmd_store_list)
    q = store_command("commit", "check an adapter directory against the backbone, as a server checks an upload, "
                                "and store it as the new current version of a task", cmd_store_commit)
    q.add_argument("task", help="task name: a new task, or the next version of a stored one")
    q.add_argument("adapter_dir", help="directory with adapter_config.json and adapter_model.safetensors")
    q.add_argument("--backbone", default=os.environ.get("LPT_BACKBONE") or None,
                   help="the servers' model folder, to check the adapter against (default: LPT_BACKBONE if set, "
                        "else the all-MiniLM-L6-v2 package)")
    q.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the servers' dtype: the adapter's values are checked against its range (float16 refuses "
                        "values beyond +-65504, as a float16 server would)")
    q.add_argument("--keep-versions", type=_non_negative, default=None,
                   help="stored versions kept per task after the commit, the new one included, 0 keeps all "
                        "(default: LPT_KEEP_VERSIONS if set, as for lpt-serve, else 5)")
    q = store_command("rollback", "make the previous version of a task current again", cmd_store_rollback)
    q.add_argument("task", help="a stored task with more than one version")
    q = store_command("delete", "remove a task and all its versions from the store", cmd_store_delete)
    q.add_argument("task", help="the task to delete")


def build_parser() -> argparse.ArgumentParser:
    return training_parser(extend=add_store_commands)


def main(argv: list[str] | None = None) -> int:
    return training_main(argv, parser=build_parser())


if __name__ == "__main__":
    raise SystemExit(main())
