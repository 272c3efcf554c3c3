"""Builders shared by the tests: random adapters for a backbone, and the server three ways (in process, real
uvicorn in a thread, `lpt-serve` in a subprocess)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import torch
import uvicorn

from lpt_serve.format import CONFIG_NAME, WEIGHTS_NAME
from lpt_serve.model.adapter import AdapterConfig, TaskAdapter, label_word_ids
from lpt_serve.model.backbone import Backbone

ADMIN_TOKEN = "test-admin-token"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """The app under real uvicorn in a background thread."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        wait_ready(self.url, lambda: None if self.thread.is_alive() else "uvicorn stopped while starting")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ServerProcess:
    """`lpt-serve` (or `script`, run with `python -c`) in a subprocess on a free port, admin token set."""

    def __init__(self, backbone_dir: Path, store: Path, *, script: str | None = None, script_args: Sequence[str] = (),
                 max_wait_ms: float = 2, extra_flags: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = ["--backbone", str(backbone_dir), "--store", str(store), "--port", str(self.port),
                 "--max-wait-ms", str(max_wait_ms), "--log-level", "warning", *extra_flags]
        command = ([sys.executable, "-c", script, *script_args, *flags] if script
                   else [sys.executable, "-m", "lpt_serve.api.main", *flags])
        environment = os.environ | {"LPT_ADMIN_TOKEN": ADMIN_TOKEN} | (env or {})
        self.proc = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        def gone() -> str | None:
            return None if self.proc.poll() is None else f"server exited: {self.proc.stderr.read()}"

        try:
            wait_ready(self.url, gone)
        except BaseException:
            self.proc.kill()  # never leave a half-started server behind
            self.proc.communicate()
            raise

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Send `sig`, wait for the exit; answer what the server wrote on stderr."""
        self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err
