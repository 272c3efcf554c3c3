"""`POST /classify/{task}` and `POST /classify`: requests in, the service's predictions out, outcomes counted.

`FastClassify` answers the ordinary `POST /classify/{task}` (a JSON body under the cap that parses and validates)
ahead of FastAPI: the same parse, model, service calls and answers, without the routing, dependency solving and
middleware layers that were a fifth of the event loop's time per request. Anything else it hands, body and all, to
the app, whose route and handlers answer as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lpt_client.schemas import TASK_NAME_PATTERN, ClassifyRequest, ClassifyResult, MixedRequest, MixedResponse
from lpt_serve.api.deps import ServiceDep, StrictJsonRoute, TaskPath, parse_json_body
from lpt_serve.api.errors import answer_domain_error, answer_unexpected, error_body, kind_of, statuses
from lpt_serve.errors import (
    DeadlineExceeded,
    InputTooLarge,
    InvalidInput,
    LptServeError,
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
    return await _classify_one(service, task, body, request.receive, request.url.path)


async def _classify_one(service: Service, task: str, body: ClassifyRequest, receive: Receive, path: str) -> Response:
    """The answer to `POST /classify/{task}`, on either path (the route above, `FastClassify`)."""
    served = await service.resolve(task)
    predictions = await _answer(receive, path, service, [(served, text) for text in body.all_texts()])
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
    predictions = await _answer(request.receive, request.url.path, service, pairs)
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


async def _answer(receive: Receive, path: str, service: Service,
                  pairs: Sequence[tuple[ServedTask, str]]) -> list[Prediction] | None:
    """The service's predictions, with each task's request and its outcome counted; None if the client left."""
    tasks = {served.task for served, _ in pairs}
    metrics = service.metrics
    try:
        predictions = await _unless_client_leaves(receive, path, service.classify(pairs))
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


async def _unless_client_leaves(receive: Receive, path: str, work: Awaitable[T]) -> T | None:
    """Await `work`, unless the client hangs up first: then cancel it (its rows leave the queue) and answer None."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
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
    log.info("client went away before its answer; its rows were dropped", extra={"path": path})
    return None


async def _disconnected(receive: Receive) -> None:
    """Once the body is read, the next ASGI message is the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


# ------------------------------------------------------------------------------------------- the fast path
PREFIX = "/classify/"


class FastClassify:
    """`POST /classify/{task}` without FastAPI's routing, dependency solving and middleware stack, for the requests
    that path would answer from the route itself: a valid task name, a JSON content type, a declared body length
    within the cap, a body that `parse_json_body` parses and `ClassifyRequest` accepts. Its answers, errors
    included, are the route's (`_classify_one`, `error_response`); a test sends the same requests both ways.
    Every other request goes to `app` untouched, and one whose body turns out not to parse or validate goes with
    its body replayed, so FastAPI's own checks answer it as before."""

    def __init__(self, app: ASGIApp, service: Service, request_cap: int) -> None:
        self.app, self.service, self.request_cap = app, service, request_cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = self._task(scope)
        if task is None:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if (not (declared.isascii() and declared.isdigit()) or int(declared) > self.request_cap
                or "transfer-encoding" in headers
                or headers.get("content-type", "").split(";")[0].strip().lower() != "application/json"):
            return await self.app(scope, receive, send)  # the app's checks and the body cap answer these
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before its body arrived: nobody to answer
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.request_cap:  # more than it declared; the server's framing should not let it
                response = Response(orjson.dumps(error_body("too_large", f"the request body is over "
                                    f"{self.request_cap} bytes (LPT_MAX_REQUEST_BYTES)")),
                                    status_code=413, media_type="application/json", headers={"Connection": "close"})
                return await response(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            request = ClassifyRequest.model_validate(parse_json_body(body))
        except (ValueError, ValidationError):  # JSONDecodeError is a ValueError: the app says what is wrong
            return await self.app(scope, _replaying(body, receive), send)
        try:
            response = await _classify_one(self.service, task, request, receive, scope["path"])
        except LptServeError as exc:
            response = answer_domain_error(exc, "POST", scope["path"])
        except Exception:
            response = answer_unexpected("POST", scope["path"])
        await response(scope, receive, send)

    @staticmethod
    def _task(scope: Scope) -> str | None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path = get_route_path(scope)  # what the router matches: the path less any root path it carries
        if not path.startswith(PREFIX):
            return None
        task = path[len(PREFIX):]
        return task if TASK_NAME_PATTERN.fullmatch(task) else None


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the body already read, then whatever the client sends next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
