"""The HTTP contract's bodies (DESIGN §4), in one place: the server declares its responses with these models
and the clients parse with them, so the two cannot drift apart unnoticed."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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


class UploadResult(BaseModel):
    task: str
    version: int


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class MixedResponse(BaseModel):
    predictions: list[MixedPrediction]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
