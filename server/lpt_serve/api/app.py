"""The app factory: settings, the service's lifespan, the routers, the error table and the dashboard; and the two
guards every request passes before any route reads its body: the admin gate and the body cap."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lpt_client.schemas import ErrorResponse
from lpt_serve import __version__
from lpt_serve.api.dashboard import Dashboard, install_dashboard
from lpt_serve.api.deps import check_admin_token
from lpt_serve.api.errors import ERROR_TABLE, INTERNAL, error_body, error_response, install_handlers
from lpt_serve.api.routes import admin, classify, ops, tasks
from lpt_serve.api.settings import Settings
from lpt_serve.errors import InputTooLarge, LptServeError
from lpt_serve.model.backbone import Backbone
from lpt_serve.serving.service import OpenedStore, Service

log = logging.getLogger(__name__)

ADMIN_PREFIX = "/admin"
# Room for the multipart framing around the two files of an upload.
MULTIPART_OVERHEAD = 64 * 1024


def dashboard_for(service: Service, **options) -> Dashboard:
    """The dashboard over what it reads of the service: metrics, the served tasks, the recent batches."""
    return Dashboard(service.metrics, registry=lambda: service.registry, queue_depth=service.queue_depth,
                     batches=lambda: service.batcher.history if service.batcher is not None else (), **options)


def create_app(settings: Settings | None = None, *, backbone: Backbone | None = None,
               opened_store: OpenedStore | None = None, server_process: bool = False) -> FastAPI:
    """Build the app; pass `backbone` to reuse one already loaded (tests, benchmarks), `opened_store` for a store
    already opened with `open_store` (`lpt-serve` opens it once the backbone is loaded). The service's start makes
    what is not given. `server_process`: this app is what the process is for (see `Service.freeze_gc`)."""
    settings = settings or Settings()
    service = Service(settings.service_config(), backbone, opened_store)
    service.freeze_gc = server_process
    dashboard = dashboard_for(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.admin_enabled():
            log.warning("LPT_ADMIN_TOKEN is not set: admin routes (upload, delete, rollback) are off")
        await service.start()
        sampler = asyncio.create_task(dashboard.run_sampler(), name="dashboard-sampler")
        try:
            yield
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            await service.stop()

    # FastAPIOffline serves /docs and /redoc from assets installed with it: they work without internet.
    app = FastAPIOffline(
        title="lpt-serve",
        version=__version__,
        summary="Many text classifiers on one frozen encoder: each task is a tiny late-prompt adapter; requests "
                "for different tasks share one forward pass.",
        lifespan=lifespan,
        # No 307 from `/classify/mr/` to `/classify/mr`: clients would send a POST body twice (or drop it). The
        # 404 says where the route is.
        redirect_slashes=False,
        **_telemetry_options(settings),
    )
    app.state.settings = settings
    app.state.service = service
    install_handlers(app)
    for module in (classify, tasks, admin, ops):
        app.include_router(module.router)
    install_dashboard(app, dashboard)
    # The last added runs first: the gate answers 401/403 before the cap counts (or anything reads) a byte.
    app.add_middleware(BodyCap, settings=settings)
    app.add_middleware(AdminGate, settings=settings)
    if settings.fast_classify:
        # Outermost of ours: the hottest route skips the layers above its own code (see `classify.FastClassify`).
        app.add_middleware(classify.FastClassify, service=service, request_cap=settings.max_request_bytes)
    document_edge_errors(app)
    return app


def _telemetry_options(settings: Settings) -> dict[str, Any]:
    """FastAPI (0.16x) asks three global OpenTelemetry providers on every request whether to instrument it: ~5% of
    the event loop's time under load in a server whose telemetry is Prometheus. Off unless asked for; FastAPI
    versions without the option have nothing to turn off."""
    if settings.opentelemetry or "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def is_admin_path(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


def _closing(response: JSONResponse, scope: Scope) -> JSONResponse:
    """`response`, closing the connection if a body is on its way: the server answered without reading it, and
    keeping the connection would mean reading (and dropping) all of it."""
    headers = Headers(scope=scope)
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        response.headers["Connection"] = "close"
    return response


async def _answer(scope: Scope, receive: Receive, send: Send, exc: LptServeError) -> None:
    await _closing(error_response(exc), scope)(scope, receive, send)


class AdminGate:
    """Checks the admin token (`deps.check_admin_token`) on every /admin path before the route, its multipart
    parser or anything else reads the body: an unauthenticated upload costs the server no memory and no disk,
    whatever its size or framing (chunked bodies have no Content-Length to refuse early)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_admin_path(scope["path"]):
            try:
                check_admin_token(self.settings, Headers(scope=scope).get("authorization"))
            except LptServeError as exc:
                return await _answer(scope, receive, send, exc)
        await self.app(scope, receive, send)


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a body passes its cap. An HTTPException, so that FastAPI's body reading lets it
    through (it turns other exceptions into a 400) and the app's handler answers 413 `too_large`."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


class BodyCap:
    """A byte cap on every request body, counted while it streams in, with or without Content-Length: a declared
    length over the cap is refused before reading; otherwise `receive` counts and stops at the cap. Admin
    uploads may hold two files of LPT_MAX_UPLOAD_BYTES; every other body, LPT_MAX_REQUEST_BYTES."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.upload_cap = 2 * settings.max_upload_bytes + MULTIPART_OVERHEAD
        self.request_cap = settings.max_request_bytes

    def cap_for(self, path: str) -> tuple[int, str]:
        if is_admin_path(path):
            return self.upload_cap, "two files of LPT_MAX_UPLOAD_BYTES each"
        return self.request_cap, "LPT_MAX_REQUEST_BYTES"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap, setting = self.cap_for(scope["path"])
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            return await _answer(scope, receive, send, InputTooLarge(
                f"the request body is {declared} bytes; at most {cap} are read ({setting})"))
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise BodyTooLarge(f"the request body is over {cap} bytes ({setting})")
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge as exc:
            # The app's handler answers it when a route reads the body; this is for a reader outside the routes.
            if started:
                raise
            response = JSONResponse(error_body("too_large", str(exc.detail)), status_code=413)
            await _closing(response, scope)(scope, receive, send)


# ------------------------------------------------------------------------------------------------- OpenAPI
def document_edge_errors(app: FastAPI) -> None:
    """Add to every operation of the OpenAPI document the errors the edge itself can answer, in our error shape:
    413 (the body cap) and 500 everywhere, 401/403 on admin paths, and 422 in our shape rather than FastAPI's."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _add_edge_errors(build())
        return app.openapi_schema

    app.openapi = openapi


def _description(status: int) -> str:
    kinds = {kind.type for _, kind in ERROR_TABLE if kind.status == status}
    if status == INTERNAL.status:
        kinds.add(INTERNAL.type)
    return "error; its `type` is " + " or ".join(f"`{kind}`" for kind in sorted(kinds)) if kinds else "error"


def _add_edge_errors(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in {**error_schema.pop("$defs", {}), "ErrorResponse": error_schema}.items():
        components.setdefault(name, definition)
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            statuses = ["413", "500"] + (["401", "403"] if is_admin_path(path) else [])
            if "422" in responses:  # FastAPI's own 422 has another shape than ours
                statuses.append("422")
            for status in statuses:
                responses[status] = {"content": content}
            for status, response in responses.items():
                if status[0] in "45":  # say which error types a status carries, not just its reason phrase
                    response["description"] = _description(int(status))
    # FastAPI's validation error models are referenced by nothing now (the first one referred to the second).
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in components and f'"#/components/schemas/{unused}"' not in json.dumps(schema):
            components.pop(unused)
