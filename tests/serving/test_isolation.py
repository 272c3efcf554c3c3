"""One bad task never fails, slows or changes another task's answers: in the mixed pass (a property over random
mixes of healthy and broken tasks), in the quarantine that holds a task out after repeated failures, and over
HTTP, where requests batched with a poisoned task still answer 200."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save
from torch import nn

from lpt_serve.api.app import create_app
from lpt_serve.api.settings import Settings
from lpt_serve.errors import TaskFailed, TaskQuarantined
from lpt_serve.model.adapter import TaskAdapter, build_adapter
from lpt_serve.model.backbone import Backbone
from lpt_serve.model.engine import Encoded, classify_rows, encode_texts
from lpt_serve.serving.registry import Registry
from lpt_serve.serving.service import answer_rows
from lpt_serve.serving.store import AdapterStore
from tests.helpers import ADMIN_TOKEN, adapter_files, make_adapter, serving

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HUGE = 3e38  # finite in float32, so it passes the NaN/inf check; the forward pass overflows


def overflowing_files(adapter: TaskAdapter, folder: Path) -> tuple[bytes, bytes]:
    config, weights = adapter_files(adapter, folder)
    tensors = load(weights)
    for t in tensors.values():
        t.fill_(HUGE)
    return config, save(tensors, metadata={"format": "pt"})


def _raises(*args, **kwargs):
    raise RuntimeError("a module that raises")


# --------------------------------------------------------------------------------------- the mixed pass
def _healthy(bb: Backbone) -> list[TaskAdapter]:
    return [
        make_adapter(bb, "npg-l2", seed=1, generator="npg", prompt_layer=2, prompt_length=5),
        make_adapter(bb, "mppg-l1", seed=2, generator="mppg", prompt_layer=1, prompt_length=3, labels=["a", "b", "c"]),
        make_adapter(bb, "static", seed=4, method="prompt", generator="static", prompt_layer=0, prompt_length=4),
        make_adapter(bb, "verb", seed=6, prompt_layer=3, prompt_length=2, head="verbalizer",
                     template="{text} . it was <mask> .", label_words=["bad", "good"]),
    ]


def _broken(bb: Backbone, tmp: Path) -> dict[str, TaskAdapter]:
    """Tasks that fail in the pass, each a different way. The first passes upload validation as it is."""
    overflow = build_adapter(*overflowing_files(make_adapter(bb, "overflow", seed=7, prompt_layer=1), tmp / "o"), bb)
    head_raises = make_adapter(bb, "head-raises", seed=8, prompt_layer=2)
    head_raises.head.forward = _raises
    generator_raises = make_adapter(bb, "gen-raises", seed=9, generator="appg", prompt_layer=1)
    generator_raises.generator.forward = _raises
    wrong_width = make_adapter(bb, "wrong-width", seed=10, prompt_layer=2)
    wrong_width.head.classifier = nn.Linear(bb.hidden_size, 5)
    # Rows past the backbone's positions, as a 600-word template made them: the embedding lookup fails for the
    # whole pass, outside any one task's modules, so the service has to find the task by running each alone.
    overlong = make_adapter(bb, "overlong", seed=11, prompt_layer=3)
    return {a.task: a for a in (overflow, head_raises, generator_raises, wrong_width, overlong)}


@pytest.fixture(scope="module")
def tasks(tiny_mlm_backbone, tmp_path_factory):
    return _healthy(tiny_mlm_backbone), _broken(tiny_mlm_backbone, tmp_path_factory.mktemp("broken"))


def _encode(bb: Backbone, adapter: TaskAdapter, text: str) -> Encoded:
    if adapter.task == "overlong":
        head, tail = bb.tokenizer("", add_special_tokens=True)["input_ids"][:1], [bb.tokenizer.sep_token_id]
        body = bb.tokenizer(text, add_special_tokens=False)["input_ids"] or [bb.tokenizer.unk_token_id]
        ids = (body * bb.max_length)[: bb.max_length + 20]
        return Encoded(tuple(head + ids + tail), False)
    return encode_texts(bb, [text], adapter.config.template)[0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_healthy_rows_answer_as_alone_and_broken_rows_fail(tiny_mlm_backbone, tasks, data):
    bb = tiny_mlm_backbone
    healthy, broken = tasks
    everyone = healthy + list(broken.values())
    word = st.sampled_from(["good", "bad", "film", "not", "very", "it", "was", "zq", "!", "42"])
    text = st.lists(word, min_size=1, max_size=20).map(" ".join)
    rows = data.draw(st.lists(st.tuples(st.sampled_from(everyone), text), min_size=1, max_size=12))
    adapters = [a for a, _ in rows]
    encoded = [_encode(bb, a, t) for a, t in rows]

    outcome = answer_rows(bb, adapters, encoded)

    for adapter, enc, answer in zip(adapters, encoded, outcome.answers, strict=True):
        if adapter.task in broken:
            assert isinstance(answer, TaskFailed) and repr(adapter.task) in answer.message
        else:
            assert isinstance(answer, list), answer
            alone = classify_rows(bb, [adapter], [enc])[0]
            torch.testing.assert_close(torch.tensor(answer), alone, atol=1e-5, rtol=0)
    assert {a.task for a, _ in outcome.failed.values()} == {a.task for a in adapters if a.task in broken}
    assert {a.task for a in outcome.answered.values()} == {a.task for a in adapters if a.task not in broken}


def test_each_failure_is_named_without_the_exception_text(tiny_mlm_backbone, tasks):
    bb = tiny_mlm_backbone
    _, broken = tasks
    adapters = list(broken.values())
    outcome = answer_rows(bb, adapters, [_encode(bb, a, "good film") for a in adapters])
    messages = {a.task: m.message for a, m in zip(adapters, outcome.answers, strict=True)}
    assert "its probabilities are not finite (NaN or infinite)" in messages["overflow"]
    assert "its head raised (RuntimeError)" in messages["head-raises"]
    assert "its generator raised (RuntimeError)" in messages["gen-raises"]
    assert "it gave scores of shape [1, 5] for 1 rows of 2 labels" in messages["wrong-width"]
    assert "its rows failed in a pass of their own (" in messages["overlong"]  # the runtime decides which error
    assert not any("a module that raises" in m for m in messages.values())  # the log has it, the client does not


def test_a_server_fault_is_no_task_fault(tiny_backbone, monkeypatch):
    bb = tiny_backbone
    adapters = [make_adapter(bb, "a", seed=1), make_adapter(bb, "b", seed=2)]
    encoded = encode_texts(bb, ["good", "bad"])

    def broken_layers(*args, **kwargs):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(bb, "run_layers", broken_layers)  # every pass fails, the plain backbone's too
    outcome = answer_rows(bb, adapters, encoded)
    assert all(isinstance(a, RuntimeError) and not isinstance(a, TaskFailed) for a in outcome.answers)
    assert outcome.failed == {} and outcome.answered == {}  # no strike: the tasks did nothing wrong


# ---------------------------------------------------------------------------------------------- quarantine
def _registry(tiny_backbone, store_root: Path, **options) -> Registry:
    registry = Registry(tiny_backbone, AdapterStore(store_root), **options)
    registry.load_all()
    return registry


def test_three_failed_passes_in_a_row_quarantine_a_task(tiny_backbone, store_root, tmp_path):
    registry = _registry(tiny_backbone, store_root)
    alpha = registry.get("alpha").adapter
    for _ in range(2):
        assert registry.record_failure(alpha, "boom") is False
    registry.record_success(alpha)  # a pass that answered every row: the streak starts over
    assert [registry.record_failure(alpha, "boom") for _ in range(3)] == [False, False, True]
    assert registry.quarantine_reason(alpha) == "it failed 3 forward passes in a row (last: boom)"
    assert registry.quarantine_reason(registry.get("beta").adapter) is None

    # An upload serves a new version with a clean record; late reports about the old one change nothing.
    config, weights = adapter_files(make_adapter(tiny_backbone, "alpha", seed=5, prompt_layer=1), tmp_path / "a2")
    registry.upload("alpha", config, weights)
    fresh = registry.get("alpha").adapter
    assert registry.quarantine_reason(fresh) is None
    for _ in range(5):
        registry.record_failure(alpha, "late")
    assert registry.quarantine_reason(fresh) is None

    for _ in range(3):
        registry.record_failure(fresh, "boom")
    assert registry.quarantine_reason(fresh) is not None
    registry.rollback("alpha")  # so does a rollback
    assert registry.quarantine_reason(registry.get("alpha").adapter) is None


# ----------------------------------------------------------------------------------------------------- HTTP
TASKS = {"alpha": {"prompt_layer": 1}, "beta": {"prompt_layer": 2, "generator": "mppg", "labels": ["a", "b", "c"]}}


@pytest.fixture
def http_store(tiny_backbone, tmp_path) -> Path:
    store = AdapterStore(tmp_path / "store")
    for i, (task, overrides) in enumerate(TASKS.items()):
        store.commit_dir(task, make_adapter(tiny_backbone, task, seed=i, **overrides).save(tmp_path / "src" / task))
    return tmp_path / "store"


def _app(tiny_backbone, store: Path, **overrides):
    # One inference worker: tests here batch a poisoned task's rows with others' in one pass.
    return create_app(Settings(store=store, admin_token=ADMIN_TOKEN,
                               **{"max_wait_ms": 2, "inference_workers": 1, **overrides}),
                      backbone=tiny_backbone)


async def _upload(client, task: str, files: tuple[bytes, bytes]) -> httpx.Response:
    config, weights = files
    return await client.put(f"/admin/tasks/{task}", files={"config": config, "weights": weights}, headers=AUTH)


def _expected(service, task: str, text: str) -> list[float]:
    adapter = service.registry.get(task).adapter
    return classify_rows(service.backbone, [adapter], encode_texts(service.backbone, [text]))[0].tolist()


async def test_requests_batched_with_a_poisoned_task_answer_200(tiny_backbone, http_store, tmp_path):
    app = _app(tiny_backbone, http_store, max_wait_ms=500, max_batch_size=32)
    poison = overflowing_files(make_adapter(tiny_backbone, "poison", seed=3, prompt_layer=2), tmp_path / "p")
    async with serving(app) as client:
        service = app.state.service
        assert (await _upload(client, "poison", poison)).status_code == 201  # it passes validation
        requests = [
            client.post("/classify/poison", json={"texts": ["good film", "bad"]}),
            client.post("/classify", json={"items": [{"task": "poison", "text": "good"},
                                                     {"task": "beta", "text": "good"}]}),
            client.post("/classify/alpha", json={"texts": ["good film", "bad"]}),
            client.post("/classify/beta", json={"text": "terrible"}),
            client.post("/classify", json={"items": [{"task": "beta", "text": "bad"},
                                                     {"task": "alpha", "text": "good"}]}),
        ]
        poisoned, mixed_poisoned, alpha, beta, mixed = await asyncio.gather(*requests)
        batch = service.batcher.history[-1]

        assert batch.tasks == {"poison": 3, "alpha": 3, "beta": 3}  # they really shared one pass
        for r in (poisoned, mixed_poisoned):
            assert r.status_code == 500 and r.json()["error"]["type"] == "task_failed"
            assert "task 'poison' failed in the forward pass: its probabilities are not finite" in r.text
        assert alpha.status_code == beta.status_code == mixed.status_code == 200
        for text, pred in zip(["good film", "bad"], alpha.json()["predictions"], strict=True):
            assert list(pred["scores"].values()) == pytest.approx(_expected(service, "alpha", text), abs=1e-5)
        assert list(beta.json()["predictions"][0]["scores"].values()) == pytest.approx(
            _expected(service, "beta", "terrible"), abs=1e-5)
        for item, pred in zip([("beta", "bad"), ("alpha", "good")], mixed.json()["predictions"], strict=True):
            assert pred["score"] is not None
            assert list(pred["scores"].values()) == pytest.approx(_expected(service, *item), abs=1e-5)


async def test_a_task_that_keeps_failing_is_quarantined_until_upload_or_rollback(tiny_backbone, http_store, tmp_path):
    app = _app(tiny_backbone, http_store)
    poison = overflowing_files(make_adapter(tiny_backbone, "alpha", seed=3, prompt_layer=2), tmp_path / "p")
    good = adapter_files(make_adapter(tiny_backbone, "alpha", seed=4, prompt_layer=2), tmp_path / "g")
    async with serving(app) as client:
        service = app.state.service
        assert (await _upload(client, "alpha", poison)).status_code == 201  # v2
        for _ in range(3):
            r = await client.post("/classify/alpha", json={"text": "good"})
            assert r.status_code == 500 and r.json()["error"]["type"] == "task_failed"
        passes = len(service.batcher.history)

        r = await client.post("/classify/alpha", json={"text": "good"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "task_quarantined"
        message = r.json()["error"]["message"]
        assert message.startswith("task 'alpha' v2 is quarantined: it failed 3 forward passes in a row")
        assert message.endswith("; an operator must upload a new version or roll back")
        mixed = await client.post("/classify", json={"items": [{"task": "beta", "text": "x"},
                                                              {"task": "alpha", "text": "y"}]})
        assert mixed.status_code == 503
        assert len(service.batcher.history) == passes  # refused at admission: no pass ran for them
        assert (await client.post("/classify/beta", json={"text": "good"})).status_code == 200

        listed = {t["task"]: t for t in (await client.get("/tasks")).json()["tasks"]}
        assert listed["alpha"]["quarantined"] is True and "not finite" in listed["alpha"]["quarantine_reason"]
        assert listed["beta"]["quarantined"] is False and listed["beta"]["quarantine_reason"] is None
        one = (await client.get("/tasks/alpha")).json()
        assert one["quarantined"] is True and one["version"] == 2
        dashboard = (await client.get("/dashboard/data")).json()
        rows = {t["task"]: t for t in dashboard["tasks"]}
        assert rows["alpha"]["quarantined"] is True and rows["beta"]["quarantined"] is False
        served = {s["task"]: s for s in dashboard["served"]}
        assert served["alpha"]["quarantined"] is True and "quarantined" not in served["beta"]

        assert (await client.post("/admin/tasks/alpha/rollback", headers=AUTH)).status_code == 200
        r = await client.post("/classify/alpha", json={"text": "good"})
        assert r.status_code == 200 and r.json()["version"] == 1
        assert (await client.get("/tasks/alpha")).json()["quarantined"] is False

        assert (await _upload(client, "alpha", poison)).status_code == 201  # v3, the poison again
        for _ in range(3):
            await client.post("/classify/alpha", json={"text": "good"})
        assert (await client.post("/classify/alpha", json={"text": "good"})).status_code == 503
        assert (await _upload(client, "alpha", good)).status_code == 201  # v4
        r = await client.post("/classify/alpha", json={"text": "good"})
        assert r.status_code == 200 and r.json()["version"] == 4


async def test_rows_queued_before_the_quarantine_never_run(tiny_backbone, http_store):
    app = _app(tiny_backbone, http_store)
    async with app.router.lifespan_context(app):
        service = app.state.service
        alpha, beta = service.registry.get("alpha").adapter, service.registry.get("beta").adapter
        for _ in range(3):
            service.registry.record_failure(alpha, "boom")
        answers = service._run_batch([alpha, beta], encode_texts(tiny_backbone, ["good", "good"]))
    assert isinstance(answers[0], TaskQuarantined) and "task 'alpha' is quarantined" in answers[0].message
    assert answers[1] == pytest.approx(_expected(service, "beta", "good"), abs=1e-5)


# --------------------------------------------------------------------------------- what unauthenticated sees
async def test_the_training_record_is_only_on_the_single_task_route_and_capped(tiny_backbone, http_store, tmp_path):
    app = _app(tiny_backbone, http_store)
    small = {"dev_accuracy": 0.9, "epochs": 3}
    big = {"log": "x" * 20_000}  # under the config's 256 KiB, over the 16 KiB shown
    files = {}
    for task, record in [("small", small), ("big", big)]:
        config, weights = adapter_files(make_adapter(tiny_backbone, task, seed=1), tmp_path / task)
        files[task] = (json.dumps(json.loads(config) | {"training": record}).encode(), weights)
    async with serving(app) as client:
        for task, pair in files.items():
            assert (await _upload(client, task, pair)).status_code == 201
        listing = (await client.get("/tasks")).json()["tasks"]
        assert {t["task"] for t in listing} == {"alpha", "beta", "small", "big"}
        assert not any("training" in t or "training_note" in t for t in listing)
        assert (await client.get("/tasks/small")).json()["training"] == small
        one = (await client.get("/tasks/big")).json()
        assert "training" not in one
        assert one["training_note"] == "the training record is 20011 bytes, over the 16384 shown here"
