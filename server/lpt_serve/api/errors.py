"""One error shape, `{"error": {"type", "message"}}`, and one status per kind, mapped here and nowhere else.

The layers below raise domain exceptions (`lpt_serve.errors`) that know no status; `ERROR_TABLE` gives each
kind its status, `type` and, where it helps, a hint about which route to use next. FastAPI's own validation
errors and anything unexpected (500: the trace goes to the log, never to the body) get the same shape.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from lpt_client.schemas import ErrorResponse
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
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def error_body(type_: str, message: str) -> dict:
    return {"error": {"type": type_, "message": message}}


def error_response(exc: LptServeError) -> JSONResponse:
    kind = kind_of(exc)
    message = kind.prefix + exc.message + (f"; {kind.hint}" if kind.hint else "")
    headers = {}
    if isinstance(exc, RetryLater):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return JSONResponse(error_body(kind.type, message), status_code=kind.status, headers=headers)


def statuses(*kinds: type[Exception]) -> dict[int, dict]:
    """OpenAPI `responses=` for the domain errors a route can raise."""
    return {kind_of(cls).status: {"model": ErrorResponse} for cls in kinds}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(LptServeError)
    async def _domain(request: Request, exc: LptServeError) -> JSONResponse:
        if kind_of(exc).status >= 500:
            log.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("validation_error", _validation_message(exc)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal server error; see the server log"), status_code=500)
