"""`lpt-serve` SIGKILLed at random moments while uploads stream in: after each restart it is ready, serves the
last acknowledged upload (or the one in flight, if its commit landed), and recovery left nothing behind.

tests/serving/test_store.py kills a store mid-commit at each named stage; this is the same fault through the whole
server, at moments nobody chose. Marked slow: six server starts."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from lpt_serve.format import WEIGHTS_NAME
from lpt_serve.serving.store import STATE_TMP_NAME, AdapterStore
from tests.helpers import ADMIN_TOKEN, ServerProcess, adapter_files, make_adapter

pytestmark = pytest.mark.slow

ITERATIONS = 5
KEEP = 3


class Uploader(threading.Thread):
    """Uploads new versions of `alpha` back to back until the server goes away."""

    def __init__(self, url: str, uploads: list[tuple[bytes, bytes]]) -> None:
        super().__init__(name="uploader", daemon=True)
        self.url, self.uploads = url, uploads
        self.acked: list[tuple[int, bytes]] = []  # (version, weights) answered 201
        self.in_flight: bytes | None = None  # weights of the upload the kill interrupted, if any
        self.unexpected: list[str] = []

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=30) as client:
            for i in range(10_000):
                config_bytes, weights_bytes = self.uploads[i % len(self.uploads)]
                self.in_flight = weights_bytes
                files = {"config": ("c.json", config_bytes), "weights": ("w.safetensors", weights_bytes)}
                try:
                    r = client.put("/admin/tasks/alpha", files=files)
                except httpx.TransportError:
                    return  # killed
                if r.status_code != 201:
                    self.unexpected.append(f"{r.status_code} {r.text}")
                    return
                self.acked.append((r.json()["version"], weights_bytes))
                self.in_flight = None


def served_on_disk(store: Path) -> tuple[int, bytes]:
    record = AdapterStore.read_only(store).get("alpha")
    return record.current, (record.path() / WEIGHTS_NAME).read_bytes()


def test_kill_9_during_uploads_then_restart(tiny_backbone, tiny_folder, tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = make_adapter(tiny_backbone, "alpha", seed=0).save(tmp_path / "first")
    AdapterStore(store).commit_dir("alpha", first)
    # Distinct weights per upload, so the files on disk say which upload is served.
    uploads = [adapter_files(make_adapter(tiny_backbone, "alpha", seed=s, bottleneck=64), tmp_path / f"u{s}")
               for s in range(1, 9)]
    last_acked = served_on_disk(store)
    chance = random.Random(20261130)
    flags = ["--keep-versions", str(KEEP), "--no-seed-demo-tasks", "--no-warmup"]
    total_acked = 0

    server = ServerProcess(tiny_folder, store, extra_flags=flags)
    try:
        for _ in range(ITERATIONS):
            uploader = Uploader(server.url, uploads)
            uploader.start()
            time.sleep(chance.uniform(0.1, 0.8))
            server.proc.send_signal(signal.SIGKILL)
            server.proc.communicate(timeout=30)
            uploader.join(timeout=30)
            assert not uploader.is_alive()
            assert uploader.unexpected == []
            total_acked += len(uploader.acked)
            if uploader.acked:
                last_acked = uploader.acked[-1]

            server = ServerProcess(tiny_folder, store, extra_flags=flags)  # waits for /readyz
            version, weights_bytes = served_on_disk(store)
            # Never behind an acknowledgement; ahead only by the one upload whose commit landed before the kill.
            if (version, weights_bytes) != last_acked:
                assert version > last_acked[0] and weights_bytes == uploader.in_flight, (version, last_acked[0])
                last_acked = (version, weights_bytes)
            info = httpx.get(f"{server.url}/tasks/alpha", timeout=10).json()
            assert info["version"] == version
            r = httpx.post(f"{server.url}/classify/alpha", json={"text": "good"}, timeout=10)
            assert r.status_code == 200 and r.json()["version"] == version
            # Recovery left nothing half-done behind.
            assert list((store / ".tmp").iterdir()) == []
            assert not (store / "alpha" / STATE_TMP_NAME).exists()
        assert total_acked > 0, "no upload was ever acknowledged: the kills came too early to test anything"

        # The store still works: one more upload, and retention holds the task to its last KEEP versions.
        config_bytes, weights_bytes = uploads[0]
        files = {"config": ("c.json", config_bytes), "weights": ("w.safetensors", weights_bytes)}
        r = httpx.put(f"{server.url}/admin/tasks/alpha", files=files, timeout=30,
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 201 and r.json()["version"] > last_acked[0]
        record = AdapterStore.read_only(store).get("alpha")
        assert record.versions == record.history and len(record.history) == KEEP
        assert sorted(p.name for p in (store / "alpha").iterdir() if p.name.startswith("v")) == sorted(
            f"v{v}" for v in record.history)
    finally:
        server.stop()
