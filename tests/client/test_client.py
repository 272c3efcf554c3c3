"""Contract tests for lpt_client.client and lpt_client.loadgen against an httpx.MockTransport server.

Most tests run twice, once per client (sync and async), through the `h` harness, so both are held to the
same contract.
"""

from __future__ import annotations

import asyncio
import datetime
import email
import email.policy
import email.utils
import inspect
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import lpt_client
from lpt_client import (
    AsyncLptClient,
    AuthError,
    BadAdapterError,
    ClassifyResult,
    LptClient,
    LptConnectionError,
    LptError,
    MixedPrediction,
    OverloadedError,
    PayloadTooLargeError,
    Prediction,
    ServerError,
    ServerTimeoutError,
    TaskInfo,
    TaskNotFoundError,
    UnexpectedResponseError,
    UploadResult,
    ValidationError,
    loadgen,
)
from lpt_client.client import _parse_retry_after

BASE = "http://lpt.test"
TOKEN = "s3cret"


# ------------------------------------------------------------------------------------------------- helpers


def pred(label: str = "pos", score: float = 0.9, truncated: bool = False) -> dict[str, Any]:
    other = "neg" if label == "pos" else "pos"
    return {"label": label, "score": score, "scores": {label: score, other: 1 - score}, "truncated": truncated}


def task_info(name: str = "sst2", **extra: Any) -> dict[str, Any]:
    return {
        "task": name,
        "version": 3,
        "versions": [1, 2, 3],
        "labels": ["neg", "pos"],
        "generator": "lstm",
        "prompt_layer": 6,
        "prompt_length": 16,
        "head": "verbalizer",
        "parameters": 263_000,
        "location": "gpu",
        "pinned": False,
        **extra,
    }


def error(status: int, type_: str, message: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json={"error": {"type": type_, "message": message}}, headers=headers)


def multipart_fields(request: httpx.Request) -> dict[str, tuple[str | None, str, bytes]]:
    """field name -> (filename, content type, bytes), parsed with the stdlib MIME parser."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + request.content, policy=email.policy.HTTP)
    assert message.is_multipart()
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = (part.get_filename(), part.get_content_type(), part.get_payload(decode=True))
    return fields


class MockServer:
    """Answers each request with the next queued reply (a Response, or an exception to raise) and records it."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.replies: list[httpx.Response | Exception] = []

    def reply(self, *replies: httpx.Response | Exception) -> MockServer:
        self.replies.extend(replies)
        return self

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert self.replies, f"unexpected request {request.method} {request.url}"
        item = self.replies.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content)


