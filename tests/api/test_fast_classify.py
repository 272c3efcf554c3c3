"""`FastClassify`: ordinary `POST /classify/{task}` requests are answered ahead of FastAPI's stack, and every answer,
errors included, is the one the full stack gives."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from fastapi import Request

from lpt_serve.api.app import create_app
from lpt_serve.api.deps import get_service
from lpt_serve.api.settings import Settings
from lpt_serve.serving.store import AdapterStore
from tests.helpers import make_adapter, serving

JSON = {"content-type": "application/json"}
CAP = 4096


@pytest.fixture
def store_root(tiny_backbone, tmp_path) -> Path:
    store = AdapterStore(tmp_path / "store")
    for i, task in enumerate(("alpha", "beta")):
        store.commit_dir(task, make_adapter(tiny_backbone, task, seed=i, prompt_layer=1 + i).save(tmp_path / task))
    return tmp_path / "store"


def _app(tiny_backbone, store_root, *, fast: bool):
    return create_app(Settings(store=store_root, max_wait_ms=1, max_request_bytes=CAP, max_text_chars=500,
                               fast_classify=fast), backbone=tiny_backbone)


# (method, path, body bytes, headers): what a client may send to the route, ordinary and not.
REQUESTS = [
    ("POST", "/classify/alpha", b'{"text": "a good film"}', JSON),
    ("POST", "/classify/beta", b'{"texts": ["a good film", "dull", "a good film"]}', JSON),
    ("POST", "/classify/alpha", b'{"text": "a good film"}', {"content-type": "application/json; charset=utf-8"}),
    ("POST", "/classify/nope", b'{"text": "a good film"}', JSON),  # not served
    ("POST", "/classify/Not-A-Name", b'{"text": "x"}', JSON),  # breaks the name rule
    ("POST", "/classify/alpha/", b'{"text": "x"}', JSON),  # trailing slash
    ("POST", "/classify/alpha", b'{"text": ', JSON),  # malformed JSON
    ("POST", "/classify/alpha", b'\xff\xfe{"text": "x"}', JSON),  # not UTF-8
    ("POST", "/classify/alpha", b'{"text": "\\ud800"}', JSON),  # a lone surrogate
    ("POST", "/classify/alpha", b'{"text": "a", "texts": ["b"]}', JSON),  # both
    ("POST", "/classify/alpha", b'{"texts": []}', JSON),
    ("POST", "/classify/alpha", b'{"text": "a", "extra": 1}', JSON),
    ("POST", "/classify/alpha", b'{"text": 5}', JSON),
    ("POST", "/classify/alpha", b'["a good film"]', JSON),
    ("POST", "/classify/alpha", b'{"text": "   "}', JSON),  # empty: the service says so
    ("POST", "/classify/alpha", b'{"text": "' + b"word " * 200 + b'"}', JSON),  # over max_text_chars
    ("POST", "/classify/alpha", b'{"text": "' + b"w" * (2 * CAP) + b'"}', JSON),  # over the body cap
    ("POST", "/classify/alpha", b'{"text": "a good film"}', {"content-type": "text/plain"}),
    ("POST", "/classify/alpha", b'{"text": "a good film"}', {}),
    ("GET", "/classify/alpha", b"", {}),
]


async def test_the_fast_path_answers_every_request_as_the_full_stack_does(tiny_backbone, store_root):
    async with AsyncExitStack() as stack:
        fast = await stack.enter_async_context(serving(_app(tiny_backbone, store_root, fast=True)))
        full = await stack.enter_async_context(serving(_app(tiny_backbone, store_root, fast=False)))
        for method, path, content, headers in REQUESTS:
            answers = [await client.request(method, path, content=content, headers=headers) for client in (fast, full)]
            a, b = answers
            assert (a.status_code, a.headers.get("content-type"), a.content) == \
                   (b.status_code, b.headers.get("content-type"), b.content), (method, path, content[:40])
            assert a.headers.get("content-length") == b.headers.get("content-length")
        # The requests above reached every kind of answer, so the comparison covered each.
        statuses = {(await fast.request(m, p, content=c, headers=h)).status_code for m, p, c, h in REQUESTS}
        assert statuses == {200, 404, 405, 413, 422}


@pytest.mark.parametrize("fast", [True, False])
async def test_ordinary_requests_skip_fastapis_route_unless_it_is_turned_off(tiny_backbone, store_root, fast):
    app = _app(tiny_backbone, store_root, fast=fast)
    reached: list[str] = []

    async def counting_service(request: Request):
        reached.append(request.url.path)
        return request.app.state.service

    app.dependency_overrides[get_service] = counting_service
    async with serving(app) as client:
        r = await client.post("/classify/alpha", json={"text": "a good film"})
        assert r.status_code == 200 and r.json()["task"] == "alpha"
        assert reached == ([] if fast else ["/classify/alpha"])
        # A body the fast path does not take goes to the route, body and all: FastAPI's own 422.
        r = await client.post("/classify/alpha", json={"text": "a", "texts": ["b"]})
        assert r.status_code == 422 and "exactly one" in r.json()["error"]["message"]
        r = await client.post("/classify", json={"items": [{"task": "alpha", "text": "a good film"}]})
        assert r.status_code == 200 and reached[-1] == "/classify"
