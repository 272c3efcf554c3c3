"""The FastAPI app: the HTTP contract of DESIGN §4 over the registry and the micro-batcher."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated

import torch
from fastapi import Depends, FastAPI, File, Header, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters_store.store import AdapterStore
from clients.models import ClassifyResult, ErrorResponse, MixedResponse, TaskInfo, TaskList, UploadResult
from server.backbone import Backbone
from server.batcher import Batcher
from server.config import Settings
from server.dashboard import install_dashboard
from server.engine import Encoded, classify_rows, encode_texts
from server.errors import (
    ApiError,
    Forbidden,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    ValidationFailed,
    error_body,
    install_handlers,
)
from server.metrics import Metrics
from server.registry import Registry, ServedTask, checked_task_name

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- bodies
class ClassifyBody(BaseModel):
    """Exactly one of `text` or `texts`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "a gripping, funny film"}]})
    text: str | None = None
    texts: list[str] | None = None

    @model_validator(mode="after")
    def _one(self) -> ClassifyBody:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        if self.texts is not None and not self.texts:
            raise ValueError("'texts' must hold at least one text")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    text: str


class MixedBody(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"items": [{"task": "mr", "text": "a gripping film"}, {"task": "bbc", "text": "Shares fell"}]}]})
    items: list[Item] = Field(min_length=1)


ERRORS = {code: {"model": ErrorResponse} for code in (404, 413, 422, 429, 503, 504)}
ADMIN_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422)}


