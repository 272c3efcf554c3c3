"""One error shape, `{"error": {"type", "message"}}`, and one status per kind, mapped here and nowhere else.

The layers below raise domain exceptions (`lpt_serve.errors`) that know no status; `ERROR_TABLE` gives each
kind its status, `type` and, where it helps, a hint about which route to use next. FastAPI's own validation
errors and anything unexpected (500: the trace goes to the log, never to the body) get the same shape.

A message is capped at `MAX_MESSAGE_CHARS`: an adapter with 50,000 bad tensors is rejected with the first problems
and a count of the rest, not with megabytes of text.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from lpt_client.schemas import TASK_NAME_RULE, TASK_NAME_SCHEMA_PATTERN, ErrorResponse
from lpt_serve.errors import (
    AdapterError,
    BackboneError,
    DeadlineExceeded,
    InputTooLarge,
    InvalidInput,
    LptServeError,
    NothingToRollBack,
    Overloaded,
    RetryLater,
    StoreError,
    StoreUnwritable,
    TaskFailed,
    TaskNotFound,
    TaskQuarantined,
    Unavailable,
)

log = logging.getLogger(__name__)


class Unauthorized(LptServeError):
    """No bearer token on an admin route."""


class Forbidden(LptServeError):
    """A wrong token, or admin routes are off."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    prefix: str = ""  # what the message is about, when the domain message does not say it
    hint: str = ""  # what to do next, in HTTP terms


# Most specific first: the first class an exception is an instance of decides.
ERROR_TABLE: tuple[tuple[type[Exception], ErrorKind], ...] = (
    (InvalidInput, ErrorKind(422, "validation_error")),
    (TaskNotFound, ErrorKind(404, "task_not_found", hint="GET /tasks lists the served tasks")),
    (AdapterError, ErrorKind(400, "bad_adapter", prefix="adapter rejected: ")),
    (InputTooLarge, ErrorKind(413, "too_large")),
    (Unauthorized, ErrorKind(401, "unauthorized")),
    (Forbidden, ErrorKind(403, "forbidden")),
    (NothingToRollBack, ErrorKind(409, "conflict")),
    (Overloaded, ErrorKind(429, "overloaded")),
    (Unavailable, ErrorKind(503, "unavailable")),
    (DeadlineExceeded, ErrorKind(504, "timeout")),
    (StoreUnwritable, ErrorKind(507, "store_unwritable")),
    (StoreError, ErrorKind(500, "store_error")),
    (TaskFailed, ErrorKind(500, "task_failed")),
    (TaskQuarantined, ErrorKind(503, "task_quarantined", hint="an operator must upload a new version or roll back")),
    (BackboneError, ErrorKind(500, "internal_error")),
)
INTERNAL = ErrorKind(500, "internal_error")


def kind_of(exc: BaseException | type[BaseException]) -> ErrorKind:
    cls = exc if isinstance(exc, type) else type(exc)
    for error_class, kind in ERROR_TABLE:
        if issubclass(cls, error_class):
            return kind
    return INTERNAL


MAX_MESSAGE_CHARS = 2000


