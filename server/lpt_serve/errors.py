"""What can go wrong, as domain exceptions. None of them knows an HTTP status: the edge
(`lpt_serve.api.errors`) maps each kind to its status and `type` in one table, as TEI maps its core error enum
in its router. The CLI prints the same messages as one sentence each.
"""

from __future__ import annotations


class LptServeError(Exception):
    """Base of every error lpt-serve raises on purpose; `message` is one sentence a user can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(LptServeError):
    """The caller's input breaks a rule (empty text, bad task name, ...)."""


class InvalidTaskName(InvalidInput, ValueError):
    """A task name outside the rule in `lpt_serve.format`."""


class InputTooLarge(LptServeError):
    """More texts, characters or bytes than the configured limits allow."""


class TaskNotFound(LptServeError):
    """No such task is served (or stored)."""


class NothingToRollBack(LptServeError):
    """Rollback asked of a task with a single version."""


class AdapterError(LptServeError):
    """An adapter cannot be used. `problems` lists every mismatch, each a sentence."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class BackboneError(LptServeError):
    """The backbone folder, device or dtype cannot be used; the message says what to do."""


class StoreError(LptServeError):
    """The adapter store cannot do what was asked (unreadable state, a directory that is not an adapter)."""


class StoreUnwritable(StoreError):
    """The store cannot take a change now (read-only, or the disk is full); what it holds still serves."""


class TaskFailed(LptServeError):
    """This task's adapter failed in the forward pass or gave non-finite outputs; other tasks were answered."""


class TaskQuarantined(LptServeError):
    """The task keeps failing and is held out of every batch until an operator uploads or rolls back."""


class RetryLater(LptServeError):
    """The request was refused before any work; `retry_after` seconds is a fair wait."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(RetryLater):
    """The queue is full."""


class Unavailable(RetryLater):
    """Starting or shutting down."""


class DeadlineExceeded(LptServeError):
    """No answer within the request's deadline."""
