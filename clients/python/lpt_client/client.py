"""HTTP clients for lpt-serve: a synchronous `LptClient` and an asynchronous `AsyncLptClient`.

Both clients share every decision (request building, retry policy, response and error parsing) through
`_LptBase`. Each operation is a small generator ("flow") that yields what it needs done -- send this request,
sleep this long -- and receives the outcome; the two clients differ only in the driver that performs those
steps with blocking or awaitable I/O.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeAlias, TypeVar
from urllib.parse import quote, urlencode

import httpx
import pydantic
from pydantic import BaseModel

from lpt_client.schemas import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    ClassifyResult,
    MixedPrediction,
    MixedResponse,
    Prediction,
    TaskInfo,
    TaskList,
    UploadResult,
)

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "AsyncLptClient",
    "AuthError",
    "BadAdapterError",
    "ClassifyResult",
    "LptClient",
    "LptConnectionError",
    "LptError",
    "MixedPrediction",
    "OverloadedError",
    "PayloadTooLargeError",
    "Prediction",
    "ServerError",
    "ServerTimeoutError",
    "TaskInfo",
    "TaskNotFoundError",
    "UnexpectedResponseError",
    "UploadResult",
    "ValidationError",
]

logger = logging.getLogger(__name__)

# Overload responses mean the server shed the request before doing any work, so retrying is safe for every
# method; all other error statuses are final.
_RETRY_STATUSES = frozenset({429, 503})
_MAX_ERROR_TEXT = 1000
TASKS_PAGE = 1000  # full task records per `GET /tasks` page (the server's maximum)
_DEFAULT_HEADERS = {"Accept": "application/json", "User-Agent": "lpt-serve-client/0.1"}

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------- results



# ---------------------------------------------------------------------------------------------------- errors


class LptError(Exception):
    """An error response from the server (or no usable response at all).

    `status` is the HTTP status, or 0 when no response arrived (`LptConnectionError`). `type` and `message`
    come from the server's `{"error": {"type", "message"}}` body when it has that shape; otherwise `type` is
    `http_<status>` and `message` is the raw body text. `retry_after` is the parsed `Retry-After` header in
    seconds, when present.
    """

    def __init__(self, status: int, type: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(status, type, message, retry_after)
        self.status = status
        self.type = type
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        prefix = f"HTTP {self.status} " if self.status else ""
        return f"{prefix}{self.type}: {self.message}"


class ValidationError(LptError):
    """422: the request body was rejected (empty text, too many texts, wrong types, ...)."""


class TaskNotFoundError(LptError):
    """404: no such task (or no such version to roll back to)."""


class BadAdapterError(LptError):
    """400: the uploaded adapter is malformed or does not fit the served backbone."""


class PayloadTooLargeError(LptError):
    """413: request body over the server's limit."""


class AuthError(LptError):
    """401/403: missing, wrong or insufficient admin token."""


class OverloadedError(LptError):
    """429/503: the server shed the request; `retry_after` says when to come back, if the server said."""


class ServerTimeoutError(LptError):
    """504: the server gave up waiting for the model."""


class ServerError(LptError):
    """Any other 5xx."""


class UnexpectedResponseError(LptError):
    """A success status whose body does not match the contract (wrong JSON shape, prediction count, ...)."""


class LptConnectionError(LptError):
    """No HTTP response: connection refused/reset, DNS failure, client-side timeout. `status` is 0."""


_ERRORS_BY_STATUS: dict[int, type[LptError]] = {
    400: BadAdapterError,
    401: AuthError,
    403: AuthError,
    404: TaskNotFoundError,
    413: PayloadTooLargeError,
    422: ValidationError,
    429: OverloadedError,
    503: OverloadedError,
    504: ServerTimeoutError,
}


def _error_class(status: int) -> type[LptError]:
    if status in _ERRORS_BY_STATUS:
        return _ERRORS_BY_STATUS[status]
    return ServerError if status >= 500 else LptError


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header; the contract sends seconds, but HTTP also allows a date."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _error_from_response(response: httpx.Response) -> LptError:
    status = response.status_code
    retry_after = _parse_retry_after(response.headers.get("Retry-After"))
    error_type, message = f"http_{status}", ""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict) and isinstance(detail.get("type"), str) and isinstance(detail.get("message"), str):
        error_type, message = detail["type"], detail["message"]
    else:
        # Proxies and crashed workers answer with HTML or a framework default body; keep it for debugging.
        message = response.text[:_MAX_ERROR_TEXT] or response.reason_phrase
    return _error_class(status)(status, error_type, message, retry_after)


