"""`GET /tasks` and `GET /tasks/{task}`: what is served, from the registry.

Both are unauthenticated, so they say what a client needs to call a task and no more: the listing never carries
an adapter's `training` record (whatever its uploader put there), and the single-task view carries it only
while it is small.
"""

from __future__ import annotations

import json

from fastapi import APIRouter

from lpt_client.schemas import TaskInfo, TaskList
from lpt_serve.api.deps import ServiceDep, TaskPath
from lpt_serve.api.errors import statuses
from lpt_serve.errors import TaskNotFound, Unavailable
from lpt_serve.serving.registry import Registry, ServedTask

router = APIRouter(tags=["tasks"])

MAX_TRAINING_BYTES = 16 * 1024  # a trainer's summary is ~300 bytes; anything far bigger is not a summary


def task_info(registry: Registry, served: ServedTask, *, with_training: bool = False) -> TaskInfo:
    cfg = served.adapter.config
    reason = registry.quarantine_reason(served.adapter)
    extra: dict = {}
    if with_training and cfg.training is not None:
        size = len(json.dumps(cfg.training))
        if size <= MAX_TRAINING_BYTES:
            extra["training"] = cfg.training
        else:
            extra["training_note"] = f"the training record is {size} bytes, over the {MAX_TRAINING_BYTES} shown here"
    return TaskInfo(
        task=served.task, version=served.version, versions=list(served.versions), labels=cfg.labels,
        method=cfg.method, generator=cfg.generator, prompt_layer=cfg.prompt_layer, prompt_length=cfg.prompt_length,
        bottleneck=cfg.bottleneck, head=cfg.head, parameters=served.adapter.num_parameters(), bytes=served.nbytes,
        location=registry.location(served), pinned=served.task in registry.pinned,
        quarantined=reason is not None, quarantine_reason=reason, **extra,
    )


@router.get("/tasks", response_model=TaskList, responses=statuses(Unavailable))
async def list_tasks(service: ServiceDep) -> TaskList:
    """Every served task: version(s), labels, generator, prompt layer and length, size, where it lives, whether it
    is quarantined. The training record is on `GET /tasks/{task}` only."""
    registry = service.resolve_registry()
    return TaskList(tasks=[task_info(registry, s) for s in registry.served()])


@router.get("/tasks/{task}", response_model=TaskInfo, responses=statuses(TaskNotFound, Unavailable))
async def get_task(task: TaskPath, service: ServiceDep) -> TaskInfo:
    """One served task, with its training record when that is at most 16 KiB (a note says so otherwise). A
    quarantined task is described here too; its classify requests answer 503 `task_quarantined`."""
    registry = service.resolve_registry()
    return task_info(registry, registry.get(task), with_training=True)