class Harness:
    """Builds a sync or async client on a MockServer and calls it uniformly from async tests."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.server = MockServer()
        self.sleeps: list[float] = []
        self._clients: list[LptClient | AsyncLptClient] = []
        self.client = self.make()

    def make(self, **kwargs: Any) -> LptClient | AsyncLptClient:
        kwargs.setdefault("admin_token", TOKEN)
        kwargs.setdefault("rng", random.Random(1234))
        client: LptClient | AsyncLptClient
        if self.kind == "sync":
            transport = httpx.MockTransport(self.server)
            client = LptClient(BASE, transport=transport, sleep=self.sleeps.append, **kwargs)
        else:

            async def sleep(seconds: float) -> None:
                self.sleeps.append(seconds)

            client = AsyncLptClient(BASE, transport=httpx.MockTransport(self.server), sleep=sleep, **kwargs)
        self._clients.append(client)
        self.client = client
        return client

    async def call(self, method: str, *args: Any) -> Any:
        result = getattr(self.client, method)(*args)
        return await result if inspect.isawaitable(result) else result

    async def close(self) -> None:
        for client in self._clients:
            if isinstance(client, AsyncLptClient):
                await client.aclose()
            else:
                client.close()


@pytest.fixture(params=["sync", "async"])
async def h(request: pytest.FixtureRequest) -> Any:
    harness = Harness(request.param)
    yield harness
    await harness.close()


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "sst2-adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_bytes(b'{"task": "sst2", "labels": ["neg", "pos"]}')
    # Binary with NULs, CR/LF and high bytes, to prove the weights travel byte for byte.
    (directory / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}\r\n\xff\xfe" * 10)
    return directory


# ------------------------------------------------------------------------------------ requests and parsing


async def test_classify_single_text(h: Harness) -> None:
    h.server.reply(httpx.Response(200, json={"task": "sst2", "version": 3, "predictions": [pred("pos", 0.8)]}))
    result = await h.call("classify", "sst2", "great movie")

    req = h.server.last
    assert (req.method, req.url.path) == ("POST", "/classify/sst2")
    assert h.server.body() == {"text": "great movie"}
    assert req.headers["content-type"] == "application/json"
    assert "authorization" not in req.headers  # the admin token never rides along on ordinary traffic
    assert isinstance(result, ClassifyResult)
    assert (result.task, result.version) == ("sst2", 3)
    (prediction,) = result.predictions
    assert isinstance(prediction, Prediction)
    assert (prediction.label, prediction.score, prediction.truncated) == ("pos", 0.8, False)
    assert prediction.scores == {"pos": 0.8, "neg": pytest.approx(0.2)}


async def test_classify_batch_keeps_order(h: Harness) -> None:
    body = {"task": "sst2", "version": 1, "predictions": [pred("neg", 0.7), pred("pos", 0.6, truncated=True)]}
    h.server.reply(httpx.Response(200, json=body))
    result = await h.call("classify", "sst2", ("awful", "fine " * 1000))

    assert h.server.body() == {"texts": ["awful", "fine " * 1000]}
    assert [p.label for p in result.predictions] == ["neg", "pos"]
    assert [p.truncated for p in result.predictions] == [False, True]


async def test_classify_rejects_non_string_texts_without_a_request(h: Harness) -> None:
    with pytest.raises(TypeError):
        await h.call("classify", "sst2", ["ok", 3])
    with pytest.raises(TypeError):
        await h.call("classify", "sst2", b"bytes are not text")
    with pytest.raises(ValueError):
        await h.call("classify", "", "text")
    assert h.server.requests == []


async def test_classify_prediction_count_mismatch_is_an_error(h: Harness) -> None:
    h.server.reply(httpx.Response(200, json={"task": "sst2", "version": 1, "predictions": [pred()]}))
    with pytest.raises(UnexpectedResponseError, match="sent 2 texts but got 1"):
        await h.call("classify", "sst2", ["a", "b"])


async def test_malformed_success_body_is_an_error(h: Harness) -> None:
    h.server.reply(httpx.Response(200, text="<html>proxy</html>"))
    with pytest.raises(UnexpectedResponseError) as info:
        await h.call("classify", "sst2", "a")
    assert (info.value.status, info.value.type) == (200, "invalid_response")


async def test_task_name_is_path_quoted(h: Harness) -> None:
    h.server.reply(httpx.Response(200, json={"task": "a/b c", "version": 1, "predictions": [pred()]}))
    await h.call("classify", "a/b c", "x")
    assert h.server.last.url.raw_path == b"/classify/a%2Fb%20c"


async def test_classify_many(h: Harness) -> None:
    predictions = [
        {"task": "sst2", "version": 3, **pred("pos")},
        {
            "task": "agnews",
            "version": 1,
            "label": "sports",
            "score": 0.5,
            "scores": {"sports": 0.5},
            "truncated": False,
        },
    ]
    h.server.reply(httpx.Response(200, json={"predictions": predictions}))
    result = await h.call("classify_many", [("sst2", "good"), ("agnews", "goal!")])

    assert (h.server.last.method, h.server.last.url.path) == ("POST", "/classify")
    assert h.server.body() == {"items": [{"task": "sst2", "text": "good"}, {"task": "agnews", "text": "goal!"}]}
    assert all(isinstance(p, MixedPrediction) for p in result)
    assert [(p.task, p.version, p.label) for p in result] == [("sst2", 3, "pos"), ("agnews", 1, "sports")]


async def test_classify_many_count_mismatch(h: Harness) -> None:
    h.server.reply(httpx.Response(200, json={"predictions": []}))
    with pytest.raises(UnexpectedResponseError):
        await h.call("classify_many", [("sst2", "good")])


async def test_tasks_and_task_keep_unknown_fields(h: Harness) -> None:
    h.server.reply(
        httpx.Response(200, json={"tasks": [task_info("sst2"), task_info("agnews", location="disk", pinned=True)]}),
        httpx.Response(200, json=task_info("sst2", p99_ms=12.5)),
    )
    tasks = await h.call("tasks")
    assert (h.server.last.method, h.server.last.url.path) == ("GET", "/tasks")
    assert [(t.task, t.location, t.pinned) for t in tasks] == [("sst2", "gpu", False), ("agnews", "disk", True)]
    assert all(isinstance(t, TaskInfo) for t in tasks)

    info = await h.call("task", "sst2")
    assert h.server.last.url.path == "/tasks/sst2"
    assert (info.versions, info.labels, info.prompt_layer, info.parameters) == ([1, 2, 3], ["neg", "pos"], 6, 263_000)
    assert info.model_extra == {"p99_ms": 12.5}
    assert info.model_dump()["p99_ms"] == 12.5


async def test_upload_sends_multipart_with_bearer(h: Harness, adapter_dir: Path) -> None:
    h.server.reply(httpx.Response(201, json={"task": "sst2", "version": 4}))
    result = await h.call("upload", "sst2", str(adapter_dir))

    req = h.server.last
    assert (req.method, req.url.path) == ("PUT", "/admin/tasks/sst2")
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert req.headers["content-type"].startswith("multipart/form-data; boundary=")
    fields = multipart_fields(req)
    assert set(fields) == {"config", "weights"}
    assert fields["config"] == (
        "adapter_config.json",
        "application/json",
        (adapter_dir / "adapter_config.json").read_bytes(),
    )
    assert fields["weights"][0] == "adapter_model.safetensors"
    assert fields["weights"][2] == (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert result == UploadResult(task="sst2", version=4)


async def test_upload_missing_files_fail_before_any_request(h: Harness, adapter_dir: Path, tmp_path: Path) -> None:
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing adapter_model.safetensors"):
        await h.call("upload", "sst2", adapter_dir)
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        await h.call("upload", "sst2", tmp_path / "nope")
    assert h.server.requests == []


async def test_delete_and_rollback(h: Harness) -> None:
    h.server.reply(httpx.Response(204), httpx.Response(200, json={"task": "sst2", "version": 2}))
    assert await h.call("delete", "sst2") is None
    assert (h.server.last.method, h.server.last.url.path) == ("DELETE", "/admin/tasks/sst2")
    assert h.server.last.headers["authorization"] == f"Bearer {TOKEN}"

    result = await h.call("rollback", "sst2")
    assert (h.server.last.method, h.server.last.url.path) == ("POST", "/admin/tasks/sst2/rollback")
    assert h.server.last.headers["authorization"] == f"Bearer {TOKEN}"
    assert result == UploadResult(task="sst2", version=2)


async def test_admin_without_token_sends_no_header_and_maps_401(h: Harness) -> None:
    h.make(admin_token=None)
    h.server.reply(error(401, "unauthorized", "missing bearer token"))
    with pytest.raises(AuthError) as info:
        await h.call("delete", "sst2")
    assert "authorization" not in h.server.last.headers
    assert (info.value.status, info.value.type, info.value.message) == (401, "unauthorized", "missing bearer token")


@pytest.mark.parametrize("method, path", [("healthz", "/healthz"), ("ready", "/readyz")])
async def test_probes(h: Harness, method: str, path: str) -> None:
    h.server.reply(
        httpx.Response(200, json={"status": "ok"}),
        error(503, "not_ready", "loading backbone", retry_after="5"),
        httpx.ConnectError("refused"),
    )
    assert await h.call(method) is True
    assert (h.server.last.method, h.server.last.url.path) == ("GET", path)
    assert await h.call(method) is False
    assert await h.call(method) is False
    # A probe reports the state now; it must not sit out Retry-After.
    assert len(h.server.requests) == 3
    assert h.sleeps == []


async def test_base_url_path_prefix_is_kept(h: Harness) -> None:
    client_cls = LptClient if h.kind == "sync" else AsyncLptClient
    client = client_cls("http://lpt.test/api/v1/", transport=httpx.MockTransport(h.server))  # type: ignore[arg-type]
    h._clients.append(client)
    h.client = client
    h.server.reply(httpx.Response(200, json={"tasks": []}))
    assert await h.call("tasks") == []
    assert h.server.last.url.path == "/api/v1/tasks"


# --------------------------------------------------------------------------------------------------- errors

ERROR_CASES = [
    (400, "bad_adapter", BadAdapterError),
    (401, "unauthorized", AuthError),
    (403, "forbidden", AuthError),
    (404, "unknown_task", TaskNotFoundError),
    (413, "too_large", PayloadTooLargeError),
    (422, "validation_error", ValidationError),
    (429, "overloaded", OverloadedError),
    (503, "overloaded", OverloadedError),
    (504, "timeout", ServerTimeoutError),
    (500, "internal", ServerError),
    (502, "bad_gateway", ServerError),
    (409, "conflict", LptError),
]


@pytest.mark.parametrize("status, type_, exc_class", ERROR_CASES)
async def test_error_status_maps_to_exception(h: Harness, status: int, type_: str, exc_class: type) -> None:
    h.make(max_retries=0)
    h.server.reply(error(status, type_, f"boom {status}", retry_after="7"))
    with pytest.raises(exc_class) as info:
        await h.call("classify", "sst2", "x")
    exc = info.value
    assert type(exc) is exc_class and isinstance(exc, LptError)
    assert (exc.status, exc.type, exc.message, exc.retry_after) == (status, type_, f"boom {status}", 7.0)
    assert str(exc) == f"HTTP {status} {type_}: boom {status}"


@pytest.mark.parametrize(
    "status, body, exc_class, type_, message",
    [
        (500, {"text": "Internal Server Error"}, ServerError, "http_500", "Internal Server Error"),
        (422, {"json": {"detail": [{"msg": "field required"}]}}, ValidationError, "http_422", "field required"),
        (404, {"json": {"error": "no such task"}}, TaskNotFoundError, "http_404", "no such task"),
        (502, {}, ServerError, "http_502", "Bad Gateway"),
    ],
)
async def test_undocumented_error_bodies_still_raise_with_text(
    h: Harness, status: int, body: dict[str, Any], exc_class: type, type_: str, message: str
) -> None:
    # Built per test: a Response's stream is bound to the first (sync or async) client that reads it.
    h.server.reply(httpx.Response(status, **body))
    with pytest.raises(exc_class) as info:
        await h.call("tasks")
    assert type(info.value) is exc_class
    assert info.value.type == type_
    assert message in info.value.message
    assert info.value.retry_after is None


def test_exception_hierarchy_and_exports() -> None:
    for cls in (
        ValidationError,
        TaskNotFoundError,
        BadAdapterError,
        PayloadTooLargeError,
        AuthError,
        OverloadedError,
        ServerTimeoutError,
        ServerError,
        UnexpectedResponseError,
        LptConnectionError,
    ):
        assert issubclass(cls, LptError)
    assert set(lpt_client.__all__) >= {"LptClient", "AsyncLptClient", "LptError", "TaskInfo", "UploadResult"}
    exc = LptError(429, "overloaded", "queue full", 1.5)
    assert exc.args == (429, "overloaded", "queue full", 1.5)


@pytest.mark.parametrize(
    "header, expected",
    [("3", 3.0), (" 1.5 ", 1.5), ("0", 0.0), ("-4", 0.0), ("soon", None), ("nan", None), ("inf", None), (None, None)],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert _parse_retry_after(header) == expected


def test_parse_retry_after_http_date() -> None:
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    future = email.utils.format_datetime(email.utils.localtime() + datetime.timedelta(seconds=60))
    assert 50 < (_parse_retry_after(future) or 0) <= 60


# -------------------------------------------------------------------------------------------------- retries


async def test_retries_honour_retry_after(h: Harness) -> None:
    h.server.reply(
        error(429, "overloaded", "queue full", retry_after="2"),
        error(503, "overloaded", "draining", retry_after="0.5"),
        httpx.Response(200, json={"task": "sst2", "version": 1, "predictions": [pred()]}),
    )
    result = await h.call("classify", "sst2", "x")
    assert result.predictions[0].label == "pos"
    assert h.sleeps == [2.0, 0.5]
    assert len(h.server.requests) == 3
    assert all(json.loads(r.content) == {"text": "x"} for r in h.server.requests)


async def test_retry_after_is_capped_by_max_retry_wait(h: Harness) -> None:
    h.make(max_retry_wait=1.0)
    h.server.reply(error(429, "overloaded", "later", retry_after="120"), httpx.Response(200, json={"tasks": []}))
    assert await h.call("tasks") == []
    assert h.sleeps == [1.0]


async def test_backoff_without_retry_after_is_exponential_with_jitter_then_raises_last(h: Harness) -> None:
    h.make(max_retries=3, backoff=0.1)
    h.server.reply(*(error(503, "overloaded", f"attempt {i}") for i in range(4)))
    with pytest.raises(OverloadedError) as info:
        await h.call("classify", "sst2", "x")
    assert info.value.message == "attempt 3"  # the last error, not the first
    assert len(h.server.requests) == 4  # 1 try + max_retries
    assert len(h.sleeps) == 3
    for attempt, wait in enumerate(h.sleeps):
        delay = 0.1 * 2**attempt
        assert delay / 2 <= wait <= delay
    assert len(set(h.sleeps)) == 3


async def test_backoff_is_capped_by_max_retry_wait(h: Harness) -> None:
    h.make(max_retries=2, backoff=10.0, max_retry_wait=3.0)
    h.server.reply(*(error(429, "overloaded", "full") for _ in range(3)))
    with pytest.raises(OverloadedError):
        await h.call("tasks")
    assert h.sleeps == [3.0, 3.0]


async def test_retry_exhaustion_keeps_retry_after(h: Harness) -> None:
    h.make(max_retries=1)
    h.server.reply(error(429, "overloaded", "a", retry_after="1"), error(429, "overloaded", "b", retry_after="4"))
    with pytest.raises(OverloadedError) as info:
        await h.call("classify_many", [("sst2", "x")])
    assert (info.value.message, info.value.retry_after) == ("b", 4.0)
    assert h.sleeps == [1.0]


async def test_max_retries_zero_does_not_retry(h: Harness) -> None:
    h.make(max_retries=0)
    h.server.reply(error(429, "overloaded", "full", retry_after="1"))
    with pytest.raises(OverloadedError):
        await h.call("classify", "sst2", "x")
    assert len(h.server.requests) == 1
    assert h.sleeps == []


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422, 500, 502, 504])
async def test_non_retryable_errors_are_not_retried(h: Harness, status: int) -> None:
    h.server.reply(error(status, "x", "no", retry_after="1"))
    with pytest.raises(LptError) as info:
        await h.call("classify", "sst2", "x")
    assert info.value.status == status
    assert len(h.server.requests) == 1
    assert h.sleeps == []


async def test_upload_retry_resends_identical_multipart(h: Harness, adapter_dir: Path) -> None:
    h.server.reply(
        error(503, "overloaded", "busy", retry_after="0"), httpx.Response(201, json={"task": "t", "version": 1})
    )
    assert (await h.call("upload", "t", adapter_dir)).version == 1
    first, second = h.server.requests
    assert multipart_fields(first) == multipart_fields(second)
    assert second.headers["authorization"] == f"Bearer {TOKEN}"
    assert h.sleeps == [0.0]


async def test_get_connection_errors_are_retried(h: Harness) -> None:
    h.make(backoff=0.2)
    h.server.reply(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.Response(200, json=task_info()))
    assert (await h.call("task", "sst2")).task == "sst2"
    assert len(h.server.requests) == 3
    assert 0.1 <= h.sleeps[0] <= 0.2 and 0.2 <= h.sleeps[1] <= 0.4


async def test_get_connection_errors_exhaust_retries(h: Harness) -> None:
    h.make(max_retries=2)
    h.server.reply(*(httpx.ConnectError("refused") for _ in range(3)))
    with pytest.raises(LptConnectionError) as info:
        await h.call("tasks")
    assert info.value.status == 0
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(h.server.requests) == 3 and len(h.sleeps) == 2


@pytest.mark.parametrize("method, args", [("classify", ("sst2", "x")), ("delete", ("sst2",)), ("rollback", ("sst2",))])
async def test_non_get_connection_errors_are_not_retried(h: Harness, method: str, args: tuple[Any, ...]) -> None:
    h.server.reply(httpx.ReadError("reset"))
    with pytest.raises(LptConnectionError, match="ReadError"):
        await h.call(method, *args)
    assert len(h.server.requests) == 1
    assert h.sleeps == []


# ------------------------------------------------------------------------------------------------ lifecycle


def test_sync_context_manager_closes() -> None:
    server = MockServer().reply(httpx.Response(200, json={"status": "ok"}))
    with LptClient(BASE, transport=httpx.MockTransport(server)) as client:
        assert client.healthz()
        assert client.base_url == BASE
    assert client.is_closed


async def test_async_context_manager_closes() -> None:
    server = MockServer().reply(httpx.Response(200, json={"status": "ok"}))
    async with AsyncLptClient(BASE, transport=httpx.MockTransport(server)) as client:
        assert await client.ready()
    assert client.is_closed


def test_default_sleep_is_real_sleep() -> None:
    assert LptClient(BASE)._sleep is time.sleep
    assert AsyncLptClient(BASE)._sleep is asyncio.sleep


@pytest.mark.parametrize("kwargs", [{"max_retries": -1}, {"backoff": -0.1}, {"max_retry_wait": -1.0}, {"timeout": 0}])
def test_constructor_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LptClient(BASE, **kwargs)
    with pytest.raises(ValueError):
        AsyncLptClient(BASE, **kwargs)


# --------------------------------------------------------------------------------------------------- loadgen


def classify_server(decide: Callable[[int, httpx.Request], httpx.Response | Exception | None] | None = None) -> Any:
    """A /classify/{task} mock that numbers requests from 1 and lets `decide` override the 200 answer."""
    state = {"n": 0, "seen": []}

    def handler(request: httpx.Request) -> httpx.Response:
        state["n"] += 1
        n = state["n"]
        task = request.url.path.removeprefix("/classify/")
        state["seen"].append((request.method, request.url.path, json.loads(request.content)))
        outcome = decide(n, request) if decide else None
        if isinstance(outcome, Exception):
            raise outcome
        if outcome is not None:
            return outcome
        return httpx.Response(200, json={"task": task, "version": 1, "predictions": [pred()]})

    return handler, state


async def test_loadgen_counts_requests_and_errors() -> None:
    def decide(n: int, request: httpx.Request) -> httpx.Response | Exception | None:
        if n % 5 == 0:
            return error(503, "overloaded", "full", retry_after="1")
        if n % 7 == 0:
            return httpx.ConnectError("refused")
        if n % 11 == 0:
            return httpx.Response(200, json={"unexpected": True})
        return None

    handler, state = classify_server(decide)
    tasks, texts = ["sst2", "agnews"], ["a", "b", "c"]
    report = await loadgen.run_load(
        BASE, tasks, texts, concurrency=4, duration_s=None, total_requests=50, transport=httpx.MockTransport(handler)
    )

    n503 = sum(1 for n in range(1, 51) if n % 5 == 0)
    nconn = sum(1 for n in range(1, 51) if n % 5 and n % 7 == 0)
    nbad = sum(1 for n in range(1, 51) if n % 5 and n % 7 and n % 11 == 0)
    assert state["n"] == 50  # no client-side retries inflate the count
    assert report.requests == 50
    assert report.errors == {"503": n503, "connection": nconn, "invalid_response": nbad}
    assert report.ok == 50 - n503 - nconn - nbad
    assert report.error_count == n503 + nconn + nbad
    assert sum(report.by_task.values()) == 50 and set(report.by_task) <= set(tasks)
    for method, path, body in state["seen"]:
        assert method == "POST" and path.removeprefix("/classify/") in tasks
        assert set(body) == {"text"} and body["text"] in texts
    assert report.throughput == pytest.approx(50 / report.duration_s)
    assert report.p50_ms <= report.p95_ms <= report.p99_ms <= report.max_ms
    assert len(report.latencies_ms) == 50


async def test_loadgen_round_robin_and_seeded_random() -> None:
    handler, _ = classify_server()
    report = await loadgen.run_load(
        BASE, ["a", "b"], ["t"], 3, total_requests=20, transport=httpx.MockTransport(handler), pick="round_robin"
    )
    assert report.by_task == {"a": 10, "b": 10}

    sequences = []
    for _ in range(2):
        handler, state = classify_server()
        await loadgen.run_load(
            BASE, ["a", "b", "c"], ["x", "y", "z"], 1, total_requests=30, transport=httpx.MockTransport(handler), seed=7
        )
        sequences.append(state["seen"])
    assert sequences[0] == sequences[1]
    assert len({path for _, path, _ in sequences[0]}) == 3


async def test_loadgen_duration_mode() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.002)
        return httpx.Response(200, json={"task": "a", "version": 1, "predictions": [pred()]})

    report = await loadgen.run_load(BASE, ["a"], ["t"], 4, duration_s=0.1, transport=httpx.MockTransport(handler))
    assert report.requests > 4
    assert report.ok == report.requests and report.errors == {}
    assert 0.1 <= report.duration_s < 1.0
    assert report.p50_ms >= 2.0


async def test_loadgen_stops_at_whichever_limit_comes_first() -> None:
    handler, state = classify_server()
    report = await loadgen.run_load(
        BASE, ["a"], ["t"], 8, duration_s=30, total_requests=5, transport=httpx.MockTransport(handler)
    )
    assert report.requests == state["n"] == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tasks": [], "texts": ["t"], "concurrency": 1, "total_requests": 1},
        {"tasks": ["a"], "texts": [], "concurrency": 1, "total_requests": 1},
        {"tasks": ["a"], "texts": ["t"], "concurrency": 0, "total_requests": 1},
        {"tasks": ["a"], "texts": ["t"], "concurrency": 1},
    ],
)
async def test_loadgen_argument_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        await loadgen.run_load(BASE, **kwargs)


def test_percentile_matches_linear_interpolation() -> None:
    values = [float(v) for v in range(1, 11)]
    assert loadgen.percentile(values, 50) == 5.5
    assert loadgen.percentile(values, 90) == pytest.approx(9.1)
    assert loadgen.percentile(values, 100) == 10.0
    assert loadgen.percentile([4.0], 99) == 4.0
    assert math.isnan(loadgen.percentile([], 50))


def test_report_as_dict_is_json_safe() -> None:
    empty = loadgen.LoadReport.from_samples([], duration_s=1.0, concurrency=2)
    data = empty.as_dict()
    assert data["requests"] == 0 and data["p50_ms"] is None and "latencies_ms" not in data
    json.dumps(data, allow_nan=False)
    assert "latencies_ms" in empty.as_dict(include_latencies=True)
    assert "requests" in empty.format_table()


def test_loadgen_main_end_to_end(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any) -> None:
    handler, state = classify_server(lambda n, _: error(429, "overloaded", "full") if n % 4 == 0 else None)
    # main() builds its own network transport; swap in the mock so the whole CLI path runs offline (the httpx engine:
    # tests/client/test_loadgen_engines.py runs the aiohttp one against a real socket).
    monkeypatch.setattr(loadgen.httpx, "AsyncHTTPTransport", lambda **_: httpx.MockTransport(handler))
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("first text\n\n  second text  \n", encoding="utf-8")
    out = tmp_path / "out.json"

    code = loadgen.main(
        ["--url", BASE, "--tasks", "a, b", "--concurrency", "2", "--requests", "12", "--texts-file", str(texts_file)]
        + ["--json", str(out), "--engine", "httpx"]
    )

    assert code == 0
    printed = capsys.readouterr().out
    assert "throughput" in printed and "latency p99" in printed and "429=3" in printed
    data = json.loads(out.read_text())
    assert (data["requests"], data["ok"], data["errors"]) == (12, 9, {"429": 3})
    assert {body["text"] for _, _, body in state["seen"]} <= {"first text", "second text"}
    assert {path for _, path, _ in state["seen"]} <= {"/classify/a", "/classify/b"}


def test_loadgen_main_fails_when_nothing_succeeds(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    handler, _ = classify_server(lambda n, _: error(404, "unknown_task", "no such task"))
    monkeypatch.setattr(loadgen.httpx, "AsyncHTTPTransport", lambda **_: httpx.MockTransport(handler))
    assert loadgen.main(["--url", BASE, "--tasks", "nope", "--concurrency", "1", "--requests", "3",
                         "--engine", "httpx"]) == 1
    assert "404=3" in capsys.readouterr().out
