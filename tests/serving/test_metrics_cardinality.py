"""Per-task metric series are bounded: the allow-list and then the first tasks seen get their own label, every
other task is counted under "_other"."""

from __future__ import annotations

from lpt_serve.api.app import create_app
from lpt_serve.api.settings import Settings
from lpt_serve.serving.metrics import OTHER_TASKS, Metrics
from lpt_serve.serving.store import AdapterStore
from tests.helpers import make_adapter, serving


def test_allow_list_then_first_come_then_other():
    metrics = Metrics(max_tasks=3, allow=["keep"])
    assert [metrics.task_label(t) for t in ["a", "b", "keep", "c", "a", "d"]] == ["a", "b", "keep", OTHER_TASKS,
                                                                                  "a", OTHER_TASKS]


async def test_metrics_hold_at_most_the_cap_of_task_series(tiny_backbone, tmp_path):
    store = AdapterStore(tmp_path / "store")
    names = [f"t{i}" for i in range(5)]
    for i, task in enumerate(names):
        store.commit_dir(task, make_adapter(tiny_backbone, task, seed=i).save(tmp_path / task))
    app = create_app(Settings(store=store.root, max_wait_ms=2, metrics_max_tasks=2, metrics_tasks="t4"),
                     backbone=tiny_backbone)
    async with serving(app) as client:
        for task in names:
            assert (await client.post(f"/classify/{task}", json={"text": "good"})).status_code == 200
        text = (await client.get("/metrics")).text
    labelled = {line.split('task="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("lpt_rows_total{")}
    assert labelled == {"t4", "t0", OTHER_TASKS}
    assert 'lpt_rows_total{task="_other"} 3.0' in text
    assert 'lpt_requests_total{status="200",task="_other"} 3.0' in text
