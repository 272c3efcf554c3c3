"""The HTTP contract in-process (httpx.ASGITransport) on the tiny backbone with a temporary store."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import httpx
import pytest
import torch

from lpt_serve.api.app import create_app
from lpt_serve.api.settings import Settings
from lpt_serve.model.engine import classify_rows, encode_texts
from lpt_serve.serving.store import AdapterStore
from tests.helpers import adapter_files, make_adapter, serving

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TASKS = {
    "alpha": {"prompt_layer": 1},
    "beta": {"prompt_layer": 2, "generator": "mppg", "labels": ["a", "b", "c"]},
    "gamma": {"prompt_layer": 3, "generator": "appg", "prompt_length": 3},
}


@pytest.fixture
def store_root(tiny_backbone, tmp_path) -> Path:
    store = AdapterStore(tmp_path / "store")
    for i, (task, overrides) in enumerate(TASKS.items()):
        folder = make_adapter(tiny_backbone, task, seed=i, **overrides).save(tmp_path / "src" / task)
        store.commit_dir(task, folder)
    return tmp_path / "store"


class Harness:
    def __init__(self, app, client):
        self.app, self.client = app, client

    @property
    def service(self):
        return self.app.state.service


async def start(tiny_backbone, store_root, **overrides):
    # One inference worker unless a test asks for more: several tests here count what shares a pass.
    settings = Settings(store=store_root, admin_token=TOKEN, **{"max_wait_ms": 2, "inference_workers": 1, **overrides})
    app = create_app(settings, backbone=tiny_backbone)
    return app


@pytest.fixture
async def server(tiny_backbone, store_root):
    app = await start(tiny_backbone, store_root)
    async with serving(app) as client:
        yield Harness(app, client)


def expected_probs(service, task: str, text: str) -> torch.Tensor:
    adapter = service.registry.get(task).adapter
    return classify_rows(service.backbone, [adapter], encode_texts(service.backbone, [text]))[0]


# -------------------------------------------------------------------------------------------------- classify
async def test_classify_one_text(server):
    r = await server.client.post("/classify/beta", json={"text": "a good film"})
    assert r.status_code == 200
    body = r.json()
    assert body["task"] == "beta" and body["version"] == 1
    [pred] = body["predictions"]
    assert set(pred["scores"]) == {"a", "b", "c"}
    assert pred["label"] == max(pred["scores"], key=pred["scores"].get)
    assert pred["score"] == pred["scores"][pred["label"]]
    assert abs(sum(pred["scores"].values()) - 1) < 1e-5
    assert pred["truncated"] is False
    probs = expected_probs(server.service, "beta", "a good film")
    assert [pred["scores"][k] for k in ("a", "b", "c")] == pytest.approx(probs.tolist(), abs=1e-5)


async def test_classify_many_texts_keeps_order(server):
    texts = ["good", "the movie was not very good and it is bad", "terrible", "great film"]
    r = await server.client.post("/classify/alpha", json={"texts": texts})
    preds = r.json()["predictions"]
    assert len(preds) == len(texts)
    for text, pred in zip(texts, preds, strict=True):
        probs = expected_probs(server.service, "alpha", text)
        assert [pred["scores"]["neg"], pred["scores"]["pos"]] == pytest.approx(probs.tolist(), abs=1e-5)


async def test_mixed_items(server):
    items = [{"task": "gamma", "text": "good"}, {"task": "alpha", "text": "bad"}, {"task": "beta", "text": "good"}]
    r = await server.client.post("/classify", json={"items": items})
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert [p["task"] for p in preds] == ["gamma", "alpha", "beta"]
    for item, pred in zip(items, preds, strict=True):
        probs = expected_probs(server.service, item["task"], item["text"])
        assert list(pred["scores"].values()) == pytest.approx(probs.tolist(), abs=1e-5)


async def test_long_text_is_truncated_and_says_so(server):
    r = await server.client.post("/classify/alpha", json={"texts": ["good " * 400, "good"]})
    assert [p["truncated"] for p in r.json()["predictions"]] == [True, False]


async def test_concurrent_requests_for_different_tasks_share_one_forward_pass(tiny_backbone, store_root):
    app = await start(tiny_backbone, store_root, max_wait_ms=500, max_batch_size=6)
    async with app.router.lifespan_context(app):
        service = app.state.service
        passes = []
        original = service._run_batch

        def counting(adapters, encoded):
            passes.append(sorted(a.task for a in adapters))
            return original(adapters, encoded)

        service.batcher.run_batch = counting
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://lpt") as client:
            requests = [client.post(f"/classify/{t}", json={"texts": ["good film", "bad"]}) for t in TASKS]
            responses = await asyncio.gather(*requests)
    assert all(r.status_code == 200 for r in responses)
    assert passes == [sorted(list(TASKS) * 2)]  # six rows of three tasks, one pass
    assert service.batcher.history[-1].tasks == {t: 2 for t in TASKS}


# ------------------------------------------------------------------------------------------------------ tasks
async def test_tasks_listing(server):
    r = await server.client.get("/tasks")
    assert r.json()["next"] is None
    compact = {t["task"]: t for t in r.json()["tasks"]}
    assert set(compact) == set(TASKS)
    assert set(compact["beta"]) == {"task", "version", "labels", "location", "quarantined", "quarantine_reason"}
    assert compact["beta"]["labels"] == ["a", "b", "c"] and compact["beta"]["location"] == "disk"  # not used yet
    assert (await server.client.post("/classify/beta", json={"text": "good"})).status_code == 200
    r = await server.client.get("/tasks", params={"view": "full"})
    tasks = {t["task"]: t for t in r.json()["tasks"]}
    beta = tasks["beta"]
    assert beta["labels"] == ["a", "b", "c"] and beta["generator"] == "mppg" and beta["prompt_layer"] == 2
    assert beta["prompt_length"] == 5 and beta["location"] == "cpu" and beta["versions"] == [1]
    assert beta["parameters"] == server.service.registry.get("beta").adapter.num_parameters()
    one = await server.client.get("/tasks/gamma")
    assert one.json()["prompt_length"] == 3
    missing = await server.client.get("/tasks/nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "task_not_found"


# ------------------------------------------------------------------------------------------------------ admin
async def test_upload_rollback_delete(server, tiny_backbone, tmp_path):
    new = make_adapter(tiny_backbone, "alpha", seed=99, prompt_layer=2, labels=["x", "y"])
    config, weights = adapter_files(new, tmp_path / "new")
    r = await server.client.put("/admin/tasks/alpha", files={"config": config, "weights": weights}, headers=AUTH)
    assert r.status_code == 201 and r.json() == {"task": "alpha", "version": 2}
    r = await server.client.post("/classify/alpha", json={"text": "good"})
    assert r.json()["version"] == 2 and set(r.json()["predictions"][0]["scores"]) == {"x", "y"}
    r = await server.client.post("/admin/tasks/alpha/rollback", headers=AUTH)
    assert r.json() == {"task": "alpha", "version": 1}
    r = await server.client.post("/classify/alpha", json={"text": "good"})
    assert r.json()["version"] == 1 and set(r.json()["predictions"][0]["scores"]) == {"neg", "pos"}
    r = await server.client.post("/admin/tasks/alpha/rollback", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["type"] == "conflict"
    r = await server.client.delete("/admin/tasks/alpha", headers=AUTH)
    assert r.status_code == 204
    assert (await server.client.post("/classify/alpha", json={"text": "good"})).status_code == 404
    assert (await server.client.delete("/admin/tasks/alpha", headers=AUTH)).status_code == 404


async def test_upload_under_another_name_serves_under_the_url_name(server, tiny_backbone, tmp_path):
    config, weights = adapter_files(make_adapter(tiny_backbone, "trained-as"), tmp_path / "a")
    r = await server.client.put("/admin/tasks/fresh", files={"config": config, "weights": weights}, headers=AUTH)
    assert r.status_code == 201 and r.json() == {"task": "fresh", "version": 1}
    stored = json.loads((server.service.config.store / "fresh" / "v1" / "adapter_config.json").read_text())
    assert stored["task"] == "fresh"


async def test_restart_serves_what_was_committed(tiny_backbone, store_root, tmp_path):
    config, weights = adapter_files(make_adapter(tiny_backbone, "delta", seed=7), tmp_path / "d")
    for round_ in range(2):
        app = await start(tiny_backbone, store_root)
        async with serving(app) as client:
            if round_ == 0:
                await client.put("/admin/tasks/delta", files={"config": config, "weights": weights}, headers=AUTH)
                await client.delete("/admin/tasks/beta", headers=AUTH)
                before = (await client.post("/classify/delta", json={"text": "good"})).json()
            else:
                names = {t["task"] for t in (await client.get("/tasks")).json()["tasks"]}
                after = (await client.post("/classify/delta", json={"text": "good"})).json()
    assert names == {"alpha", "gamma", "delta"}
    assert after == before


async def test_hot_upload_and_rollback_under_load_fail_nothing(server, tiny_backbone, tmp_path):
    uploads = [adapter_files(make_adapter(tiny_backbone, "alpha", seed=s), tmp_path / f"u{s}") for s in range(3)]
    statuses: list[int] = []
    versions: set[int] = set()
    stop = asyncio.Event()

    async def client_loop(task: str):
        while not stop.is_set():
            r = await server.client.post(f"/classify/{task}", json={"texts": ["good film", "bad"]})
            statuses.append(r.status_code)
            if task == "alpha" and r.status_code == 200:
                versions.add(r.json()["version"])

    async def operator():
        for config, weights in uploads:
            r = await server.client.put(
                "/admin/tasks/alpha", files={"config": config, "weights": weights}, headers=AUTH
            )
            assert r.status_code == 201
            await asyncio.sleep(0.05)
        assert (await server.client.post("/admin/tasks/alpha/rollback", headers=AUTH)).status_code == 200
        await asyncio.sleep(0.05)
        stop.set()

    await asyncio.gather(operator(), *(client_loop(t) for t in ["alpha", "alpha", "beta", "gamma"]))
    assert statuses and set(statuses) == {200}
    assert len(versions) >= 2  # clients really saw the swaps happen


# ----------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[]", b'{"texts": []}', b'{"text": "a", "texts": ["b"]}', b'{"text": 5}', b'{"txt": "a"}', b"{}"],
)
async def test_invalid_bodies_are_422(server, body):
    r = await server.client.post("/classify/alpha", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "validation_error" and r.json()["error"]["message"]


async def test_empty_text_is_422(server):
    r = await server.client.post("/classify/alpha", json={"texts": ["fine", "   "]})
    assert r.status_code == 422 and "text 1 is empty" in r.json()["error"]["message"]


async def test_too_large_is_413(server):
    limit = server.service.config.max_text_chars
    r = await server.client.post("/classify/alpha", json={"text": "a" * (limit + 1)})
    assert r.status_code == 413 and r.json()["error"]["type"] == "too_large"
    many = server.service.config.max_texts_per_request + 1
    r = await server.client.post("/classify/alpha", json={"texts": ["good"] * many})
    assert r.status_code == 413


async def test_a_request_over_its_token_budget_is_413(tiny_backbone, store_root):
    app = await start(tiny_backbone, store_root, max_request_tokens=40)
    async with serving(app) as client:
        # "good film" is 2 tokens + [CLS] and [SEP]: 10 texts are 40 tokens, 11 are 44.
        assert (await client.post("/classify/alpha", json={"texts": ["good film"] * 10})).status_code == 200
        r = await client.post("/classify/alpha", json={"texts": ["good film"] * 11})
        assert r.status_code == 413 and "44 tokens" in r.json()["error"]["message"]


async def test_unknown_task_is_404(server):
    r = await server.client.post("/classify/nope", json={"text": "good"})
    assert r.status_code == 404 and r.json() == {
        "error": {"type": "task_not_found", "message": "task 'nope' is not served; GET /tasks lists the served tasks"}
    }
    r = await server.client.post(
        "/classify", json={"items": [{"task": "alpha", "text": "x"}, {"task": "no", "text": "y"}]}
    )
    assert r.status_code == 404


@pytest.mark.parametrize(
    "headers,status", [({}, 401), ({"Authorization": "Bearer wrong-token"}, 403), ({"Authorization": "Basic abc"}, 401)]
)
async def test_admin_needs_the_token(server, headers, status):
    for method, path in [
        ("PUT", "/admin/tasks/alpha"),
        ("DELETE", "/admin/tasks/alpha"),
        ("POST", "/admin/tasks/alpha/rollback"),
    ]:
        kwargs = {"files": {"config": b"{}", "weights": b"x"}} if method == "PUT" else {}
        r = await server.client.request(method, path, headers=headers, **kwargs)
        assert r.status_code == status, (method, path)
        assert r.json()["error"]["type"] in ("unauthorized", "forbidden")
    assert (await server.client.get("/tasks/alpha")).json()["version"] == 1


async def test_admin_off_without_token(tiny_backbone, store_root):
    app = create_app(Settings(store=store_root), backbone=tiny_backbone)
    async with serving(app) as client:
        r = await client.delete("/admin/tasks/alpha", headers=AUTH)
        assert r.status_code == 403 and "LPT_ADMIN_TOKEN" in r.json()["error"]["message"]
        assert (await client.get("/tasks/alpha")).status_code == 200


async def test_bad_adapters_are_400_and_change_nothing(server, tiny_backbone, tmp_path):
    from lpt_serve.model.backbone import Backbone
    from tests.tiny import make_tiny_bert

    good_config, good_weights = adapter_files(make_adapter(tiny_backbone, "alpha", seed=5), tmp_path / "g")
    other = Backbone.load(make_tiny_bert(tmp_path / "other", hidden=48, layers=3))
    other_config, other_weights = adapter_files(make_adapter(other, "alpha"), tmp_path / "o")
    pickled = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, pickled)
    cases = [
        (b"not json", good_weights, "not valid JSON"),
        (good_config, b"garbage" * 20, "safetensors"),
        (good_config, pickled.getvalue(), "pickle"),
        (other_config, other_weights, "hidden size is 48"),
        (good_config, other_weights, "shape"),
    ]
    before = (await server.client.post("/classify/alpha", json={"text": "good"})).json()
    for config, weights, message in cases:
        r = await server.client.put("/admin/tasks/alpha", files={"config": config, "weights": weights}, headers=AUTH)
        assert r.status_code == 400, message
        assert r.json()["error"]["type"] == "bad_adapter" and message in r.json()["error"]["message"]
    after = (await server.client.post("/classify/alpha", json={"text": "good"})).json()
    assert after == before
    assert AdapterStore(server.service.config.store).get("alpha").versions == (1,)


@pytest.mark.parametrize("name", ["..", "UPPER", "a.b", "-x", "x" * 65])
async def test_unsafe_task_names_are_refused(server, tiny_backbone, tmp_path, name):
    config, weights = adapter_files(make_adapter(tiny_backbone, "alpha"), tmp_path / "a")
    r = await server.client.put(f"/admin/tasks/{name}", files={"config": config, "weights": weights}, headers=AUTH)
    assert r.status_code in (404, 422)  # ".." never reaches the route; the others are refused by name
    assert not any(p.name == name for p in server.service.config.store.iterdir())


async def test_oversized_upload_is_413(tiny_backbone, store_root):
    app = create_app(Settings(store=store_root, admin_token=TOKEN, max_upload_bytes=2048), backbone=tiny_backbone)
    async with serving(app) as client:
        r = await client.put("/admin/tasks/alpha", files={"config": b"{}", "weights": b"x" * 3000}, headers=AUTH)
        assert r.status_code == 413 and r.json()["error"]["type"] == "too_large"
        r = await client.put("/admin/tasks/alpha", files={"config": b"{}", "weights": b"x" * 10_000}, headers=AUTH)
        assert r.status_code == 413


async def test_full_queue_is_429_with_retry_after(tiny_backbone, store_root):
    app = await start(tiny_backbone, store_root, max_queue=4, max_batch_size=4, max_wait_ms=300)
    async with serving(app) as client:
        first = asyncio.create_task(client.post("/classify/alpha", json={"texts": ["a", "b", "c"]}))
        await asyncio.sleep(0.1)  # three rows wait for the batch to fill
        r = await client.post("/classify/beta", json={"texts": ["a", "b"]})
        assert r.status_code == 429 and r.json()["error"]["type"] == "overloaded"
        assert int(r.headers["Retry-After"]) >= 1
        assert (await first).status_code == 200


async def test_deadline_is_504(tiny_backbone, store_root):
    app = await start(tiny_backbone, store_root, request_timeout_s=0.2)
    async with app.router.lifespan_context(app):
        service = app.state.service
        original = service._run_batch

        def slow(adapters, encoded):
            import time

            time.sleep(0.5)
            return original(adapters, encoded)

        service.batcher.run_batch = slow
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://lpt") as client:
            r = await client.post("/classify/alpha", json={"text": "good"})
            assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
            service.batcher.run_batch = original
            await asyncio.sleep(0.5)  # the slow pass still holds the inference thread
            assert (await client.post("/classify/alpha", json={"text": "good"})).status_code == 200


async def test_failed_pass_is_500_without_trace_and_server_keeps_serving(tiny_backbone, store_root):
    app = await start(tiny_backbone, store_root)
    async with app.router.lifespan_context(app):
        service = app.state.service
        original = service._run_batch

        def broken(adapters, encoded):
            raise RuntimeError("secret internal detail")

        service.batcher.run_batch = broken
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://lpt"
        ) as client:
            r = await client.post("/classify/alpha", json={"text": "good"})
            assert r.status_code == 500 and "secret" not in r.text
            assert r.json()["error"]["type"] == "internal_error"
            metrics = (await client.get("/metrics")).text
            assert 'lpt_errors_total{task="alpha",type="internal_error"} 1.0' in metrics
            service.batcher.run_batch = original
            assert (await client.post("/classify/alpha", json={"text": "good"})).status_code == 200


async def test_rows_of_a_cancelled_request_are_dropped_before_the_pass(tiny_backbone, store_root):
    app = await start(tiny_backbone, store_root, max_wait_ms=200)
    async with app.router.lifespan_context(app):
        service = app.state.service
        seen = []
        original = service._run_batch

        def spy(adapters, encoded):
            seen.append(len(adapters))
            return original(adapters, encoded)

        service.batcher.run_batch = spy
        adapter = service.registry.get("alpha").adapter
        enc = encode_texts(tiny_backbone, ["good", "bad", "film"])
        rows = service.batcher.submit([adapter] * 3, enc, 10.0)
        rows[1].future.cancel()  # what the disconnect watcher does when the client goes away
        results = await asyncio.gather(rows[0].future, rows[2].future)
    assert seen == [2] and len(results) == 2


async def test_health_and_readiness(server):
    assert (await server.client.get("/healthz")).json() == {"status": "ok"}
    ready = await server.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["tasks"] == 3
    server.service.ready = False
    r = await server.client.get("/readyz")
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"


async def test_metrics_have_per_task_labels(server):
    await server.client.post("/classify/alpha", json={"texts": ["good", "bad"]})
    await server.client.post("/classify/nope", json={"text": "good"})
    text = (await server.client.get("/metrics")).text
    assert 'lpt_rows_total{task="alpha"} 2.0' in text
    assert 'lpt_requests_total{status="200",task="alpha"} 1.0' in text
    assert "lpt_batch_size_bucket" in text and "lpt_queue_depth" in text


async def test_openapi_documents_the_contract(server):
    spec = (await server.client.get("/openapi.json")).json()
    paths = spec["paths"]
    assert {
        "/classify/{task}",
        "/classify",
        "/tasks",
        "/tasks/{task}",
        "/admin/tasks/{task}",
        "/admin/tasks/{task}/rollback",
        "/metrics",
        "/healthz",
        "/readyz",
    } <= set(paths)
    assert "201" in paths["/admin/tasks/{task}"]["put"]["responses"]
    assert "404" in paths["/classify/{task}"]["post"]["responses"]


async def test_answers_are_exactly_the_documented_bodies(server):
    """The classify routes serialise their answers themselves (orjson): the bodies must still be exactly what
    their `response_model` documents, no field missing, none extra, every type as declared."""
    from lpt_client.schemas import ClassifyResult, MixedResponse

    one = (await server.client.post("/classify/beta", json={"texts": ["a good film", "bad"]})).json()
    assert ClassifyResult.model_validate(one, strict=True).model_dump(mode="json") == one
    mixed = (await server.client.post("/classify", json={"items": [{"task": "beta", "text": "a good film"},
                                                                   {"task": "alpha", "text": "bad"}]})).json()
    assert MixedResponse.model_validate(mixed, strict=True).model_dump(mode="json") == mixed
    assert [p["task"] for p in mixed["predictions"]] == ["beta", "alpha"]


async def test_a_server_process_freezes_what_its_start_allocated_and_an_embedded_app_does_not(tiny_backbone,
                                                                                           store_root):
    import gc

    settings = Settings(store=store_root, admin_token=TOKEN, max_wait_ms=2)
    assert gc.get_freeze_count() == 0
    async with serving(create_app(settings, backbone=tiny_backbone)) as client:
        assert (await client.get("/readyz")).status_code == 200
        assert gc.get_freeze_count() == 0  # tests and notebooks start apps again and again: nothing frozen
    try:
        async with serving(create_app(settings, backbone=tiny_backbone, server_process=True)) as client:
            assert (await client.post("/classify/gamma", json={"text": "fine"})).status_code == 200
            # The backbone's parameters, allocated at start, are out of the cyclic GC's sight now.
            assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
