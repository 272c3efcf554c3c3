"""Builders shared by the tests: random adapters for a backbone, written where a store or a request wants them."""

from __future__ import annotations

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
