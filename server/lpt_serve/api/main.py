"""`lpt-serve`: start the server. Every setting is a flag here and an `LPT_*` environment variable."""

from __future__ import annotations

import argparse
import logging
import sys
import typing

from lpt_serve.api.settings import Settings
from pydantic import ValidationError

log = logging.getLogger("lpt_serve.api.main")


def _flag_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    if typing.get_origin(base) is typing.Annotated:
        base = typing.get_args(base)[0]
    return base


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpt-serve",
        description="Serve many LPT text classifiers on one frozen encoder. Loads every adapter in the store, "
                    "batches requests for different tasks into one forward pass, and hot-swaps uploads. "
                    "Each flag can also be set as LPT_<FLAG> (e.g. LPT_PORT=9000); flags win.",
        epilog="Prefer LPT_ADMIN_TOKEN to --admin-token: a flag shows in `ps`. Logs are JSON lines "
               "on stderr unless --no-log-json. Docs: README.md, docs/architecture.md.",
        # Each help line states its own default; argparse's defaults formatter would add a second "(default: None)".
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        base = _flag_type(field.annotation)
        default = field.default if field.default_factory is None else field.default_factory()
        help_text = field.description or ""
        if name == "admin_token":
            parser.add_argument(flag, default=None, help=help_text + " (prefer the LPT_ADMIN_TOKEN variable)")
        elif base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default {default})")
        elif typing.get_origin(base) is list:
            parser.add_argument(flag, default=None, help=f"{help_text}, comma-separated")
        else:
            parser.add_argument(flag, default=None, help=f"{help_text} (default {default})")
    return parser


def load_settings(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            lines.append(f"--{where.replace('_', '-')} / LPT_{where.upper()}: {err['msg']}")
        print("lpt-serve: invalid settings:\n  " + "\n  ".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(argv)
    from lpt_serve.api import logs

    logs.configure(settings.log_level, settings.log_json)
    import uvicorn
    from lpt_serve.api.app import create_app
    from lpt_serve.errors import BackboneError
    from lpt_serve.model.backbone import Backbone

    try:
        # Load here, not in the lifespan, so a bad backbone ends with one sentence instead of a startup trace.
        backbone = Backbone.load(settings.backbone, device=settings.device, dtype=settings.dtype)
    except BackboneError as exc:
        print(f"lpt-serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    app = create_app(settings, backbone=backbone)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, log_level=settings.log_level,
                timeout_graceful_shutdown=int(settings.request_timeout_s))


if __name__ == "__main__":
    main()