def cap_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message`, cut to `limit` characters with a count of what was cut."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}… ({len(message) - limit} more characters)"


def summarize(problems: list[str], limit: int = MAX_MESSAGE_CHARS) -> str:
    """As many whole problems as fit in `limit` characters, then how many more there were."""
    shown: list[str] = []
    used = 0
    for i, problem in enumerate(problems):
        if shown and used + 2 + len(problem) > limit:
            rest = len(problems) - i
            return "; ".join(shown) + f"; … ({rest} more problem{'s' if rest != 1 else ''})"
        shown.append(problem if shown else cap_message(problem, limit))
        used += len(shown[-1]) + (2 if i else 0)
    return "; ".join(shown)


def error_body(type_: str, message: str) -> dict:
    # A lone surrogate echoed from the input (a JSON key, a task name) cannot be encoded as UTF-8: escape it
    # rather than fail while reporting the error.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"type": type_, "message": cap_message(message, MAX_MESSAGE_CHARS + 200)}}


def error_response(exc: LptServeError) -> JSONResponse:
    kind = kind_of(exc)
    detail = summarize(exc.problems) if isinstance(exc, AdapterError) else cap_message(exc.message)
    message = kind.prefix + detail + (f"; {kind.hint}" if kind.hint else "")
    headers = {}
    if isinstance(exc, RetryLater):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return JSONResponse(error_body(kind.type, message), status_code=kind.status, headers=headers)


def answer_domain_error(exc: LptServeError, method: str, path: str) -> JSONResponse:
    """The answer to a domain error raised while serving `method path`; a 5xx one is logged (the route's handler
    and `FastClassify` both answer through here)."""
    if kind_of(exc).status >= 500:
        log.error("%s on %s %s: %s", type(exc).__name__, method, path, exc.message)
    return error_response(exc)


def answer_unexpected(method: str, path: str) -> JSONResponse:
    """The 500 for an exception nothing expected, its trace to the log only. Call from an `except` block."""
    log.exception("unhandled error on %s %s", method, path)
    return JSONResponse(error_body("internal_error", "internal server error; see the server log"), status_code=500)


def statuses(*kinds: type[Exception]) -> dict[int, dict]:
    """OpenAPI `responses=` for the domain errors a route can raise."""
    return {kind_of(cls).status: {"model": ErrorResponse} for cls in kinds}


def _validation_problem(err: dict) -> str:
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
    ctx = err.get("ctx") or {}
    if err.get("type") == "json_invalid":
        # FastAPI puts the character offset where a field name would be.
        return f"the body is not valid JSON (at character {where}): {ctx.get('error', 'cannot parse it')}"
    if err.get("type") == "string_pattern_mismatch" and ctx.get("pattern") == TASK_NAME_SCHEMA_PATTERN:
        return f"{where}: task name {err.get('input')!r} is invalid: use {TASK_NAME_RULE}"
    return f"{where}: {err.get('msg')}"


def _validation_message(exc: RequestValidationError) -> str:
    return summarize([_validation_problem(err) for err in exc.errors()]) or "invalid request"


HTTP_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def _routed(request: Request, **changes: str) -> Match:
    """How well the app's routes match this request with `changes` (another method or path) applied."""
    scope = {**request.scope, **changes}
    matches = [route.matches(scope)[0] for route in request.app.router.routes]
    return max(matches, key=lambda m: m.value, default=Match.NONE)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first matching route's)."""
    return [method for method in HTTP_METHODS if _routed(request, method=method) == Match.FULL]


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (no route, wrong method, unparseable body, body over the cap) in our shape."""
    headers = dict(getattr(exc, "headers", None) or {})
    path = request.url.path
    if exc.status_code == 404:
        message = f"no route {request.method} {path}"
        if path != "/" and path.endswith("/") and _routed(request, path=path.rstrip("/")) != Match.NONE:
            # Slashes are not redirected: a 307 would make clients send a POST body twice.
            message += f"; without the trailing slash: {path.rstrip('/')}"
        return JSONResponse(error_body("not_found", message), status_code=404, headers=headers)
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        message = f"{request.method} is not allowed on {path}; allowed: {', '.join(allowed)}"
        return JSONResponse(error_body("method_not_allowed", message), status_code=405, headers=headers)
    if exc.status_code == 413:
        # The rest of the body is not read: close rather than read and drop it to keep the connection.
        headers["Connection"] = "close"
        return JSONResponse(error_body("too_large", str(exc.detail)), status_code=413, headers=headers)
    if exc.status_code == 400:
        # Starlette's 400s all mean "the body could not be parsed" (a malformed multipart body): the documented
        # answer to a malformed body is 422.
        return JSONResponse(error_body("validation_error", f"the body could not be parsed: {exc.detail}"),
                            status_code=422, headers=headers)
    return JSONResponse(error_body("http_error", str(exc.detail)), status_code=exc.status_code, headers=headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(LptServeError)
    async def _domain(request: Request, exc: LptServeError) -> JSONResponse:
        return answer_domain_error(exc, request.method, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("validation_error", _validation_message(exc)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _http_error(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return answer_unexpected(request.method, request.url.path)
