"""Operations: `/metrics` (Prometheus), `/healthz` (liveness), `/readyz` (readiness)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lpt_serve.api.deps import ServiceDep
from lpt_serve.api.errors import error_response, statuses
from lpt_serve.errors import Unavailable

router = APIRouter(tags=["ops"])


@router.get("/metrics", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text format, per-task labels."""
    service.queue_depth()  # a gauge read at scrape time
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses=statuses(Unavailable))
async def readyz(service: ServiceDep) -> JSONResponse:
    """Readiness: backbone loaded, store open, one forward pass done. Right after a start the store's index may
    still be being read (`indexing`: true; `tasks` counts only the tasks looked up so far, `store_generation` is
    -1): every
    task is served meanwhile, looked up alone. `store_generation` is the shared store's generation this replica
    serves: replicas that report the same one serve the same task versions."""
    if not service.ready:
        return error_response(Unavailable("not ready", retry_after=1))
    return JSONResponse({"status": "ok", "tasks": len(service.registry.names()), "indexing": service.registry.indexing,
                         "store_generation": service.registry.generation,
                         "device": str(service.backbone.device), "dtype": str(service.backbone.dtype)})
