"""The app factory: settings, the service's lifespan, the routers, the error table and the dashboard."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from lpt_serve import __version__
from lpt_serve.api.dashboard import Dashboard, install_dashboard
from lpt_serve.api.errors import error_body, install_handlers
from lpt_serve.api.routes import admin, classify, ops, tasks
from lpt_serve.api.settings import Settings
from lpt_serve.model.backbone import Backbone
from lpt_serve.serving.service import Service

log = logging.getLogger(__name__)


def dashboard_for(service: Service, **options) -> Dashboard:
    """The dashboard over what it reads of the service: metrics, the served tasks, the recent batches."""
    return Dashboard(service.metrics, registry=lambda: service.registry, queue_depth=service.queue_depth,
                     batches=lambda: service.batcher.history if service.batcher is not None else (), **options)


def create_app(settings: Settings | None = None, *, backbone: Backbone | None = None) -> FastAPI:
    """Build the app; pass `backbone` to reuse one already loaded (tests, benchmarks)."""
    settings = settings or Settings()
    service = Service(settings.service_config(), backbone)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.admin_enabled():
            log.warning("LPT_ADMIN_TOKEN is not set: admin routes (upload, delete, rollback) are off")
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    # FastAPIOffline serves /docs and /redoc from assets installed with it: they work without internet.
    app = FastAPIOffline(
        title="lpt-serve",
        version=__version__,
        summary="Many text classifiers on one frozen encoder: each task is a tiny late-prompt adapter; requests "
                "for different tasks share one forward pass.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    install_handlers(app)
    for module in (classify, tasks, admin, ops):
        app.include_router(module.router)
    install_dashboard(app, dashboard_for(service))

    @app.middleware("http")
    async def refuse_large_uploads(request: Request, call_next):
        # Multipart parsing would spool the whole body first; refuse an oversized upload before reading it.
        if request.method == "PUT" and request.url.path.startswith("/admin/"):
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > 2 * settings.max_upload_bytes + 65536:
                return JSONResponse(error_body("too_large", f"the upload is {length} bytes; each file may hold at "
                                               f"most {settings.max_upload_bytes} (LPT_MAX_UPLOAD_BYTES)"),
                                    status_code=413)
        return await call_next(request)

    return app
