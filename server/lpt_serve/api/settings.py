"""Server settings: one typed, validated object, from `LPT_*` environment variables and `lpt-serve` flags.

Bad settings fail at start with a sentence that says what to change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lpt_serve.paths import default_store_dir, demo_adapters_dir
from lpt_serve.serving.service import ServiceConfig


class Settings(BaseSettings):
    """Every field can be set as `LPT_<NAME>` (e.g. `LPT_MAX_BATCH_SIZE=64`) or as `--max-batch-size 64`."""

    model_config = SettingsConfigDict(env_prefix="LPT_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0 picks a free one)")
    store: Path = Field(default_factory=default_store_dir,
                        description="writable adapter store; a new (empty) one is seeded with the demo tasks")
    seed_demo_tasks: bool = Field(True, description="copy the shipped demo tasks (mr, bbc, tweets) into a new store")
    backbone: str | None = Field(None, description="local BERT/RoBERTa folder; default: the all-MiniLM-L6-v2 package")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    runtime: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="who computes the encoder: onnxruntime (fp32 on the CPU; each layer exported to ONNX once "
                            "and cached), torch (CUDA, half precision, or a reference), or auto (onnxruntime where it "
                            "can serve, torch otherwise)")
    onnx_cache_dir: Path | None = Field(None, description="exported ONNX graphs (default: ~/.cache/lpt-serve/onnx)")
    runtime_threads: int | None = Field(None, ge=1, description="intra-op threads per pass, ONNX Runtime's or, "
                                        "with several passes at once on torch, torch's (default: the cores, split "
                                        "between the inference workers)")
    inference_workers: int | None = Field(None, ge=1, le=64, description="forward passes run at once (default: 2 "
                                          "on a CPU of 2 or more cores, 1 on a GPU)")
    dtype: str = Field("auto", description="auto (fp32 on CPU, bf16 on CUDA), float32, float16 or bfloat16")
    admin_token: SecretStr | None = Field(None, description="bearer token for /admin; unset turns admin routes off")

    max_batch_size: int = Field(64, ge=1, le=4096, description="rows per forward pass at most")
    max_batch_tokens: int = Field(16384, ge=64, description="padded tokens (rows x longest row) per pass at most")
    max_wait_ms: float = Field(5.0, ge=0.0, le=10_000, description="how long a batch waits to fill after its first row")
    max_queue: int = Field(2048, ge=1, description="rows waiting at most; beyond it requests get 429")
    request_timeout_s: float = Field(30.0, gt=0, description="a request's deadline; past it the answer is 504")
    max_texts_per_request: int = Field(256, ge=1, description="texts or items in one request at most")
    max_text_chars: int = Field(100_000, ge=1, description="characters in one text at most (413 beyond)")
    max_request_tokens: int = Field(65_536, ge=1, description="tokens in one request at most, counted after long "
                                                              "texts are cut to the backbone's limit (413 beyond)")
    max_length: int | None = Field(None, ge=8, description="tokens per text; longer texts are cut and flagged")
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="bytes in a request body at most, admin uploads aside (413 beyond), "
        "counted as they arrive; the default holds max_texts_per_request (256) texts of 16 KiB each: raise it with "
        "either of those limits")
    max_upload_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="size of an adapter upload at most (413)")
    device_budget_mb: float = Field(512.0, ge=0, description="adapter weights kept on the device; the rest on CPU")
    host_budget_mb: float = Field(1024.0, ge=0, description="adapter weights kept loaded in host memory (LRU); the "
                                  "others stay in the store and load on their first request")
    metrics_max_tasks: int = Field(100, ge=0, description="tasks with their own series in /metrics (the first to "
                                   "be requested); the others are counted under task=\"other\"")
    metrics_tasks: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="tasks that always get their own series in /metrics (comma-separated); "
                                          "they count toward metrics_max_tasks")
    pinned_tasks: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="tasks never offloaded from the device")
    warmup: bool = Field(True, description="run one forward pass at start so /readyz means ready")
    quarantine_after: int = Field(3, ge=1, description="failed passes in a row after which a task is held out of "
                                                       "every batch until an upload or rollback")
    keep_versions: int = Field(5, ge=0, description="stored versions kept per task, the served one included (the "
                               "default 5 keeps it and 4 rollback targets); older ones are deleted after each "
                               "upload; 0 keeps every version")
    sync_interval_s: float = Field(0.5, ge=0, le=60, description="how often to check the store for changes made by "
                                   "other replicas or `lpt` (seconds; 0 turns watching off: one replica alone)")
    full_sync_interval_s: float = Field(60.0, gt=0, description="how often to compare every task's state with the "
                                        "store even when its generation did not move (catches hand edits)")
    simulated_pass_ms: float = Field(0.0, ge=0, le=10_000, description="benchmarks only: every forward pass lasts "
                                     "this long (the real forward, then sleep), as on an accelerator: cores stay free")
    log_level: str = Field("info", description="debug, info, warning or error")
    log_json: bool = Field(True, description="one JSON object per log line")
    opentelemetry: bool = Field(False, description="FastAPI's OpenTelemetry instrumentation: spans, metrics and logs "
                                "per request to the globally configured providers (off: Prometheus only)")
    fast_classify: bool = Field(True, description="answer ordinary `POST /classify/{task}` requests ahead of "
                                "FastAPI's routing and dependencies, with the same checks and answers (off: every "
                                "request takes the full stack)")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not value.startswith("cuda") and not value.startswith("mps"):
            raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        allowed = ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
        if value not in allowed:
            raise ValueError(f"dtype {value!r} is not one of {', '.join(allowed)}")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log level {value!r} is not one of debug, info, warning, error")
        return value.lower()

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value):
        # LPT_ADMIN_TOKEN= (empty) in a compose file or a shell means "no token": admin routes off, as when unset.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("pinned_tasks", "metrics_tasks", mode="before")
    @classmethod
    def _split_pinned(cls, value):
        # LPT_PINNED_TASKS=a,b is friendlier than JSON in an environment variable.
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> Settings:
        # A mistyped --store must not quietly become a new, empty store: a new store may be made only inside an
        # existing directory (the default one is made with its parents).
        if "store" in self.model_fields_set and not self.store.exists() and not self.store.parent.is_dir():
            raise ValueError(f"store {self.store} does not exist, nor does {self.store.parent}: check the path, or "
                             "create the directory first")
        if self.store.exists() and not self.store.is_dir():
            raise ValueError(f"store {self.store} is a file, not a directory")
        if self.max_queue < self.max_batch_size:
            raise ValueError(f"max_queue ({self.max_queue}) must be at least max_batch_size ({self.max_batch_size})")
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 8:
            raise ValueError("the admin token (--admin-token / LPT_ADMIN_TOKEN) must be at least 8 characters; "
                             "generate one with `openssl rand -hex 16`")
        return self

    def admin_enabled(self) -> bool:
        return self.admin_token is not None and bool(self.admin_token.get_secret_value())

    def service_config(self) -> ServiceConfig:
        """What the serving layer needs, and nothing of HTTP: every field the two share, by name."""
        names = [f.name for f in dataclasses.fields(ServiceConfig) if f.name in type(self).model_fields]
        shared = {name: getattr(self, name) for name in names}
        shared |= {"pinned_tasks": tuple(self.pinned_tasks), "keep_versions": self.keep_versions or None}
        return ServiceConfig(**shared, seed_from=demo_adapters_dir() if self.seed_demo_tasks else None)