# -------------------------------------------------------------------------------------------------- state
class Service:
    """What the routes share: settings, backbone, registry, batcher, metrics, readiness."""

    def __init__(self, settings: Settings, backbone: Backbone | None = None) -> None:
        self.settings = settings
        self.backbone = backbone
        self.metrics = Metrics()
        self.registry: Registry | None = None
        self.batcher: Batcher | None = None
        self.ready = False

    async def start(self) -> None:
        s = self.settings
        if self.backbone is None:
            self.backbone = await asyncio.to_thread(Backbone.load, s.backbone, device=s.device, dtype=s.dtype)
        store = AdapterStore(s.store)
        self.registry = Registry(self.backbone, store, device_budget_bytes=int(s.device_budget_mb * 2**20),
                                 pinned=s.pinned_tasks)
        await asyncio.to_thread(self.registry.load_all)
        self.metrics.tasks_served.set(len(self.registry.names()))
        self.batcher = Batcher(self._run_batch, max_batch_size=s.max_batch_size, max_batch_tokens=s.max_batch_tokens,
                               max_wait_ms=s.max_wait_ms, max_queue=s.max_queue, metrics=self.metrics)
        self.batcher.start()
        if not s.admin_enabled():
            log.warning("LPT_ADMIN_TOKEN is not set: admin routes (upload, delete, rollback) are off")
        if s.warmup:
            await self._warmup()
        self.ready = True
        log.info("ready: %d tasks on %s (%s)", len(self.registry.names()), self.backbone.device, self.backbone.dtype)

    async def _warmup(self) -> None:
        served = self.registry.served()
        if served:
            encoded = encode_texts(self.backbone, ["warm up"], served[0].adapter.config.template)
            await self.batcher.run_now([served[0].adapter], encoded)
        else:
            ids = self.backbone.tokenize(["warm up"])
            await asyncio.to_thread(self._plain_forward, ids)

    def _plain_forward(self, ids) -> None:
        with torch.inference_mode():
            self.backbone(ids["input_ids"].to(self.backbone.device), ids["attention_mask"].to(self.backbone.device))

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.stop(timeout=self.settings.request_timeout_s)

    def _run_batch(self, adapters, encoded) -> list[torch.Tensor]:
        self.registry.acquire(adapters)
        return classify_rows(self.backbone, adapters, encoded)

    # -------------------------------------------------------------------------------------------- classify
    def check_texts(self, texts: list[str]) -> None:
        s = self.settings
        if len(texts) > s.max_texts_per_request:
            raise TooLarge(
                f"{len(texts)} texts in one request; at most {s.max_texts_per_request} (LPT_MAX_TEXTS_PER_REQUEST)")
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValidationFailed(f"text {i} is empty; send at least one non-space character")
            if len(text) > s.max_text_chars:
                raise TooLarge(f"text {i} has {len(text)} characters; at most {s.max_text_chars} (LPT_MAX_TEXT_CHARS)")

    async def classify(self, request: Request, pairs: list[tuple[ServedTask, str]]) -> list[dict]:
        """Classify (task, text) pairs, counting each task's request and its outcome in the metrics."""
        tasks = {served.task for served, _ in pairs}
        try:
            out = await self._classify(request, pairs)
        except Exception as exc:
            # ApiErrors carry their status; anything else becomes the 500 the error handler answers.
            status, kind = (exc.status, exc.type) if isinstance(exc, ApiError) else (500, "internal_error")
            for task in tasks:
                self.metrics.requests.labels(task, str(status)).inc()
                self.metrics.errors.labels(task, kind).inc()
            raise
        for task in tasks:
            self.metrics.requests.labels(task, "200").inc()
        return out

    async def _classify(self, request: Request, pairs: list[tuple[ServedTask, str]]) -> list[dict]:
        """Tokenize per task, queue every row, wait for all of them (or the deadline, or the client leaving)."""
        if not self.ready or self.batcher is None:
            raise Unavailable("the server is starting; retry shortly", retry_after=1)
        started = time.monotonic()
        encoded = await asyncio.to_thread(self._encode, pairs)
        rows = self.batcher.submit([p[0].adapter for p in pairs], encoded, self.settings.request_timeout_s)
        futures = [r.future for r in rows]
        watcher = asyncio.create_task(_cancel_on_disconnect(request, futures))
        try:
            remaining = self.settings.request_timeout_s - (time.monotonic() - started)
            done, pending = await asyncio.wait(futures, timeout=max(0.0, remaining))
            if pending:
                for f in pending:
                    f.cancel()
                raise Timeout(f"no answer within {self.settings.request_timeout_s:.0f}s (LPT_REQUEST_TIMEOUT_S)")
            results = [f.result() for f in futures]
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()
            raise
        finally:
            watcher.cancel()
        elapsed = time.monotonic() - started
        out = []
        for (served, _), enc, probs in zip(pairs, encoded, results, strict=True):
            labels = served.adapter.labels
            scores = {label: float(p) for label, p in zip(labels, probs.tolist(), strict=True)}
            best = int(torch.argmax(probs))
            out.append({"task": served.task, "version": served.version, "label": labels[best],
                        "score": scores[labels[best]], "scores": scores, "truncated": enc.truncated})
        for task in {p[0].task for p in pairs}:
            n = sum(1 for p in pairs if p[0].task == task)
            self.metrics.rows.labels(task).inc(n)
            self.metrics.request_latency.labels(task).observe(elapsed)
        return out

    def _encode(self, pairs: list[tuple[ServedTask, str]]) -> list[Encoded]:
        # Tokenize once per (template, max length): the common case is one task, one call to the fast tokenizer.
        groups: dict[tuple[str | None, int | None], list[int]] = {}
        for i, (served, _) in enumerate(pairs):
            cfg = served.adapter.config
            limits = [x for x in (cfg.max_length, self.settings.max_length) if x is not None]
            limit = min(limits) if limits else None
            groups.setdefault((cfg.template, limit), []).append(i)
        encoded: list[Encoded | None] = [None] * len(pairs)
        for (template, limit), idx in groups.items():
            for i, e in zip(idx, encode_texts(self.backbone, [pairs[i][1] for i in idx], template, limit), strict=True):
                encoded[i] = e
        return encoded  # type: ignore[return-value]


