"""The wire contract of lpt-serve, in one place: request and response bodies, the adapter's file names and the
task-name rule. The server declares its routes with these models and the clients build and parse with them, so
the two cannot drift apart unnoticed. Pure pydantic: importing this pulls in neither torch nor the server.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# ------------------------------------------------------------------------------------------- adapter format
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

TASK_NAME_RULE = "1-64 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
# Use with `fullmatch`: `match` with `$` would accept a trailing newline ("mr\n").
TASK_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# The same rule for JSON Schema and pydantic `pattern=`, which search rather than match: anchored at both ends. Both
# the OpenAPI reader (ECMA-262) and pydantic's Rust engine read `$` as the end of the text, never before a "\n".
TASK_NAME_SCHEMA_PATTERN = f"^{TASK_NAME_PATTERN.pattern}$"


def is_task_name(name: object) -> bool:
    return isinstance(name, str) and TASK_NAME_PATTERN.fullmatch(name) is not None


# -------------------------------------------------------------------------------------------------- requests
class ClassifyRequest(BaseModel):
    """Body of `POST /classify/{task}`: exactly one of `text` (one text) or `texts` (a non-empty list of texts);
    both, neither, or `texts: []` is a 422. Every text needs a non-space character (422 otherwise) and at most
    the server's LPT_MAX_TEXT_CHARS characters; `texts` holds at most LPT_MAX_TEXTS_PER_REQUEST texts (413
    beyond either)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "a gripping, funny film"}]})
    text: str | None = Field(None, description="one text to classify; give this or `texts`, not both")
    texts: list[str] | None = Field(
        None, description="several texts, classified in one call and answered in order; give this or `text`")

    @model_validator(mode="after")
    def _exactly_one(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        if self.texts is not None and not self.texts:
            raise ValueError("'texts' must hold at least one text")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class MixedItem(BaseModel):
    """One text for one task."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(pattern=TASK_NAME_SCHEMA_PATTERN, description=f"a served task's name: {TASK_NAME_RULE}")
    text: str = Field(description="the text to classify; at least one non-space character")


class MixedRequest(BaseModel):
    """Body of `POST /classify`: many tasks in one call."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"items": [{"task": "mr", "text": "a gripping film"}, {"task": "bbc", "text": "Shares fell"}]}]})
    items: list[MixedItem] = Field(
        min_length=1, description="one prediction per item, in order; at most LPT_MAX_TEXTS_PER_REQUEST items (413)")


# ------------------------------------------------------------------------------------------------- responses
class Prediction(BaseModel):
    label: str
    score: float
    scores: dict[str, float]
    truncated: bool = Field(description="the text was longer than the backbone takes and was cut")


class ClassifyResult(BaseModel):
    task: str
    version: int
    predictions: list[Prediction]


class MixedPrediction(Prediction):
    """One prediction from `POST /classify`; carries the task and adapter version that produced it."""

    task: str
    version: int


class MixedResponse(BaseModel):
    predictions: list[MixedPrediction]


class TaskSummary(BaseModel):
    """One task in the default (compact) `GET /tasks` listing; `GET /tasks/{task}` has the full record."""

    model_config = ConfigDict(extra="allow")

    task: str
    version: int
    labels: list[str]
    location: Literal["gpu", "cpu", "disk"] = Field(
        description="gpu: on the accelerator; cpu: loaded in host memory; disk: in the store, loaded on first use")
    quarantined: bool = False
    quarantine_reason: str | None = None


class TaskSummaries(BaseModel):
    """A page of the compact listing; pass `next` back as `cursor` for the following page (null: the last one)."""

    tasks: list[TaskSummary]
    next: str | None = None


class TaskInfo(BaseModel):
    # Newer servers may report more fields; keep them (see `model_extra`) rather than fail or drop them.
    model_config = ConfigDict(extra="allow")

    task: str
    version: int
    versions: list[int]
    labels: list[str]
    generator: str
    prompt_layer: int
    prompt_length: int
    head: str
    parameters: int
    location: Literal["gpu", "cpu", "disk"]
    pinned: bool
    # Defaults, so answers from servers that predate quarantine still parse.
    quarantined: bool = Field(default=False, description="held out of every batch after failing passes in a row; "
                                                         "an upload or rollback serves it again")
    quarantine_reason: str | None = Field(default=None, description="why it is quarantined, when it is")


class TaskList(BaseModel):
    """A page of the full listing (`GET /tasks?view=full`); `next` as in `TaskSummaries`."""

    tasks: list[TaskInfo]
    next: str | None = Field(default=None, description="the cursor of the next page; null on the last page")


class UploadResult(BaseModel):
    task: str
    version: int


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