# ---------------------------------------------------------------------------------------------------- shared


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One HTTP request the flow wants sent, plus how to turn its success response into a result."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    files: Mapping[str, tuple[str, bytes, str]] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def idempotent(self) -> bool:
        return self.method == "GET"

    def request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"method": self.method, "url": self.path, "headers": dict(self.headers)}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.files is not None:
            kwargs["files"] = dict(self.files)
        return kwargs


@dataclass(frozen=True)
class _Sleep:
    seconds: float


# A flow yields steps and is sent back a response (or thrown the transport error) for each `_Call`, and None
# after each `_Sleep`; its return value is the operation's result.
_Step: TypeAlias = _Call[Any] | _Sleep
_Flow: TypeAlias = Generator[_Step, httpx.Response | None, T]
_Reply: TypeAlias = httpx.Response | httpx.TransportError | None


def _advance(flow: _Flow[T], reply: _Reply) -> _Step:
    if isinstance(reply, httpx.TransportError):
        return flow.throw(reply)
    return flow.send(reply)


def _parse_model(response: httpx.Response, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate_json(response.content)
    except pydantic.ValidationError as exc:
        raise UnexpectedResponseError(
            response.status_code,
            "invalid_response",
            f"{response.request.method} {response.request.url.path}: body does not match {model.__name__}: {exc}",
        ) from exc


def _task_path(task: str) -> str:
    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be a non-empty string, got {task!r}")
    # Quote everything, '/' included, so a task name can never address a different route.
    return quote(task, safe="")


def _check_count(response: httpx.Response, got: int, expected: int) -> None:
    if got != expected:
        raise UnexpectedResponseError(
            response.status_code,
            "invalid_response",
            f"{response.request.url.path}: sent {expected} texts but got {got} predictions",
        )


class _LptBase:
    def __init__(
        self,
        *,
        admin_token: str | None,
        timeout: float,
        max_retries: int,
        backoff: float,
        max_retry_wait: float,
        rng: random.Random | None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if backoff < 0 or max_retry_wait < 0:
            raise ValueError("backoff and max_retry_wait must be >= 0")
        self.admin_token = admin_token
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_retry_wait = max_retry_wait
        self._rng = rng or random.Random()

    # -- retry policy

    def _retry_wait(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_wait)
        # "Equal jitter": keeps at least half the exponential delay while spreading clients that were shed
        # together, so they do not come back as one burst.
        delay = self.backoff * 2**attempt
        return min(delay / 2 + self._rng.uniform(0, delay / 2), self.max_retry_wait)

    def _exchange(self, call: _Call[T]) -> _Flow[T]:
        attempt = 0
        while True:
            try:
                response = yield call
            except httpx.TransportError as exc:
                if not call.idempotent or attempt >= self.max_retries:
                    raise LptConnectionError(
                        0, "connection_error", f"{call.method} {call.path}: {type(exc).__name__}: {exc}"
                    ) from exc
                wait = self._retry_wait(attempt, None)
                logger.debug("%s %s failed (%r); retry %d in %.3fs", call.method, call.path, exc, attempt + 1, wait)
            else:
                assert response is not None
                if response.is_success:
                    return call.parse(response)
                error = _error_from_response(response)
                if response.status_code not in _RETRY_STATUSES or attempt >= self.max_retries:
                    raise error
                wait = self._retry_wait(attempt, error.retry_after)
                logger.debug("%s %s -> %d; retry %d in %.3fs", call.method, call.path, error.status, attempt + 1, wait)
            yield _Sleep(wait)
            attempt += 1

    def _probe(self, path: str) -> _Flow[bool]:
        # Probes answer "is it up right now?": no retries, and any failure is simply False.
        try:
            response = yield _Call("GET", path, parse=_parse_probe)
        except httpx.TransportError:
            return False
        assert response is not None
        return _parse_probe(response)

    # -- request builders

    def _admin_headers(self) -> dict[str, str]:
        # Sent only on admin routes, so the token never travels with ordinary traffic.
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    def _build_classify(self, task: str, text_or_texts: str | Sequence[str]) -> _Call[ClassifyResult]:
        path = f"/classify/{_task_path(task)}"
        # A str is itself a Sequence[str]; test it first so one text is not split into characters.
        if isinstance(text_or_texts, str):
            return _Call("POST", path, parse=lambda r: _parse_classify(r, 1), json={"text": text_or_texts})
        texts = list(text_or_texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be strings")
        return _Call("POST", path, parse=lambda r: _parse_classify(r, len(texts)), json={"texts": texts})

    def _build_classify_many(self, items: Sequence[tuple[str, str]]) -> _Call[list[MixedPrediction]]:
        body = []
        for item in items:
            task, text = item
            if not isinstance(task, str) or not isinstance(text, str):
                raise TypeError(f"items must be (task, text) string pairs, got {item!r}")
            body.append({"task": task, "text": text})
        return _Call("POST", "/classify", parse=lambda r: _parse_classify_many(r, len(body)), json={"items": body})

    def _build_tasks(self, cursor: str | None = None) -> _Call[TaskList]:
        # The full records, a page at a time; a server that predates paging ignores the query and sends them all.
        query = {"view": "full", "limit": str(TASKS_PAGE)} | ({"cursor": cursor} if cursor is not None else {})
        return _Call("GET", f"/tasks?{urlencode(query)}", parse=_parse_tasks)

    def _build_task(self, task: str) -> _Call[TaskInfo]:
        return _Call("GET", f"/tasks/{_task_path(task)}", parse=_parse_task)

    def _build_upload(self, task: str, adapter_dir: Path | str) -> _Call[UploadResult]:
        directory = Path(adapter_dir)
        if not directory.is_dir():
            raise FileNotFoundError(f"adapter directory not found: {directory}")
        missing = [name for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} is missing {', '.join(missing)}; an adapter directory needs both "
                f"{ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}"
            )
        # Read into memory (adapters are small) so a retry can resend the same bytes.
        files = {
            "config": (ADAPTER_CONFIG_FILE, (directory / ADAPTER_CONFIG_FILE).read_bytes(), "application/json"),
            "weights": (
                ADAPTER_WEIGHTS_FILE,
                (directory / ADAPTER_WEIGHTS_FILE).read_bytes(),
                "application/octet-stream",
            ),
        }
        return _Call(
            "PUT", f"/admin/tasks/{_task_path(task)}", parse=_parse_upload, files=files, headers=self._admin_headers()
        )

    def _build_delete(self, task: str) -> _Call[None]:
        return _Call("DELETE", f"/admin/tasks/{_task_path(task)}", parse=_parse_empty, headers=self._admin_headers())

    def _build_rollback(self, task: str) -> _Call[UploadResult]:
        return _Call(
            "POST", f"/admin/tasks/{_task_path(task)}/rollback", parse=_parse_upload, headers=self._admin_headers()
        )


# -- response parsers (success statuses only; errors go through `_error_from_response`)


def _parse_classify(response: httpx.Response, expected: int) -> ClassifyResult:
    result: ClassifyResult = _parse_model(response, ClassifyResult)
    _check_count(response, len(result.predictions), expected)
    return result


def _parse_classify_many(response: httpx.Response, expected: int) -> list[MixedPrediction]:
    predictions: list[MixedPrediction] = _parse_model(response, MixedResponse).predictions
    _check_count(response, len(predictions), expected)
    return predictions


def _parse_tasks(response: httpx.Response) -> TaskList:
    page: TaskList = _parse_model(response, TaskList)
    return page


def _parse_task(response: httpx.Response) -> TaskInfo:
    info: TaskInfo = _parse_model(response, TaskInfo)
    return info


def _parse_upload(response: httpx.Response) -> UploadResult:
    result: UploadResult = _parse_model(response, UploadResult)
    return result


def _parse_empty(response: httpx.Response) -> None:
    return None


def _parse_probe(response: httpx.Response) -> bool:
    return response.status_code == 200


# ----------------------------------------------------------------------------------------------------- sync


class LptClient(_LptBase):
    """Blocking client. Use as a context manager or call `close()`.

    `sleep` is called with each retry wait in seconds (inject a recorder in tests); `rng` drives the backoff
    jitter; `transport` replaces the network (e.g. `httpx.MockTransport`, `httpx.WSGITransport`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        admin_token: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.1,
        max_retry_wait: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            admin_token=admin_token,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_retry_wait=max_retry_wait,
            rng=rng,
        )
        self._sleep = sleep
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport, headers=_DEFAULT_HEADERS)

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _perform(self, step: _Step) -> _Reply:
        if isinstance(step, _Sleep):
            self._sleep(step.seconds)
            return None
        try:
            return self._http.request(**step.request_kwargs())
        except httpx.TransportError as exc:
            return exc

    def _run(self, flow: _Flow[T]) -> T:
        reply: _Reply = None
        while True:
            try:
                step = _advance(flow, reply)
            except StopIteration as stop:
                result: T = stop.value
                return result
            reply = self._perform(step)

    def classify(self, task: str, text_or_texts: str | Sequence[str]) -> ClassifyResult:
        """Classify one text (`str`) or a batch (sequence of `str`) with one task; predictions in input order."""
        return self._run(self._exchange(self._build_classify(task, text_or_texts)))

    def classify_many(self, items: Sequence[tuple[str, str]]) -> list[MixedPrediction]:
        """Classify `(task, text)` pairs, possibly for different tasks, in one request; one result per item."""
        return self._run(self._exchange(self._build_classify_many(items)))

    def tasks(self) -> list[TaskInfo]:
        """Every served task's full record, fetched a page at a time."""
        tasks: list[TaskInfo] = []
        cursor: str | None = None
        while True:
            page = self._run(self._exchange(self._build_tasks(cursor)))
            tasks.extend(page.tasks)
            if page.next is None or page.next == cursor:
                return tasks
            cursor = page.next

    def task(self, name: str) -> TaskInfo:
        return self._run(self._exchange(self._build_task(name)))

    def upload(self, task: str, adapter_dir: Path | str) -> UploadResult:
        """Upload `adapter_config.json` + `adapter_model.safetensors` from `adapter_dir` as a new task version."""
        return self._run(self._exchange(self._build_upload(task, adapter_dir)))

    def delete(self, task: str) -> None:
        self._run(self._exchange(self._build_delete(task)))

    def rollback(self, task: str) -> UploadResult:
        """Make the previous version of `task` current; returns the version now served."""
        return self._run(self._exchange(self._build_rollback(task)))

    def healthz(self) -> bool:
        return self._run(self._probe("/healthz"))

    def ready(self) -> bool:
        return self._run(self._probe("/readyz"))


# ---------------------------------------------------------------------------------------------------- async


class AsyncLptClient(_LptBase):
    """Asyncio client with the same API as `LptClient`; use `async with` or `await aclose()`.

    `transport` may be `httpx.ASGITransport(app=...)` to talk to an in-process server.
    """

    def __init__(
        self,
        base_url: str,
        *,
        admin_token: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.1,
        max_retry_wait: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            admin_token=admin_token,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_retry_wait=max_retry_wait,
            rng=rng,
        )
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, transport=transport, headers=_DEFAULT_HEADERS
        )

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _perform(self, step: _Step) -> _Reply:
        if isinstance(step, _Sleep):
            await self._sleep(step.seconds)
            return None
        try:
            return await self._http.request(**step.request_kwargs())
        except httpx.TransportError as exc:
            return exc

    async def _run(self, flow: _Flow[T]) -> T:
        reply: _Reply = None
        while True:
            try:
                step = _advance(flow, reply)
            except StopIteration as stop:
                result: T = stop.value
                return result
            reply = await self._perform(step)

    async def classify(self, task: str, text_or_texts: str | Sequence[str]) -> ClassifyResult:
        """Classify one text (`str`) or a batch (sequence of `str`) with one task; predictions in input order."""
        return await self._run(self._exchange(self._build_classify(task, text_or_texts)))

    async def classify_many(self, items: Sequence[tuple[str, str]]) -> list[MixedPrediction]:
        """Classify `(task, text)` pairs, possibly for different tasks, in one request; one result per item."""
        return await self._run(self._exchange(self._build_classify_many(items)))

    async def tasks(self) -> list[TaskInfo]:
        """Every served task's full record, fetched a page at a time."""
        tasks: list[TaskInfo] = []
        cursor: str | None = None
        while True:
            page = await self._run(self._exchange(self._build_tasks(cursor)))
            tasks.extend(page.tasks)
            if page.next is None or page.next == cursor:
                return tasks
            cursor = page.next

    async def task(self, name: str) -> TaskInfo:
        return await self._run(self._exchange(self._build_task(name)))

    async def upload(self, task: str, adapter_dir: Path | str) -> UploadResult:
        """Upload `adapter_config.json` + `adapter_model.safetensors` from `adapter_dir` as a new task version."""
        return await self._run(self._exchange(self._build_upload(task, adapter_dir)))

    async def delete(self, task: str) -> None:
        await self._run(self._exchange(self._build_delete(task)))

    async def rollback(self, task: str) -> UploadResult:
        """Make the previous version of `task` current; returns the version now served."""
        return await self._run(self._exchange(self._build_rollback(task)))

    async def healthz(self) -> bool:
        return await self._run(self._probe("/healthz"))

    async def ready(self) -> bool:
        return await self._run(self._probe("/readyz"))
