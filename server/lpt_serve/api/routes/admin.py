"""Admin routes: hot upload, retire, rollback. Every one needs the admin token: the app's admin gate checks it
before the body is read, and `deps.require_admin` again on each route."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile

from lpt_client.schemas import ADAPTER_CONFIG_FILE, UploadResult
from lpt_serve.api.deps import AdminOnly, ServiceDep, SettingsDep, TaskPath, parse_json_body
from lpt_serve.api.errors import Forbidden, Unauthorized, statuses
from lpt_serve.errors import (
    AdapterError,
    InputTooLarge,
    InvalidInput,
    NothingToRollBack,
    StoreError,
    StoreUnwritable,
    TaskNotFound,
    Unavailable,
)

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminOnly])
ERRORS = statuses(AdapterError, Unauthorized, Forbidden, TaskNotFound, NothingToRollBack, InputTooLarge, InvalidInput,
                  StoreUnwritable, StoreError, Unavailable)


@router.put("/tasks/{task}", status_code=201, response_model=UploadResult, responses=ERRORS)
async def upload_task(task: TaskPath, service: ServiceDep, settings: SettingsDep,
                      config: Annotated[UploadFile, File(description="adapter_config.json")],
                      weights: Annotated[UploadFile, File(description="adapter_model.safetensors")]) -> UploadResult:
    """Hot upload: checked against the served backbone, committed atomically as the next version, then
    swapped in; the old version serves until then. A config that is not JSON text (bad UTF-8, nested too
    deeply, an integer of thousands of digits, a lone surrogate) is a 400 `bad_adapter` like any other bad
    adapter."""
    limit = settings.max_upload_bytes
    config_bytes = await _read_limited(config, limit, "config")
    weights_bytes = await _read_limited(weights, limit, "weights")
    _check_parses(config_bytes)
    served = await service.upload(task, config_bytes, weights_bytes)
    return UploadResult(task=served.task, version=served.version)


@router.delete("/tasks/{task}", status_code=204, responses=ERRORS)
async def delete_task(task: TaskPath, service: ServiceDep) -> Response:
    """Retire a task: it stops being served and leaves the store."""
    await service.retire(task)
    return Response(status_code=204)


@router.post("/tasks/{task}/rollback", response_model=UploadResult, responses=ERRORS)
async def rollback_task(task: TaskPath, service: ServiceDep) -> UploadResult:
    """Serve the previous version again."""
    served = await service.rollback(task)
    return UploadResult(task=served.task, version=served.version)


async def _read_limited(upload: UploadFile, limit: int, field: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise InputTooLarge(f"the {field} file is over {limit} bytes (LPT_MAX_UPLOAD_BYTES)")
    return data


def _check_parses(config_bytes: bytes) -> None:
    # The same parser as request bodies, so that what `json.loads` chokes on (nesting deeper than the stack, an
    # integer too long to convert, a lone surrogate the tokenizer cannot take) is a bad adapter, not a 500.
    try:
        parse_json_body(config_bytes)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{ADAPTER_CONFIG_FILE} is not valid JSON: {exc}") from None
