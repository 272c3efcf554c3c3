"""`GET /tasks` and `GET /tasks/{task}`: what is served, from the registry's index.

`GET /tasks` pages (`limit`, `cursor`) and filters (`prefix`, `tier`, `label`) over every task in the store, loaded
or not, and by default answers a compact record per task; `view=full` (what the client uses) gives each task's full
record. Neither ever loads an adapter: a task on disk is described from its config file.

Both are unauthenticated, so they say what a client needs to call a task and no more: the listing never carries
an adapter's `training` record (whatever its uploader put there), and the single-task view carries it only
while it is small.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from lpt_client.schemas import TaskInfo, TaskList, TaskSummaries, TaskSummary
from lpt_serve.api.deps import ServiceDep, TaskPath
from lpt_serve.api.errors import statuses
from lpt_serve.errors import AdapterError, TaskNotFound, Unavailable
from lpt_serve.format import WEIGHTS_NAME
from lpt_serve.serving.registry import Registry, ServedTask, TaskEntry

router = APIRouter(tags=["tasks"])

MAX_TRAINING_BYTES = 16 * 1024  # a trainer's summary is ~300 bytes; anything far bigger is not a summary
MAX_PAGE = 1000


def task_info(registry: Registry, served: ServedTask | TaskEntry, *, with_training: bool = False) -> TaskInfo:
    """The full record, from the loaded adapter when there is one, else from the stored config (no weights)."""
    if isinstance(served, TaskEntry):
        served = registry.loaded(served.task) or served
    if isinstance(served, ServedTask):
        cfg = served.adapter.config
        parameters, nbytes = served.adapter.num_parameters(), served.nbytes
    else:
        try:
            cfg = registry.config(served)
        except (OSError, AdapterError) as exc:
            raise TaskNotFound(f"task {served.task!r} v{served.version} has no readable config: {exc}") from exc
        parameters, nbytes = registry.estimated_size(cfg, served.path / WEIGHTS_NAME)
    reason = registry.quarantine_reason_of(served.task, served.version)
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
        bottleneck=cfg.bottleneck, head=cfg.head, parameters=parameters, bytes=nbytes,
        location=registry.location(served), pinned=served.task in registry.pinned,
        quarantined=reason is not None, quarantine_reason=reason, **extra,
    )


def task_summary(registry: Registry, entry: TaskEntry) -> TaskSummary:
    reason = registry.quarantine_reason_of(entry.task, entry.version)
    return TaskSummary(task=entry.task, version=entry.version, labels=list(registry.labels(entry)),
                       location=registry.location(entry), quarantined=reason is not None, quarantine_reason=reason)


def _page(registry: Registry, *, limit: int, cursor: str | None, prefix: str | None, tier: str | None,
          label: str | None) -> tuple[list[TaskEntry], str | None]:
    """One page of the index in name order, after `cursor` (the last name of the previous page). Blocking: a label
    filter reads each candidate's config file once (then it is remembered)."""
    chosen: list[TaskEntry] = []
    for entry in registry.entries():
        if cursor is not None and entry.task <= cursor:
            continue
        if prefix and not entry.task.startswith(prefix):
            continue
        if tier is not None and registry.location(entry) != tier:
            continue
        if label is not None and label not in registry.labels(entry):
            continue
        if len(chosen) == limit:
            return chosen, chosen[-1].task
        chosen.append(entry)
    return chosen, None


@router.get("/tasks", response_model=TaskSummaries | TaskList, responses=statuses(Unavailable))
async def list_tasks(
    service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="tasks per page")] = 100,
    cursor: Annotated[str | None, Query(max_length=64, description="the `next` of the previous page")] = None,
    prefix: Annotated[str | None, Query(max_length=64, description="only tasks whose name starts with this")] = None,
    tier: Annotated[Literal["gpu", "cpu", "disk"] | None, Query(description="only tasks in this tier now")] = None,
    label: Annotated[str | None, Query(max_length=256, description="only tasks with this label")] = None,
    view: Annotated[Literal["compact", "full"], Query(description="compact: name, version, labels, location, "
                                                                  "quarantine; full: every field")] = "compact",
) -> TaskSummaries | TaskList:
    """Every task in the store, a page at a time in name order; `next` is the cursor of the following page (null
    on the last). The training record is on `GET /tasks/{task}` only."""
    registry = service.resolve_registry()
    await registry.indexed()  # right after a start the index may still be being read: a page must not miss tasks
    entries, next_cursor = await asyncio.to_thread(_page, registry, limit=limit, cursor=cursor, prefix=prefix,
                                                   tier=tier, label=label)
    if view == "full":
        infos = await asyncio.to_thread(lambda: [_info_or_none(registry, e) for e in entries])
        return TaskList(tasks=[i for i in infos if i is not None], next=next_cursor)
    return TaskSummaries(tasks=[task_summary(registry, e) for e in entries], next=next_cursor)


def _info_or_none(registry: Registry, entry: TaskEntry) -> TaskInfo | None:
    # A task whose config cannot be read is left out of the full listing rather than failing the whole page.
    try:
        return task_info(registry, entry)
    except TaskNotFound:
        return None


@router.get("/tasks/{task}", response_model=TaskInfo, responses=statuses(TaskNotFound, Unavailable))
async def get_task(task: TaskPath, service: ServiceDep) -> TaskInfo:
    """One served task, with its training record when that is at most 16 KiB (a note says so otherwise). A
    quarantined task is described here too; its classify requests answer 503 `task_quarantined`. A task not in
    memory is described from its stored config, without loading it."""
    registry = service.resolve_registry()
    entry = registry.entry(task)
    return await asyncio.to_thread(task_info, registry, entry, with_training=True)
