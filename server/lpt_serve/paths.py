"""Where lpt-serve keeps things on disk. Nothing writable lives inside the installed package."""

from __future__ import annotations

from pathlib import Path

import platformdirs

APP_NAME = "lpt-serve"


def default_store_dir() -> Path:
    """The writable adapter store when neither `--store` nor `LPT_STORE` names one: ~/.local/share/lpt-serve/store
    on Linux (the per-user data directory)."""
    return Path(platformdirs.user_data_dir(APP_NAME)) / "store"


def demo_adapters_dir() -> Path | None:
    """The shipped demo adapters (read-only seed data): inside a wheel they are `lpt_serve/demo_adapters`; in a
    checkout (editable install) they are the repository's `adapters_store/`. None if neither exists."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "demo_adapters", here.parents[1] / "adapters_store"):
        if candidate.is_dir():
            return candidate
    return None
