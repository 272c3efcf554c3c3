"""`lpt-serve`: start the server. Every setting is a flag here and an `LPT_*` environment variable."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import types
import typing

from pydantic import ValidationError

from lpt_serve.api.settings import Settings

log = logging.getLogger("lpt_serve.api.main")


# What an unset (None) setting means, for the fields whose description does not say it already.
_UNSET_MEANS = {"max_length": "none: each adapter's own limit, at most the backbone's"}


def _flag_type(annotation):
    # Unwrap `X | None` only: the arguments of list[str] are its items, not alternatives.
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _help(name: str, field, base) -> str:
    """The flag's help with its default said once, in words where the value (None, []) would mislead."""
    text = field.description or ""
    default = field.default if field.default_factory is None else field.default_factory()
    if name == "admin_token":
        return f"{text}; prefer the LPT_ADMIN_TOKEN variable, as a flag shows in `ps`"
    if typing.get_origin(base) is list:
        return f"{text}, comma-separated (default {','.join(default) or 'none'})"
    if default is None:
        return text if "default" in text else f"{text} (default {_UNSET_MEANS.get(name, 'unset')})"
    return f"{text} (default {default})"


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's own, except that help lines never break at a hyphen: the store path must stay copyable."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpt-serve",
        description="Serve many LPT text classifiers on one frozen encoder. Serves every task in the store (each "
                    "loaded on its first request, kept in host memory within --host-budget-mb), batches requests "
                    "for different tasks into one forward pass, and hot-swaps uploads. "
                    "Each flag can also be set as LPT_<FLAG> (e.g. LPT_PORT=9000); flags win.",
        epilog="Prefer LPT_ADMIN_TOKEN to --admin-token: a flag shows in `ps`. Logs are JSON lines "
               "on stderr unless --no-log-json. Docs: README.md, docs/architecture.md.",
        # Each help line states its own default (`_help`); argparse's defaults formatter would print a second one,
        # "(default: None)" for every flag, since every flag's own default is None (unset: the settings decide).
        formatter_class=_HelpFormatter,
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        base = _flag_type(field.annotation)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=_help(name, field, base))
        else:
            parser.add_argument(flag, default=None, help=_help(name, field, base))
    return parser


def load_settings(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # a rule across fields: its message names them
                lines.append(message)
                continue
            where = ".".join(str(p) for p in err["loc"])
            lines.append(f"--{where.replace('_', '-')} / LPT_{where.upper()}: {message}")
        print("lpt-serve: invalid settings:\n  " + "\n  ".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(argv)
    from lpt_serve.api import logs

    logs.configure(settings.log_level, settings.log_json)
    import uvicorn

    from lpt_serve.api.app import create_app
    from lpt_serve.errors import BackboneError, StoreError
    from lpt_serve.serving.service import load_backbone, open_store
    from lpt_serve.serving.store import AdapterStore

    try:
        # Here, not in the lifespan, so a bad backbone or store ends with one sentence instead of a startup trace.
        config = settings.service_config()
        AdapterStore.make_root(config.store)
        backbone = load_backbone(config)
        # After the backbone, not beside it: the store's recovery and index (a walk of every task directory) run on
        # a thread of their own while the server already serves, and beside the backbone's load they only made
        # that slower (both are Python under one GIL).
        opened = open_store(config)
    except (BackboneError, StoreError) as exc:
        print(f"lpt-serve: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    app = create_app(settings, backbone=backbone, opened_store=opened, server_process=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, log_level=settings.log_level,
                timeout_graceful_shutdown=int(settings.request_timeout_s))


if __name__ == "__main__":
    main()
