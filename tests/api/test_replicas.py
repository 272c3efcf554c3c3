"""Three `lpt-serve` processes on one store converge: a change made through any of them is served by all three
within 2 s, classification keeps answering while it happens, and a replica killed and restarted serves the store's
current versions."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.helpers import ADMIN_TOKEN, ServerProcess, adapter_files, make_adapter

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CONVERGE_WITHIN_S = 2.0


class Traffic:
    """Clients classifying `alpha` and `beta` on every replica in turn until stopped; counts every answer."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(3)]
        for t in self._threads:
            t.start()

    def _run(self, offset: int) -> None:
        with httpx.Client(timeout=10) as client:
            i = offset
            while not self._stop.is_set():
                url = self.urls[i % len(self.urls)]
                task = ("alpha", "beta")[i % 2]
                i += 1
                try:
                    r = client.post(f"{url}/classify/{task}", json={"texts": ["a fine day", "rain again"]})
                except httpx.HTTPError as e:
                    self.failures.append(f"{url}: {e!r}")
                    continue
                self.statuses[r.status_code] += 1
                if r.status_code != 200:
                    self.failures.append(f"{url} {task}: {r.status_code} {r.text[:200]}")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def version_served(url: str, task: str) -> int | None:
    r = httpx.post(f"{url}/classify/{task}", json={"text": "a fine day"}, timeout=10)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return r.json()["version"]


def seconds_until_all(urls: list[str], task: str, version: int | None) -> float:
    """Seconds from now until every replica answers `task` with `version` (None: 404); fails past 10 s."""
    started = time.monotonic()
    pending = set(urls)
    while pending and time.monotonic() - started < 10:
        pending = {url for url in pending if version_served(url, task) != version}
        if pending:
            time.sleep(0.02)
    assert not pending, f"{sorted(pending)} still do not serve {task} v{version}"
    return time.monotonic() - started


def upload(url: str, task: str, files: tuple[bytes, bytes]) -> int:
    config, weights = files
    r = httpx.put(f"{url}/admin/tasks/{task}", headers=ADMIN, timeout=30,
                  files={"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)})
    assert r.status_code == 201, r.text
    return r.json()["version"]


@pytest.mark.slow
def test_three_replicas_converge_on_one_store(tiny_folder, tiny_backbone, store_root, tmp_path):
    replicas = [ServerProcess(tiny_folder, store_root) for _ in range(3)]
    try:
        run_the_changes(replicas, tiny_folder, tiny_backbone, store_root, tmp_path)
    finally:
        for replica in replicas:
            replica.stop(signal.SIGKILL)


def run_the_changes(replicas, tiny_folder, tiny_backbone, store_root, tmp_path) -> None:
    urls = [r.url for r in replicas]
    alpha_v2 = adapter_files(make_adapter(tiny_backbone, "alpha", seed=10), tmp_path / "alpha-v2")
    alpha_v3 = adapter_files(make_adapter(tiny_backbone, "alpha", seed=11), tmp_path / "alpha-v3")
    gamma = adapter_files(make_adapter(tiny_backbone, "gamma", seed=12), tmp_path / "gamma")
    traffic = Traffic(urls)
    try:
        time.sleep(0.3)  # traffic is flowing on every replica before the first change
        lag = {}
        assert upload(urls[0], "alpha", alpha_v2) == 2
        lag["upload"] = seconds_until_all(urls, "alpha", 2)

        r = httpx.post(f"{urls[1]}/admin/tasks/alpha/rollback", headers=ADMIN, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
        lag["rollback"] = seconds_until_all(urls, "alpha", 1)

        assert upload(urls[2], "gamma", gamma) == 1
        lag["new task"] = seconds_until_all(urls, "gamma", 1)
        r = httpx.delete(f"{urls[0]}/admin/tasks/gamma", headers=ADMIN, timeout=30)
        assert r.status_code == 204, r.text
        lag["delete"] = seconds_until_all(urls, "gamma", None)
        # Every replica's own admin routes agree with its classify: gamma is gone for each of them.
        for url in urls:
            assert httpx.post(f"{url}/admin/tasks/gamma/rollback", headers=ADMIN).status_code == 404
        assert all(seconds <= CONVERGE_WITHIN_S for seconds in lag.values()), lag
    finally:
        traffic.stop()
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.statuses[200] > 30  # the traffic really ran during the changes

    # The replicas report the one generation they all serve.
    generations = {httpx.get(f"{url}/readyz").json()["store_generation"] for url in urls}
    assert len(generations) == 1 and generations.pop() > 0

    # kill -9 one replica, change the store while it is down, restart it: it serves the current versions.
    replicas[2].stop(signal.SIGKILL)
    assert upload(urls[0], "alpha", alpha_v3) == 3
    replicas[2] = ServerProcess(tiny_folder, store_root)
    urls[2] = replicas[2].url
    assert version_served(urls[2], "alpha") == 3
    assert version_served(urls[2], "gamma") is None
