"""The HTTP edge under bad input and attack: every failure is the documented error, and a body is paid for only
after the caller is known and only up to its cap."""

from __future__ import annotations

import json
import select
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lpt_client.schemas import TASK_NAME_RULE
from lpt_serve.api.app import create_app
from lpt_serve.api.errors import MAX_MESSAGE_CHARS, error_response
from lpt_serve.api.settings import Settings
from lpt_serve.errors import AdapterError
from lpt_serve.serving.store import AdapterStore
from tests.helpers import ADMIN_TOKEN, ThreadedServer, adapter_files, make_adapter, serving

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JSON = {"content-type": "application/json"}
MiB = 1024 * 1024


def make_app(tiny_backbone, store_root: Path, **overrides):
    return create_app(Settings(store=store_root, admin_token=ADMIN_TOKEN, **{"max_wait_ms": 2, **overrides}),
                      backbone=tiny_backbone)


@pytest.fixture
async def client(tiny_backbone, store_root):
    async with serving(make_app(tiny_backbone, store_root)) as client:
        yield client


class Body:
    """A request body sent in chunks as the server asks for them, counting what it pulled."""

    def __init__(self, total: int, chunk: int = 64 * 1024, fill: bytes = b"x") -> None:
        self.total, self.chunk, self.fill, self.pulled = total, chunk, fill, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.pulled < self.total:
            size = min(self.chunk, self.total - self.pulled)
            self.pulled += size
            yield self.fill * size


class CountingApp:
    """The app, with a count of the request-body bytes it took from the server."""

    def __init__(self, app) -> None:
        self.app, self.bytes = app, 0

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            self.bytes += len(message.get("body", b""))
            return message

        await self.app(scope, counted if scope["type"] == "http" else receive, send)


