"""The load generator's aiohttp engine counts outcomes exactly as the httpx one does, against a real socket server.

The server numbers requests from 1 and answers by that number: a 503, a connection dropped mid-answer, a 200 that
is not a prediction, a proper prediction for another task, a prediction missing its fields, or a proper answer.
Both engines must report the same counts, also under a path prefix (a server behind a proxy at /lpt).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from lpt_client import loadgen

REQUESTS = 80
PREDICTION = {"label": "pos", "score": 0.9, "scores": {"pos": 0.9, "neg": 0.1}, "truncated": False}


def expected_outcome(n: int) -> str:
    if n % 5 == 0:
        return "503"
    if n % 7 == 0:
        return "connection"
    if n % 11 == 0 or n % 13 == 0 or n % 17 == 0:
        return "invalid_response"
    return "ok"


@pytest.fixture(params=["", "/lpt"], ids=["root", "prefix"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, dict]]:
    prefix = request.param
    state: dict = {"n": 0, "bodies": []}

    async def classify(request: web.Request) -> web.StreamResponse:
        state["n"] += 1
        n = state["n"]
        state["bodies"].append((request.match_info["task"], json.loads(await request.read())))
        task = request.match_info["task"]
        if n % 5 == 0:
            return web.json_response({"error": {"type": "overloaded", "message": "full"}}, status=503)
        if n % 7 == 0:
            request.transport.close()  # the client sees the connection die before any answer
            return web.Response()
        if n % 11 == 0:
            return web.json_response({"unexpected": True})
        if n % 13 == 0:
            return web.json_response({"task": "someone-else", "version": 1, "predictions": [PREDICTION]})
        if n % 17 == 0:
            return web.json_response({"task": task, "version": 1, "predictions": [{"label": "pos"}]})
        return web.json_response({"task": task, "version": 1, "predictions": [PREDICTION]})

    app = web.Application()
    app.router.add_post(prefix + "/classify/{task}", classify)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    try:
        yield str(test_server.make_url("")).rstrip("/") + prefix, state
    finally:
        await test_server.close()


@pytest.mark.parametrize("engine", ["aiohttp", "httpx"])
async def test_each_engine_counts_every_outcome(server: tuple[str, dict], engine: str) -> None:
    url, state = server
    tasks, texts = ["sst2", "agnews"], ["a", "b"]
    # One worker: the server's numbering is the request order, so each request's outcome is known.
    report = await loadgen.run_load(url, tasks, texts, 1, total_requests=REQUESTS, engine=engine)

    expected: dict[str, int] = {}
    for n in range(1, REQUESTS + 1):
        expected[expected_outcome(n)] = expected.get(expected_outcome(n), 0) + 1
    assert state["n"] == REQUESTS  # no retries
    assert report.ok == expected.pop("ok")
    assert report.errors == expected
    assert all(task in tasks and body == {"text": body["text"]} and body["text"] in texts
               for task, body in state["bodies"])


async def test_auto_is_aiohttp_without_a_transport_and_httpx_with_one(server: tuple[str, dict]) -> None:
    url, _ = server
    assert loadgen._pick_engine("auto", None) == "aiohttp"
    transport = httpx.AsyncHTTPTransport()
    assert loadgen._pick_engine("auto", transport) == "httpx"
    with pytest.raises(ValueError, match="engine='httpx'"):
        await loadgen.run_load(url, ["a"], ["t"], 1, total_requests=1, engine="aiohttp", transport=transport)
    with pytest.raises(ValueError, match="engine must be"):
        await loadgen.run_load(url, ["a"], ["t"], 1, total_requests=1, engine="curl")  # type: ignore[arg-type]


def test_the_command_line_takes_an_engine(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        loadgen._parse_args(["--url", "http://x", "--tasks", "a", "--engine", "curl"])
    assert "invalid choice" in capsys.readouterr().err
    assert loadgen._parse_args(["--url", "http://x", "--tasks", "a", "--engine", "httpx"]).engine == "httpx"
