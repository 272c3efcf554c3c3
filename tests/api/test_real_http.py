"""Real HTTP: `lpt-serve` under uvicorn in a subprocess, driven by the Python client and the `lpt` CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from lpt_client import AsyncLptClient, LptClient, TaskNotFoundError
from tests.helpers import ADMIN_TOKEN, ServerProcess, make_adapter

TOKEN = ADMIN_TOKEN

# Started in place of `lpt-serve` when a test wants the server to die mid-upload: the store's test seam blocks
# the upload halfway through writing the weights and leaves a marker, and the test kills the process there.
CRASHING_SERVER = """
import sys, time, pathlib
import lpt_serve.serving.store as store
marker = pathlib.Path(sys.argv[1])
def block(stage):
    if stage == "write-weights":
        marker.write_text(stage)
        time.sleep(3600)
store._crash_hook = block
from lpt_serve.api.main import main
main(sys.argv[2:])
"""


def test_client_over_real_http(server, tiny_backbone, tmp_path):
    with LptClient(server.url, admin_token=TOKEN) as client:
        result = client.classify("alpha", ["good film", "bad"])
        assert result.task == "alpha" and len(result.predictions) == 2
        assert {t.task for t in client.tasks()} == {"alpha", "beta"}
        mixed = client.classify_many([("beta", "good"), ("alpha", "good")])
        assert [p.task for p in mixed] == ["beta", "alpha"]
        folder = make_adapter(tiny_backbone, "alpha", seed=42).save(tmp_path / "new")
        assert client.upload("alpha", folder).version == 2
        assert client.classify("alpha", "good").version == 2
        assert client.rollback("alpha").version == 1
        client.delete("beta")
        with pytest.raises(TaskNotFoundError):
            client.classify("beta", "good")
        assert client.ready() and client.healthz()


def test_concurrent_clients_over_real_http(server):
    async def run():
        async with AsyncLptClient(server.url) as client:
            calls = [client.classify(task, [f"good film {i}", "bad"]) for i in range(40) for task in ("alpha", "beta")]
            return await asyncio.gather(*calls)

    results = asyncio.run(run())
    assert len(results) == 80 and all(len(r.predictions) == 2 for r in results)


def test_lpt_cli_talks_to_the_server(server, tiny_backbone, tmp_path):
    env = os.environ | {"LPT_URL": server.url, "LPT_ADMIN_TOKEN": TOKEN}

    def lpt(*args):
        return subprocess.run(
            [sys.executable, "-m", "lpt_serve.cli", *args], env=env, capture_output=True, text=True, timeout=60
        )

    done = lpt("classify", "alpha", "good film", "bad")
    assert done.returncode == 0 and len(done.stdout.strip().splitlines()) == 2
    assert "alpha" in lpt("tasks").stdout
    folder = make_adapter(tiny_backbone, "alpha", seed=3).save(tmp_path / "u")
    assert json.loads(lpt("upload", "gamma", str(folder)).stdout) == {"task": "gamma", "version": 1}
    missing = lpt("classify", "nope", "x")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "nope" in missing.stderr


def test_graceful_shutdown_finishes_requests_in_flight(tiny_folder, store_root):
    # A long batching window keeps the request queued inside the server when SIGTERM arrives.
    srv = ServerProcess(tiny_folder, store_root, max_wait_ms=1500)
    result: dict = {}

    def client():
        result["response"] = httpx.post(f"{srv.url}/classify/alpha", json={"texts": ["good film"] * 8}, timeout=30)

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(0.5)
    srv.stop(signal.SIGTERM)
    thread.join(timeout=30)
    assert result["response"].status_code == 200
    assert len(result["response"].json()["predictions"]) == 8
    assert srv.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/healthz")


def test_crash_mid_upload_keeps_the_last_good_version(tiny_folder, tiny_backbone, store_root, tmp_path):
    marker = tmp_path / "blocked"
    crashing = ServerProcess(tiny_folder, store_root, script=CRASHING_SERVER, script_args=[str(marker)])
    folder = make_adapter(tiny_backbone, "alpha", seed=9).save(tmp_path / "new")
    before = httpx.post(crashing.url + "/classify/alpha", json={"text": "good"}).json()

    def upload():
        with contextlib.suppress(Exception):  # the server dies under it: that is the point
            LptClient(crashing.url, admin_token=TOKEN, max_retries=0).upload("alpha", folder)

    uploader = threading.Thread(target=upload)
    uploader.start()
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the upload never reached the weights write"
    crashing.stop(signal.SIGKILL)
    uploader.join(timeout=30)
    staged = list((store_root / ".tmp").iterdir())
    assert staged, "the kill should have left a half-written staging entry behind"

    restarted = ServerProcess(tiny_folder, store_root)
    try:
        with LptClient(restarted.url, admin_token=TOKEN) as client:
            assert client.task("alpha").version == 1
            after = client.classify("alpha", "good")
            assert after.model_dump()["predictions"][0]["scores"] == before["predictions"][0]["scores"]
            assert not any((store_root / ".tmp").iterdir())
            assert sorted(p.name for p in (store_root / "alpha").iterdir()) == ["state.json", "v1"]
            assert client.upload("alpha", folder).version == 2  # and the store takes uploads again
    finally:
        restarted.stop()


def test_bad_settings_fail_with_a_sentence(tiny_folder, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lpt_serve.api.main", "--max-batch-size", "0", "--store", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--max-batch-size" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "lpt_serve.api.main", "--backbone", str(tmp_path / "none"), "--store", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "not a model folder" in done.stderr and "Traceback" not in done.stderr


def test_serve_help_explains_itself():
    done = subprocess.run([sys.executable, "-m", "lpt_serve.api.main", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    for flag in ("--host", "--port", "--store", "--max-batch-size", "--max-wait-ms", "--admin-token", "LPT_"):
        assert flag in done.stdout


def test_rows_of_a_client_that_hung_up_are_dropped(tiny_folder, store_root):
    srv = ServerProcess(tiny_folder, store_root, max_wait_ms=1000, extra_flags=["--log-level", "info"])
    err = ""
    try:
        body = json.dumps({"texts": ["good film", "bad", "it was"]}).encode()
        request = (f"POST /classify/alpha HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(request)
            time.sleep(0.3)  # the rows are queued, waiting for the batch window
        time.sleep(1.5)
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'lpt_rows_dropped_total{reason="cancelled"} 3.0' in metrics
        assert httpx.post(srv.url + "/classify/alpha", json={"text": "good"}, timeout=10).status_code == 200
    finally:
        err = srv.stop()
    # A client hanging up is routine: one info line, no error and no trace in the log.
    assert err.count("client went away") == 1, err
    assert "Traceback" not in err and '"trace"' not in err and '"level": "error"' not in err