def assert_error(response, status: int, type_: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"] == type_
    return body["error"]["message"]


# ----------------------------------------------------------------------------- 1. admin: the token before the body
@pytest.mark.parametrize("headers,status", [({}, 401), ({"Authorization": "Bearer wrong-token"}, 403)])
async def test_admin_upload_is_refused_before_a_byte_of_its_body_is_read(client, headers, status):
    body = Body(total=8 * MiB)
    r = await client.put("/admin/tasks/alpha", content=body,
                         headers={**headers, "content-type": "multipart/form-data; boundary=b"})
    assert_error(r, status, "unauthorized" if status == 401 else "forbidden")
    assert body.pulled == 0


async def test_admin_off_refuses_before_the_body(tiny_backbone, store_root):
    app = create_app(Settings(store=store_root, max_wait_ms=2), backbone=tiny_backbone)
    async with serving(app) as client:
        body = Body(total=MiB)
        r = await client.put("/admin/tasks/alpha", content=body, headers=AUTH)
        assert "LPT_ADMIN_TOKEN" in assert_error(r, 403, "forbidden")
        assert body.pulled == 0


async def test_every_admin_path_needs_the_token(client):
    # Paths no route serves, and methods no route takes, answer 401 too: the gate does not tell what exists.
    for method, path in [("GET", "/admin/tasks/alpha"), ("POST", "/admin/nothing/here"), ("OPTIONS", "/admin")]:
        assert_error(await client.request(method, path), 401, "unauthorized")


def send_chunked(port: int, path: str, total: int, headers: dict[str, str]) -> tuple[int, int, bytes]:
    """Send up to `total` bytes of chunked body over a raw socket, stopping as soon as the server answers; return
    the status, the body bytes sent by then, and the raw response head."""
    head = [f"PUT {path} HTTP/1.1", "Host: lpt", "Transfer-Encoding: chunked",
            "Content-Type: multipart/form-data; boundary=b", *(f"{k}: {v}" for k, v in headers.items())]
    frame_body = b"x" * (256 * 1024)
    frame = b"%x\r\n" % len(frame_body) + frame_body + b"\r\n"
    # A well-formed multipart file part that never ends, so that only a size limit can stop its parser.
    part = b'--b\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sock.setblocking(False)
        pending = b"%x\r\n" % len(part) + part + b"\r\n"
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable:
                break
            assert writable, "the server neither answered nor took more of the body"
            pending = pending or frame
            try:
                written = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                break
            pending = pending[written:]
            sent += written
        sock.setblocking(True)
        if sent >= total:  # a server that read it all gets a complete request, and answers it
            end = b"\r\n--b--\r\n"
            sock.sendall(pending + b"%x\r\n" % len(end) + end + b"\r\n0\r\n\r\n")
        response = b""
        while b"\r\n\r\n" not in response:
            data = sock.recv(65536)
            assert data, "the server closed the connection without an answer"
            response += data
    status = int(response.split(b" ", 2)[1])
    return status, sent, response.split(b"\r\n\r\n")[0]


def test_unauthenticated_chunked_upload_over_real_http_is_answered_before_its_body(tiny_backbone, store_root):
    counting = CountingApp(make_app(tiny_backbone, store_root))
    server = ThreadedServer(counting)
    try:
        total = 50 * MiB
        status, sent, head = send_chunked(server.port, "/admin/tasks/alpha", total, {})
    finally:
        server.stop()
    assert status == 401
    assert counting.bytes == 0  # the app took nothing from the server: nothing was parsed or spooled
    assert sent < total  # answered while the body was still coming
    assert b"connection: close" in head.lower()  # and the rest is not read either


def test_authenticated_chunked_upload_over_its_cap_stops_at_the_cap(tiny_backbone, store_root):
    app = make_app(tiny_backbone, store_root, max_upload_bytes=64 * 1024)
    cap = 2 * 64 * 1024 + 64 * 1024
    counting = CountingApp(app)
    server = ThreadedServer(counting)
    try:
        total = 50 * MiB
        status, sent, _ = send_chunked(server.port, "/admin/tasks/alpha", total, AUTH)
    finally:
        server.stop()
    assert status == 413
    assert sent < total
    # What uvicorn hands over in one message (its read size) is all that may pass the cap.
    assert counting.bytes <= cap + 1 * MiB


# ---------------------------------------------------------------------------------------------- 2. the body cap
async def test_chunked_classify_body_over_the_cap_is_413(tiny_backbone, store_root):
    async with serving(make_app(tiny_backbone, store_root, max_request_bytes=64 * 1024)) as client:
        body = Body(total=10 * MiB, chunk=4096)
        r = await client.post("/classify/alpha", content=body, headers=JSON)
        assert "LPT_MAX_REQUEST_BYTES" in assert_error(r, 413, "too_large")
        assert body.pulled <= 64 * 1024 + 4096  # counted while streaming: stopped one chunk past the cap
        assert r.headers["connection"] == "close"


async def test_declared_length_over_the_cap_is_413_before_reading(tiny_backbone, store_root):
    async with serving(make_app(tiny_backbone, store_root, max_request_bytes=64 * 1024)) as client:
        body = Body(total=MiB)
        r = await client.post("/classify/alpha", content=body, headers={**JSON, "content-length": str(MiB)})
        assert_error(r, 413, "too_large")
        assert body.pulled == 0


async def test_the_cap_applies_to_every_route(tiny_backbone, store_root):
    async with serving(make_app(tiny_backbone, store_root, max_request_bytes=4096)) as client:
        for method, path in [("GET", "/healthz"), ("POST", "/classify"), ("GET", "/tasks")]:
            r = await client.request(method, path, content=b"x" * 5000)
            assert_error(r, 413, "too_large")


async def test_a_body_under_the_cap_is_served_chunked_or_not(tiny_backbone, store_root):
    async with serving(make_app(tiny_backbone, store_root, max_request_bytes=64 * 1024)) as client:
        payload = json.dumps({"texts": ["good film"] * 100}).encode()

        async def chunks():
            for i in range(0, len(payload), 100):
                yield payload[i:i + 100]

        chunked = await client.post("/classify/alpha", content=chunks(), headers=JSON)
        plain = await client.post("/classify/alpha", content=payload, headers=JSON)
        assert chunked.status_code == plain.status_code == 200
        assert chunked.json() == plain.json()


def test_default_cap_holds_a_full_request_of_typical_texts():
    defaults = Settings.model_fields
    texts = defaults["max_texts_per_request"].default
    # A full request of long reviews (2,000 characters, each non-ASCII one escaped as 6 bytes by json.dumps) fits.
    body = json.dumps({"texts": ["é" * 2000] * texts}).encode()
    assert len(body) < defaults["max_request_bytes"].default


# --------------------------------------------------------------------------------- 3. every error is documented
@pytest.mark.parametrize("path,raw", [
    ("/classify/alpha", rb'{"text": "\ud800"}'),
    ("/classify/alpha", rb'{"texts": ["fine", "\udfff x"]}'),
    ("/classify/alpha", rb'{"text": "a\ud83d"}'),
    ("/classify", rb'{"items": [{"task": "alpha", "text": "\ud800"}]}'),
    ("/classify", rb'{"items": [{"task": "\ud800", "text": "good"}]}'),
    ("/classify/alpha", rb'{"\ud800": "good"}'),
])
async def test_lone_surrogate_is_422(client, path, raw):
    message = assert_error(await client.post(path, content=raw, headers=JSON), 422, "validation_error")
    assert "surrogate" in message


async def test_surrogate_pair_is_text(client):
    r = await client.post("/classify/alpha", content=rb'{"text": "good \ud83d\ude00"}', headers=JSON)
    assert r.status_code == 200


@pytest.mark.parametrize("raw,reason", [
    (b'{"text": "\xff\xfe"}', "not UTF-8"),
    (b'{"text": "good', "Unterminated string"),
    (b'{"text": "good"', "Expecting"),
    (b'{"text": ' + b"[" * 1000 + b"]" * 1000 + b"}", "nests too deeply"),
    (b"[" * 100_000, "nests too deeply"),
    (b'{"text": ' + b"9" * 5000 + b"}", "more than 4300 digits"),
])
async def test_undecodable_json_is_422(client, raw, reason):
    message = assert_error(await client.post("/classify/alpha", content=raw, headers=JSON), 422, "validation_error")
    assert reason in message and message.startswith("the body is not valid JSON")


@pytest.mark.parametrize("config,reason", [
    (b'{"task": "alpha", "labels": [' + b"9" * 5000 + b"]}", "more than 4300 digits"),
    (b'{"task": "alpha", "labels": ' + b"[" * 1000 + b"]" * 1000 + b"}", "nests too deeply"),
    (b'{"task": "alpha", "labels": ["\\ud800", "b"]}', "surrogate"),
    (b'{"task": "\xff"}', "not UTF-8"),
])
async def test_unparseable_upload_config_is_a_bad_adapter(client, tiny_backbone, store_root, tmp_path, config, reason):
    _, weights = adapter_files(make_adapter(tiny_backbone, "alpha"), tmp_path / "a")
    r = await client.put("/admin/tasks/alpha", files={"config": config, "weights": weights}, headers=AUTH)
    message = assert_error(r, 400, "bad_adapter")
    assert "adapter_config.json is not valid JSON" in message and reason in message
    assert AdapterStore(store_root).get("alpha").versions == (1,)


@pytest.mark.parametrize("name", ["UPPER", "a.b", "-x", "x" * 65, "al%20pha", "alpha%0A", "%C3%A9"])
async def test_bad_task_name_in_the_path_is_422(client, name):
    message = assert_error(await client.post(f"/classify/{name}", json={"text": "good"}), 422, "validation_error")
    assert TASK_NAME_RULE in message


async def test_bad_task_name_in_a_mixed_item_is_422(client):
    r = await client.post("/classify", json={"items": [{"task": "alpha", "text": "a"}, {"task": "Nope", "text": "b"}]})
    message = assert_error(r, 422, "validation_error")
    assert "items.1.task" in message and TASK_NAME_RULE in message


@pytest.mark.parametrize("name", ["UPPER", "a.b"])
async def test_bad_task_name_on_admin_paths_is_422(client, name):
    for method, path in [("DELETE", f"/admin/tasks/{name}"), ("POST", f"/admin/tasks/{name}/rollback")]:
        assert_error(await client.request(method, path, headers=AUTH), 422, "validation_error")


async def test_trailing_slash_is_a_json_404_not_a_redirect(client):
    r = await client.post("/classify/alpha/", json={"text": "good"})
    message = assert_error(r, 404, "not_found")
    assert "location" not in r.headers and "/classify/alpha" in message


@pytest.mark.parametrize("method,path,allowed", [
    ("OPTIONS", "/admin/tasks/alpha", "DELETE, PUT"),
    ("GET", "/admin/tasks/alpha", "DELETE, PUT"),
    ("PATCH", "/admin/tasks/alpha/rollback", "POST"),
    ("GET", "/classify/alpha", "POST"),
    ("DELETE", "/tasks", "GET"),
])
async def test_wrong_method_is_405_listing_every_allowed_method(client, method, path, allowed):
    r = await client.request(method, path, headers=AUTH)
    assert allowed in assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == allowed


def test_adapter_error_with_many_problems_is_capped():
    problems = [f"tensor generator.w{i} is not expected for this config" for i in range(50_000)]
    response = error_response(AdapterError(problems))
    message = json.loads(response.body)["error"]["message"]
    assert response.status_code == 400 and len(response.body) < MAX_MESSAGE_CHARS + 300
    assert message.startswith("adapter rejected: tensor generator.w0 is not")
    shown = message.count("is not expected")
    assert message.endswith(f"… ({50_000 - shown} more problems)")


def test_one_huge_message_is_cut_with_a_count():
    response = error_response(AdapterError("x" * 100_000))
    message = json.loads(response.body)["error"]["message"]
    assert len(message) < MAX_MESSAGE_CHARS + 100 and message.endswith("more characters)")


async def test_validation_error_with_many_problems_is_capped(client):
    r = await client.post("/classify/alpha", json={"texts": list(range(256))})
    message = assert_error(r, 422, "validation_error")
    assert len(message) <= MAX_MESSAGE_CHARS + 100 and "more problems)" in message


async def test_rejected_upload_with_many_tensors_has_a_small_body(client, tiny_backbone, tmp_path):
    import torch
    from safetensors.torch import save

    config, _ = adapter_files(make_adapter(tiny_backbone, "alpha"), tmp_path / "a")
    weights = save({f"extra.w{i}": torch.zeros(1) for i in range(5000)})
    r = await client.put("/admin/tasks/alpha", files={"config": config, "weights": weights}, headers=AUTH)
    assert_error(r, 400, "bad_adapter")
    assert len(r.content) < MAX_MESSAGE_CHARS + 300


# --------------------------------------------------------------------------------------------------- 4. OpenAPI
async def test_openapi_lists_every_status_a_route_can_answer(client):
    spec = (await client.get("/openapi.json")).json()
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert {"413", "500"} <= set(responses), (method, path)
            if path.startswith("/admin/"):
                assert {"401", "403", "422"} <= set(responses), (method, path)
                assert operation["security"] == [{"adminToken": []}]
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"] == error_ref, (method, path, status)
    classify = spec["paths"]["/classify/{task}"]["post"]
    assert {"404", "413", "422", "429", "500", "503", "504"} <= set(classify["responses"])
    [task] = [p for p in classify["parameters"] if p["name"] == "task"]
    assert task["schema"]["pattern"] == "^[a-z0-9][a-z0-9_-]{0,63}$"
    schemas = spec["components"]["schemas"]
    assert "exactly one of `text`" in schemas["ClassifyRequest"]["description"]
    assert schemas["MixedItem"]["properties"]["task"]["pattern"] == task["schema"]["pattern"]
    assert "HTTPValidationError" not in schemas
