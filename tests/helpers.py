"""Builders shared by the tests: random adapters for a backbone, written where a store or a request wants them."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import torch

from server.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, TaskAdapter, label_word_ids
from server.backbone import Backbone


def make_adapter(
    backbone: Backbone, task: str, *, seed: int = 0, labels: list[str] | None = None, **overrides
) -> TaskAdapter:
    settings = {"generator": "npg", "prompt_layer": backbone.num_layers // 2, "prompt_length": 5, "bottleneck": 16}
    settings.update(overrides)
    config = AdapterConfig(
        task=task, labels=labels or ["neg", "pos"], backbone=backbone.fingerprint.as_dict(), **settings
    )
    word_ids, problems = label_word_ids(config, backbone.tokenizer)
    assert not problems, problems
    torch.manual_seed(seed)
    adapter = TaskAdapter(config, word_ids)
    # Random heads near zero give near-uniform probabilities; scale them so tests see real differences.
    with torch.no_grad():
        for p in adapter.parameters():
            p.mul_(4.0)
    return adapter.eval()


def adapter_files(adapter: TaskAdapter, folder: Path) -> tuple[bytes, bytes]:
    adapter.save(folder)
    return (folder / CONFIG_NAME).read_bytes(), (folder / WEIGHTS_NAME).read_bytes()


@asynccontextmanager
async def serving(app):
    """The app started (lifespan) with an in-process client."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://lpt"
        ) as client,
    ):
        yield client


def wait_ready(url: str, alive: Callable[[], str | None], timeout: float = 60.0) -> None:
    """Poll `/readyz` until 200; `alive()` returns why the server is gone (then we stop waiting), or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gone = alive()
        if gone is not None:
            raise RuntimeError(gone)
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready within {timeout:.0f}s")
