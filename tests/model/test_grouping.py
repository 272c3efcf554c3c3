"""Grouped generators and heads: many same-shaped tasks in one pass run as batched matmuls over their stacked
weights, and give what one call per task gives; a bad task in a group fails alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lpt_serve.model import engine
from lpt_serve.model.adapter import TaskAdapter
from lpt_serve.model.backbone import Backbone
from lpt_serve.model.engine import Encoded, TaskFault, classify_rows, classify_rows_isolated, encode_texts
from lpt_serve.model.generators import group_key
from lpt_serve.model.heads import head_group_key
from tests.helpers import make_adapter

WORDS = ["good", "bad", "film", "not", "very", "it", "was", "zq", "!", "42"]


def _zoo(bb: Backbone) -> list[TaskAdapter]:
    """Several tasks of each shape, so that groups form, beside shapes that stand alone."""
    zoo = []
    for i in range(4):
        zoo.append(make_adapter(bb, f"npg-{i}", seed=10 + i, generator="npg", prompt_layer=2, prompt_length=5,
                                labels=["neg", "pos"] if i % 2 else ["a", "b", "c"]))
    for i in range(3):
        zoo.append(make_adapter(bb, f"npg-short-{i}", seed=20 + i, generator="npg", prompt_layer=1,
                                prompt_length=2, bottleneck=8, pooling="cls"))
    for i in range(3):
        zoo.append(make_adapter(bb, f"mppg-{i}", seed=30 + i, generator="mppg", prompt_layer=1, prompt_length=3,
                                pooling="mean_prompt", labels=["x", "y", "z"]))
    for i in range(2):
        zoo.append(make_adapter(bb, f"appg-{i}", seed=40 + i, generator="appg", prompt_layer=3, prompt_length=7))
    zoo.append(make_adapter(bb, "static", seed=50, method="prompt", generator="static", prompt_layer=0,
                            prompt_length=4))
    for i in range(2):
        zoo.append(make_adapter(bb, f"verb-{i}", seed=60 + i, prompt_layer=2, prompt_length=2, head="verbalizer",
                                template="{text} . it was <mask> .", label_words=["bad", "good"]))
    return zoo


@pytest.fixture(scope="module")
def zoo(tiny_mlm_backbone):
    return _zoo(tiny_mlm_backbone)


@pytest.fixture
def grouping(monkeypatch):
    """Set how many same-shaped tasks form a group (a huge number turns grouping off). Tasks group on the CPU here,
    as they do on an accelerator, so that the grouped path is what runs."""
    monkeypatch.setattr(engine, "GROUP_ON_CPU", True)

    def set_min_tasks(value: int) -> None:
        monkeypatch.setattr(engine, "GROUP_MIN_TASKS", value)
    return set_min_tasks


def _rows(bb: Backbone, adapters: list[TaskAdapter], texts: list[str]) -> list[Encoded]:
    return [encode_texts(bb, [t], a.config.template)[0] for a, t in zip(adapters, texts, strict=True)]


texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_grouped_pass_equals_one_call_per_task(tiny_mlm_backbone, zoo, grouping, data):
    bb = tiny_mlm_backbone
    picks = data.draw(st.lists(st.tuples(st.sampled_from(range(len(zoo))), texts), min_size=1, max_size=24))
    adapters = [zoo[i] for i, _ in picks]
    encoded = _rows(bb, adapters, [t for _, t in picks])
    grouping(2)
    grouped = classify_rows(bb, adapters, encoded)
    grouping(1 << 30)
    per_task = classify_rows(bb, adapters, encoded)
    for adapter, g, p in zip(adapters, grouped, per_task, strict=True):
        assert g.shape == (len(adapter.labels),)
        torch.testing.assert_close(g, p, atol=1e-5, rtol=0)


def test_same_shaped_tasks_share_one_call(tiny_mlm_backbone, zoo, grouping, monkeypatch):
    bb = tiny_mlm_backbone
    grouping(2)
    calls = {"generators": [], "heads": [], "alone": 0}
    for name, key in (("grouped_prompts", "generators"), ("grouped_linear_logits", "heads")):
        real = getattr(engine, name)

        def spy(modules, *args, real=real, key=key):
            calls[key].append(len(modules))
            return real(modules, *args)

        monkeypatch.setattr(engine, name, spy)
    real_generate = TaskAdapter.generate

    def counted_generate(self, *args):
        calls["alone"] += 1
        return real_generate(self, *args)

    monkeypatch.setattr(TaskAdapter, "generate", counted_generate)
    npg = [a for a in zoo if a.task.startswith("npg-") and not a.task.startswith("npg-short")]
    encoded = encode_texts(bb, ["a good film"] * len(npg))  # one length: one bucket, one pass
    classify_rows(bb, npg, encoded)
    assert calls["generators"] == [len(npg)] and calls["alone"] == 0
    # Heads group by classifier shape: two 2-label and two 3-label heads make two grouped calls.
    assert sorted(calls["heads"]) == [2, 2]


def test_on_a_cpu_each_task_runs_its_own_calls(tiny_mlm_backbone, zoo, monkeypatch):
    calls = {"grouped_prompts": 0, "grouped_linear_logits": 0}
    for name in calls:
        real = getattr(engine, name)

        def spy(*args, real=real, name=name):
            calls[name] += 1
            return real(*args)

        monkeypatch.setattr(engine, name, spy)
    npg = [a for a in zoo if a.task.startswith("npg-") and not a.task.startswith("npg-short")]
    classify_rows(tiny_mlm_backbone, npg, encode_texts(tiny_mlm_backbone, ["a good film"] * len(npg)))
    assert calls == {"grouped_prompts": 0, "grouped_linear_logits": 0}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_per_task_shortcuts_equal_the_modules_own_forward(tiny_mlm_backbone, zoo, data):
    """On a CPU a plain NPG runs as two functional linears on its rows' first token, and a plain linear head reads
    its rows of one pooling shared by the pass: the answers are the modules' own forward, which a no-op hook on
    every generator and head forces (a hooked module always runs itself)."""
    bb = tiny_mlm_backbone
    picks = data.draw(st.lists(st.tuples(st.sampled_from(range(len(zoo))), texts), min_size=1, max_size=16))
    adapters = [zoo[i] for i, _ in picks]
    encoded = _rows(bb, adapters, [t for _, t in picks])
    fast = classify_rows(bb, adapters, encoded)
    hooks = [m.register_forward_hook(lambda *args: None) for a in zoo for m in (a.generator, a.head)]
    try:
        assert all(group_key(a.generator) is None and head_group_key(a.head) is None for a in zoo)
        own = classify_rows(bb, adapters, encoded)
    finally:
        for hook in hooks:
            hook.remove()
    for f, o in zip(fast, own, strict=True):
        torch.testing.assert_close(f, o, atol=1e-6, rtol=0)


def test_what_may_be_grouped(tiny_mlm_backbone, zoo):
    by_name = {a.task: a for a in zoo}
    assert group_key(by_name["npg-0"].generator) == group_key(by_name["npg-1"].generator)
    assert group_key(by_name["npg-0"].generator) != group_key(by_name["npg-short-0"].generator)
    assert group_key(by_name["mppg-0"].generator) != group_key(by_name["appg-0"].generator)
    assert group_key(by_name["static"].generator) is None
    assert head_group_key(by_name["npg-0"].head) != head_group_key(by_name["npg-1"].head)  # 3 labels vs 2
    patched = make_adapter(tiny_mlm_backbone, "patched", seed=1, prompt_layer=2)
    patched.generator.forward = lambda *a: None
    patched.head.forward = lambda *a: None
    assert group_key(patched.generator) is None and head_group_key(patched.head) is None
    training = make_adapter(tiny_mlm_backbone, "training", seed=2, prompt_layer=2).train()
    assert group_key(training.generator) is None and head_group_key(training.head) is None  # dropout is live


# ------------------------------------------------------------------------------------------------ isolation
def _npg_family(bb: Backbone, count: int) -> list[TaskAdapter]:
    return [make_adapter(bb, f"fam-{i}", seed=100 + i, generator="npg", prompt_layer=2, prompt_length=5)
            for i in range(count)]


def _poison(adapter: TaskAdapter, where: str, value: float) -> TaskAdapter:
    module = adapter.generator.up if where == "generator" else adapter.head.classifier
    with torch.no_grad():
        module.weight.fill_(value)
    return adapter


@pytest.mark.parametrize("where", ["generator", "head"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e38])
def test_a_poisoned_member_fails_alone_and_the_group_answers_as_alone(tiny_backbone, grouping, where, value):
    bb = tiny_backbone
    grouping(2)
    family = _npg_family(bb, 5)
    bad = _poison(family[2], where, value)
    adapters = [family[i % 5] for i in range(10)]
    encoded = encode_texts(bb, [" ".join(WORDS[: 1 + i % 4]) for i in range(10)])
    answers = classify_rows_isolated(bb, adapters, encoded)
    for adapter, enc, answer in zip(adapters, encoded, answers, strict=True):
        if adapter is bad:
            assert isinstance(answer, TaskFault) and answer.task == bad.task
        else:
            assert isinstance(answer, torch.Tensor), answer
            torch.testing.assert_close(answer, classify_rows(bb, [adapter], [enc])[0], atol=1e-5, rtol=0)


def test_a_grouped_call_that_raises_falls_back_to_one_call_per_task(tiny_backbone, grouping, monkeypatch):
    bb = tiny_backbone
    family = _npg_family(bb, 4)
    adapters = family * 2
    encoded = encode_texts(bb, ["good film", "bad", "it was not very good", "42"] * 2)
    grouping(1 << 30)
    expected = classify_rows(bb, adapters, encoded)

    def broken(*args):
        raise RuntimeError("a grouped kernel that fails")

    grouping(2)
    monkeypatch.setattr(engine, "grouped_prompts", broken)
    monkeypatch.setattr(engine, "grouped_linear_logits", broken)
    answers = classify_rows_isolated(bb, adapters, encoded)
    for got, want in zip(answers, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_member_whose_module_raises_is_named(tiny_backbone, grouping):
    bb = tiny_backbone
    grouping(2)
    family = _npg_family(bb, 4)

    def raises(*args, **kwargs):
        raise RuntimeError("boom")

    family[1].generator.forward = raises
    family[3].head.forward = raises
    answers = classify_rows_isolated(bb, family, encode_texts(bb, ["good"] * 4))
    assert [a.stage if isinstance(a, TaskFault) else "ok" for a in answers] == ["ok", "generator", "ok", "head"]


# ------------------------------------------------------------------------------------------ gradients
def test_the_trainer_path_still_takes_gradients(tiny_backbone):
    bb = tiny_backbone
    adapter = make_adapter(bb, "train-me", seed=3, prompt_layer=1).train()
    ids = bb.tokenize(["a good film", "bad"])
    hidden = bb.lower(ids["input_ids"], ids["attention_mask"], upto=1)
    group = engine.TaskGroup(adapter, torch.arange(2))
    logits = engine.upper_forward(bb, hidden, ids["attention_mask"], 1, [group])[0]
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter.parameters())