async def _cancel_on_disconnect(request: Request, futures: list[asyncio.Future]) -> None:
    """Once the body is read, the next ASGI message is the disconnect: the client is gone, drop its rows."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for f in futures:
                    f.cancel()
                return
    except (asyncio.CancelledError, RuntimeError):
        return


# ------------------------------------------------------------------------------------------------- the app
def create_app(settings: Settings | None = None, *, backbone: Backbone | None = None) -> FastAPI:
    """Build the app; pass `backbone` to reuse one already loaded (tests, benchmarks)."""
    settings = settings or Settings()
    service = Service(settings, backbone)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="lpt-serve",
        version="0.1.0",
        summary="Many text classifiers on one frozen encoder: each task is a tiny late-prompt adapter; requests "
                "for different tasks share one forward pass.",
        lifespan=lifespan,
    )
    app.state.service = service
    install_handlers(app)
    install_dashboard(app, service)

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

    def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
        if not settings.admin_enabled():
            raise Forbidden("admin routes are off: start the server with LPT_ADMIN_TOKEN set")
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("send 'Authorization: Bearer <token>' (the server's LPT_ADMIN_TOKEN)")
        given = authorization.removeprefix("Bearer ").strip().encode()
        expected = settings.admin_token.get_secret_value().encode()
        if not hmac.compare_digest(given, expected):
            raise Forbidden("the admin token is wrong")

    Admin = Depends(require_admin)

    @app.post("/classify/{task}", response_model=ClassifyResult, responses=ERRORS, tags=["classify"])
    async def classify_task(task: str, body: ClassifyBody, request: Request) -> dict:
        """Classify one text (`text`) or several (`texts`) with one task; predictions come in input order.

        Texts longer than the backbone's limit are cut to fit and flagged `truncated: true`.
        """
        served = service.registry.get(task)
        texts = body.all_texts()
        service.check_texts(texts)
        preds = await service.classify(request, [(served, t) for t in texts])
        return {"task": served.task, "version": served.version,
                "predictions": [{k: p[k] for k in ("label", "score", "scores", "truncated")} for p in preds]}

    @app.post("/classify", response_model=MixedResponse, responses=ERRORS, tags=["classify"])
    async def classify_mixed(body: MixedBody, request: Request) -> dict:
        """Many tasks in one call: one prediction per item, in order. Items on the same text (and template)
        share the layers below the prompt layer."""
        pairs = [(service.registry.get(item.task), item.text) for item in body.items]
        service.check_texts([t for _, t in pairs])
        return {"predictions": await service.classify(request, pairs)}

    @app.get("/tasks", response_model=TaskList, tags=["tasks"])
    async def list_tasks() -> dict:
        """Every served task: version(s), labels, generator, prompt layer and length, size, where it lives."""
        return {"tasks": [service.registry.info(s) for s in service.registry.served()]}

    @app.get("/tasks/{task}", response_model=TaskInfo, responses={404: {"model": ErrorResponse}}, tags=["tasks"])
    async def get_task(task: str) -> dict:
        return service.registry.info(service.registry.get(task))

    @app.put("/admin/tasks/{task}", status_code=201, response_model=UploadResult, responses=ADMIN_ERRORS,
             dependencies=[Admin], tags=["admin"])
    async def upload_task(task: str, request: Request,
                          config: Annotated[UploadFile, File(description="adapter_config.json")],
                          weights: Annotated[UploadFile, File(description="adapter_model.safetensors")]) -> dict:
        """Hot upload: checked against the served backbone, committed atomically as the next version, then
        swapped in; the old version serves until then."""
        checked_task_name(task)
        limit = settings.max_upload_bytes
        config_bytes = await _read_limited(config, limit, "config")
        weights_bytes = await _read_limited(weights, limit, "weights")
        served = await asyncio.to_thread(service.registry.upload, task, config_bytes, weights_bytes)
        service.metrics.adapter_events.labels("upload").inc()
        service.metrics.tasks_served.set(len(service.registry.names()))
        return {"task": served.task, "version": served.version}

    @app.delete("/admin/tasks/{task}", status_code=204, responses=ADMIN_ERRORS, dependencies=[Admin], tags=["admin"])
    async def delete_task(task: str) -> Response:
        """Retire a task: it stops being served and leaves the store."""
        await asyncio.to_thread(service.registry.retire, task)
        service.metrics.adapter_events.labels("retire").inc()
        service.metrics.tasks_served.set(len(service.registry.names()))
        return Response(status_code=204)

    @app.post("/admin/tasks/{task}/rollback", response_model=UploadResult, responses=ADMIN_ERRORS,
              dependencies=[Admin], tags=["admin"])
    async def rollback_task(task: str) -> dict:
        """Serve the previous version again."""
        served = await asyncio.to_thread(service.registry.rollback, task)
        service.metrics.adapter_events.labels("rollback").inc()
        return {"task": served.task, "version": served.version}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format, per-task labels."""
        service.metrics.queue_depth.set(service.batcher.depth if service.batcher else 0)
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorResponse}})
    async def readyz() -> JSONResponse:
        """Readiness: backbone loaded, adapters loaded, one forward pass done."""
        if not service.ready:
            return JSONResponse({"error": {"type": "unavailable", "message": "not ready"}}, status_code=503,
                                headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok", "tasks": len(service.registry.names()),
                             "device": str(service.backbone.device), "dtype": str(service.backbone.dtype)})

    return app


async def _read_limited(upload: UploadFile, limit: int, field: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"the {field} file is over {limit} bytes (LPT_MAX_UPLOAD_BYTES)")
    return data

