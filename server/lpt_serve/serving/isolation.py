"""One task must never fail or change another's answers: a mixed pass in which a failing task answers
`TaskFailed` on its rows and every other row is answered as if it ran alone.

The engine (`model/engine.py::classify_rows_isolated`) singles out a task whose generator or head raises, or
whose outputs are not finite. A failure it cannot pin on one task (say, the pass itself raised) is retried one
task at a time here; if even the plain backbone fails, the fault is the server's and no task is blamed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lpt_serve.errors import TaskFailed
from lpt_serve.model.adapter import TaskAdapter, special_tokens
from lpt_serve.model.backbone import Backbone
from lpt_serve.model.engine import Encoded, TaskFault, classify_rows_isolated, pad_rows

log = logging.getLogger(__name__)


@dataclass
class PassOutcome:
    """What one batch answered: per row its probabilities or the error to raise for it; per adapter whether it
    failed (a strike towards quarantine) or answered every row (strikes reset). Adapters in neither: unknown."""

    answers: list[list[float] | BaseException]
    failed: dict[int, tuple[TaskAdapter, TaskFault]]
    answered: dict[int, TaskAdapter]


def answer_rows(backbone: Backbone, adapters: Sequence[TaskAdapter], encoded: Sequence[Encoded]) -> PassOutcome:
    """One mixed pass in which a failing task answers `TaskFailed` on its rows and every other row is answered as
    if it ran alone. A failure the pass cannot pin on one task's modules is retried one task at a time."""
    try:
        results: list[torch.Tensor | TaskFault | BaseException] = list(
            classify_rows_isolated(backbone, adapters, encoded))
    except Exception as exc:
        log.warning("a mixed pass of %d rows failed outside any task's generator or head; running each task alone",
                    len(adapters), exc_info=True)
        results = _each_task_alone(backbone, adapters, encoded, exc)
    answers: list[list[float] | BaseException] = []
    failed: dict[int, tuple[TaskAdapter, TaskFault]] = {}
    for adapter, result in zip(adapters, results, strict=True):
        if isinstance(result, TaskFault):
            if id(adapter) not in failed:
                log.error("task %s failed in a forward pass: %s", adapter.task, result.describe(),
                          exc_info=result.error)
            failed[id(adapter)] = (adapter, result)
            answers.append(TaskFailed(f"task {adapter.task!r} failed in the forward pass: {result.describe()}; "
                                      "the other tasks in its batch were answered"))
        elif isinstance(result, BaseException):
            answers.append(result)
        else:
            answers.append(result.tolist())
    clean = {id(a): a for a, r in zip(adapters, results, strict=True) if isinstance(r, torch.Tensor)}
    answered = {key: a for key, a in clean.items() if key not in failed}
    return PassOutcome(answers, failed, answered)


def _each_task_alone(backbone: Backbone, adapters: Sequence[TaskAdapter], encoded: Sequence[Encoded],
                     error: Exception) -> list[torch.Tensor | TaskFault | BaseException]:
    """Each task's rows in a pass of their own. A task that raises alone while another task runs, or while the
    plain backbone runs, is the one at fault; if nothing runs, the server is (every row gets `error`)."""
    by_adapter: dict[int, list[int]] = {}
    for i, a in enumerate(adapters):
        by_adapter.setdefault(id(a), []).append(i)
    results: list[torch.Tensor | TaskFault | BaseException] = [error] * len(adapters)
    suspects: list[int] = []
    for rows in by_adapter.values():
        adapter = adapters[rows[0]]
        try:
            alone = classify_rows_isolated(backbone, [adapter] * len(rows), [encoded[i] for i in rows])
        except torch.OutOfMemoryError as exc:  # says nothing about the task
            alone = [exc] * len(rows)
        except Exception as exc:
            alone = [TaskFault(adapter.task, "pass", exc)] * len(rows)
            suspects += rows
        for i, result in zip(rows, alone, strict=True):
            results[i] = result
    if suspects and len(suspects) == len(adapters) and not _backbone_runs(backbone):
        return [error] * len(adapters)
    return results


@torch.inference_mode()
def _backbone_runs(backbone: Backbone) -> bool:
    """Whether the plain backbone still runs a row of just its special tokens: if not, no task is to blame."""
    head, tail = special_tokens(backbone.tokenizer)
    try:
        ids, mask = pad_rows([head + tail], backbone.tokenizer.pad_token_id or 0)
        backbone(ids.to(backbone.device), mask.to(backbone.device))
    except Exception:
        log.exception("the plain backbone fails too: the fault is the server's, not a task's")
        return False
    return True
