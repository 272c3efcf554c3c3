"""The real default backbone (all-MiniLM-L6-v2 from its PyPI package) and the shipped demo adapters. Marked slow."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from lpt_serve.api.app import create_app
from lpt_serve.api.settings import Settings
from lpt_serve.model.adapter import load_adapter
from lpt_serve.model.backbone import Backbone, default_backbone_path
from lpt_serve.model.engine import classify_rows, encode_texts
from lpt_serve.paths import demo_adapters_dir
from lpt_serve.serving.store import AdapterStore
from tests.helpers import serving

pytestmark = pytest.mark.slow

DEMO_TASKS = {"mr", "bbc", "tweets"}
OBVIOUS = [
    ("mr", "a moving, beautifully acted and deeply funny film", "positive"),
    ("mr", "a tedious, clumsy mess that wastes its cast", "negative"),
    ("bbc", "The central bank raised interest rates again as company profits and share prices fell.", "business"),
    ("bbc", "The striker scored twice as the club won the cup final in extra time.", "sports"),
    ("bbc", "The prime minister faces a vote in parliament over the election manifesto.", "politics"),
    ("bbc", "The new smartphone chip makes software run faster and saves battery on mobile devices.", "tech"),
    ("tweets", "I love this so much, best day ever!", "positive"),
    ("tweets", "this is awful, I hate waiting in line for hours", "negative"),
]


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone.load(device="cpu", dtype="float32")


def test_split_forward_equals_transformers_on_the_real_model(backbone):
    reference = AutoModel.from_pretrained(default_backbone_path(), attn_implementation="eager").eval()
    batch = backbone.tokenize(["a short one", "a somewhat longer sentence, with punctuation, for padding"])
    with torch.inference_mode():
        ours = backbone(batch["input_ids"], batch["attention_mask"])
        theirs = reference(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    assert backbone.fingerprint.hidden_size == 384 and backbone.num_layers == 6


# Read in place, never written: the repository's adapters_store/ is seed data.
DEMO_STORE = AdapterStore.read_only(demo_adapters_dir())


def test_demo_adapters_are_shipped_small_and_load(backbone):
    records = DEMO_STORE.tasks()
    assert set(records) >= DEMO_TASKS
    for task in DEMO_TASKS:
        folder = records[task].path()
        assert sum(f.stat().st_size for f in folder.iterdir()) < 2 * 1024 * 1024
        adapter = load_adapter(folder, backbone)
        test = adapter.config.training["test"]
        assert adapter.config.training["data"] == task and test["accuracy"] > 0.7


@pytest.mark.parametrize("task,text,label", OBVIOUS)
def test_demo_adapters_get_the_obvious_right(backbone, task, text, label):
    adapter = load_adapter(DEMO_STORE.get(task).path(), backbone)
    probs = classify_rows(backbone, [adapter], encode_texts(backbone, [text]))[0]
    assert adapter.labels[int(probs.argmax())] == label


async def test_server_on_the_default_backbone_answers_real_classifications(backbone, tmp_path):
    # A new store is seeded with the demo tasks, as on a user's first start.
    app = create_app(Settings(store=tmp_path / "store"), backbone=backbone)
    async with serving(app) as client:
        items = [{"task": t, "text": x} for t, x, _ in OBVIOUS]
        r = await client.post("/classify", json={"items": items})
        assert r.status_code == 200
        assert [p["label"] for p in r.json()["predictions"]] == [y for _, _, y in OBVIOUS]
        tasks = {t["task"] for t in (await client.get("/tasks")).json()["tasks"]}
        assert tasks >= DEMO_TASKS


@pytest.mark.network
def test_recorded_test_accuracy_reproduces(backbone):
    from lpt_serve.training.data import materialize, read_examples
    from lpt_serve.training.trainer import evaluate

    adapter = load_adapter(DEMO_STORE.get("mr").path(), backbone)
    rows = read_examples(materialize("mr")["test"])
    metrics = evaluate(backbone, adapter, rows)
    assert metrics["accuracy"] == pytest.approx(adapter.config.training["test"]["accuracy"], abs=1e-3)
