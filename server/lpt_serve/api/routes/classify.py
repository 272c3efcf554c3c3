"""`POST /classify/{task}` and `POST /classify`: requests in, the service's predictions out, outcomes counted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import orjson
from fastapi import APIRouter, Request, Response

from lpt_client.schemas import ClassifyRequest, ClassifyResult, MixedRequest, MixedResponse
from lpt_serve.api.deps import ServiceDep, StrictJsonRoute, TaskPath
from lpt_serve.api.errors import kind_of, statuses
from lpt_serve.errors import (
    DeadlineExceeded,
    InputTooLarge,
    InvalidInput,
    Overloaded,
    TaskFailed,
    TaskNotFound,
    TaskQuarantined,
    Unavailable,
)
from lpt_serve.serving.registry import ServedTask
from lpt_serve.serving.service import Prediction, Service

log = logging.getLogger(__name__)
# Bodies are parsed by `deps.parse_json_body`: bad UTF-8, lone surrogates and the like are a 422, not a 400 or 500.
router = APIRouter(tags=["classify"], route_class=StrictJsonRoute)
ERRORS = statuses(InvalidInput, TaskNotFound, InputTooLarge, Overloaded, Unavailable, DeadlineExceeded, TaskFailed,
                  TaskQuarantined)
T = TypeVar("T")

# nginx's code for "the client closed the request": nobody reads it, but the access log says what happened.
CLIENT_GONE = 499


@router.post("/classify/{task}", response_model=ClassifyResult, responses=ERRORS)
async def classify_task(task: TaskPath, body: ClassifyRequest, request: Request, service: ServiceDep):
    """Classify one text (`text`) or several (`texts`) with one task; predictions come in input order.

    Texts longer than the backbone's limit are cut to fit and flagged `truncated: true`.
    """
    served = await service.resolve(task)
    predictions = await _answer(request, service, [(served, text) for text in body.all_texts()])
    if predictions is None:
        return Response(status_code=CLIENT_GONE)
    return _json({"task": served.task, "version": served.version, "predictions": [
        {"label": p.label, "score": p.score, "scores": p.scores, "truncated": p.truncated} for p in predictions]})


@router.post("/classify", response_model=MixedResponse, responses=ERRORS)
async def classify_mixed(body: MixedRequest, request: Request, service: ServiceDep):
    """Many tasks in one call: one prediction per item, in order. Items on the same text (and template) share
    the layers below the prompt layer."""
    resolved = await service.resolve_many([item.task for item in body.items])
    pairs = [(served, item.text) for served, item in zip(resolved, body.items, strict=True)]
    predictions = await _answer(request, service, pairs)
    if predictions is None:
        return Response(status_code=CLIENT_GONE)
    return _json({"predictions": [
        {"task": p.task, "version": p.version, "label": p.label, "score": p.score, "scores": p.scores,
         "truncated": p.truncated} for p in predictions]})


def _json(body: dict) -> Response:
    """The answer serialised once, by orjson: the dict is built from the service's own typed predictions in the
    shape `response_model` documents (tests check the two agree), so FastAPI's second validation pass and its
    encoder would only repeat work on the hottest path."""
    return Response(orjson.dumps(body), media_type="application/json")


async def _answer(request: Request, service: Service,
                  pairs: Sequence[tuple[ServedTask, str]]) -> list[Prediction] | None:
    """The service's predictions, with each task's request and its outcome counted; None if the client left."""
    tasks = {served.task for served, _ in pairs}
    metrics = service.metrics
    try:
        predictions = await _unless_client_leaves(request, service.classify(pairs))
    except Exception as exc:
        kind = kind_of(exc)
        for task in tasks:
            metrics.requests.labels(metrics.task_label(task), str(kind.status)).inc()
            metrics.errors.labels(metrics.task_label(task), kind.type).inc()
        raise
    if predictions is not None:
        for task in tasks:
            metrics.requests.labels(metrics.task_label(task), "200").inc()
    return predictions


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, unless the client hangs up first: then cancel it (its rows leave the queue) and answer None."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        job.cancel()
        raise
    finally:
        gone.cancel()
    if job.done():
        return job.result()
    # Cancelling takes effect when the job next runs: wait for it, so its rows are out of the queue when we return.
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await job
    log.info("client went away before its answer; its rows were dropped", extra={"path": request.url.path})
    return None


async def _disconnected(request: Request) -> None:
    """Once the body is read, the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
