"""`GET /tasks` and `GET /tasks/{task}`: what is served, from the registry."""

from __future__ import annotations

from fastapi import APIRouter
from lpt_client.schemas import TaskInfo, TaskList
from lpt_serve.api.deps import ServiceDep
from lpt_serve.api.errors import statuses
from lpt_serve.errors import TaskNotFound, Unavailable
from lpt_serve.serving.registry import Registry, ServedTask

router = APIRouter(tags=["tasks"])


def task_info(registry: Registry, served: ServedTask) -> TaskInfo:
    cfg = served.adapter.config
    return TaskInfo(
        task=served.task, version=served.version, versions=list(served.versions), labels=cfg.labels,
        method=cfg.method, generator=cfg.generator, prompt_layer=cfg.prompt_layer, prompt_length=cfg.prompt_length,
        bottleneck=cfg.bottleneck, head=cfg.head, parameters=served.adapter.num_parameters(), bytes=served.nbytes,
        location=registry.location(served), pinned=served.task in registry.pinned, training=cfg.training,
    )


@router.get("/tasks", response_model=TaskList, responses=statuses(Unavailable))
async def list_tasks(service: ServiceDep) -> TaskList:
    """Every served task: version(s), labels, generator, prompt layer and length, size, where it lives."""
    registry = service.resolve_registry()
    return TaskList(tasks=[task_info(registry, s) for s in registry.served()])


@router.get("/tasks/{task}", response_model=TaskInfo, responses=statuses(TaskNotFound, Unavailable))
async def get_task(task: str, service: ServiceDep) -> TaskInfo:
    return task_info(service.resolve_registry(), service.resolve(task))
