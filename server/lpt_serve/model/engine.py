"""Mixed-task forward: many rows, each with its own task, through one pass of the frozen encoder.

See docs/architecture.md, "The mixed pass".

The pass, for a batch whose tasks use prompt layers k_min..k_max and prompt lengths up to P:

    unique token rows --embed, layers 1..k_min--> H            (identical rows share this work)
    H -> per row, with P prompt slots in front, masked            h: [B, P + S, H]
    for layer j = k_min .. N-1:
        rows whose task has prompt layer j get their prompt in their first L_task slots (mask 1)
        run layer j+1 on every row
    each task's head on its rows -> softmax -> probabilities in row order

Slots are reserved from the start for rows with a later prompt layer and stay masked (as keys) until their
layer fills them, so one pass serves rows of different prompt layers. A masked key adds exactly zero to
attention, so a row's result equals its result alone, whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lpt_serve.model.adapter import TaskAdapter, special_tokens, template_token_ids
from lpt_serve.model.backbone import Backbone


@dataclass(frozen=True)
class Encoded:
    """One tokenized row: ids with special tokens, whether the text was cut, where `<mask>` is (verbalizer)."""

    input_ids: tuple[int, ...]
    truncated: bool
    mask_position: int | None = None


def encode_texts(backbone: Backbone, texts: Sequence[str], template: str | None = None,
                 max_length: int | None = None) -> list[Encoded]:
    """Tokenize texts into a task's template, cutting the text (never the template) to fit the backbone.

    Every row fits the backbone's positions: `check_adapter` keeps a template to half of them, and a template
    that leaves no token for the text is refused here rather than sent into a pass it would break.
    """
    tok = backbone.tokenizer
    limit = min(max_length or backbone.max_length, backbone.max_length)
    prefix_ids, suffix_ids = template_token_ids(tok, template)
    head_specials, tail_specials = special_tokens(tok)
    fixed = len(head_specials) + len(prefix_ids) + len(suffix_ids) + len(tail_specials)
    if fixed + 1 > backbone.max_length:
        raise ValueError(f"the template takes {fixed - len(head_specials) - len(tail_specials)} tokens, leaving no "
                         f"room for text in the backbone's {backbone.max_length} positions")
    budget = max(1, limit - fixed)
    # The mask is found in the template's own tokens, so a `[MASK]` typed in the text is never taken for it.
    mask_id = tok.mask_token_id if template is not None else None
    in_prefix = prefix_ids.index(mask_id) if mask_id is not None and mask_id in prefix_ids else None
    in_suffix = suffix_ids.index(mask_id) if mask_id is not None and mask_id in suffix_ids else None
    body = tok(list(texts), add_special_tokens=False)["input_ids"]
    out = []
    for ids in body:
        truncated = len(ids) > budget
        kept = ids[:budget]
        full = head_specials + prefix_ids + kept + suffix_ids + tail_specials
        mask_pos = None
        if in_prefix is not None:
            mask_pos = len(head_specials) + in_prefix
        elif in_suffix is not None:
            mask_pos = len(head_specials) + len(prefix_ids) + len(kept) + in_suffix
        out.append(Encoded(tuple(full), truncated, mask_pos))
    return out


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@dataclass
class TaskGroup:
    """The rows of one task in a batch: `rows` [n] indexes the batch, `mask_positions` [n] for verbalizers."""

    adapter: TaskAdapter
    rows: torch.Tensor
    mask_positions: torch.Tensor | None = None


@dataclass(frozen=True)
class TaskFault:
    """Why one task's rows have no answer from a pass: its own generator or head raised (`error`), or its outputs
    are unusable. The message names the stage, never the exception's text (that goes to the log only)."""

    task: str
    stage: str  # "rows", "generator", "head", "outputs" or "pass" (it raised when run alone)
    error: BaseException | None = None
    detail: str = ""

    def describe(self) -> str:
        if self.stage == "outputs":
            return self.detail or "its probabilities are not finite (NaN or infinite)"
        what = {"pass": "its rows failed in a pass of their own", "rows": "its rows could not be grouped"}.get(
            self.stage, f"its {self.stage} raised")
        if self.error is not None:
            what += f" ({type(self.error).__name__})"
        return what + (f": {self.detail}" if self.detail else "")


# Faults collected during an isolated pass, by id(adapter); None: let every exception propagate (the trainer).
Faults = dict[int, TaskFault] | None


def _record(faults: dict[int, TaskFault], adapter: TaskAdapter, stage: str, error: BaseException) -> None:
    # Running out of memory says nothing about the task whose module happened to be running: never blame it.
    if isinstance(error, torch.OutOfMemoryError):
        raise error
    faults[id(adapter)] = TaskFault(adapter.task, stage, error)


def group_by_task(adapters: Sequence[TaskAdapter], mask_positions: Sequence[int | None] | None = None,
                  device: torch.device | None = None, faults: Faults = None) -> list[TaskGroup]:
    """Runs of rows per adapter (LoRAX-style segments): each generator and head runs once per task, not per row."""
    by_adapter: dict[int, list[int]] = {}
    order: dict[int, TaskAdapter] = {}
    for i, a in enumerate(adapters):
        by_adapter.setdefault(id(a), []).append(i)
        order[id(a)] = a
    groups = []
    for key, rows in by_adapter.items():
        adapter = order[key]
        positions = None
        if adapter.config.head == "verbalizer":
            if mask_positions is None or any(mask_positions[i] is None for i in rows):
                if faults is not None:
                    faults[key] = TaskFault(adapter.task, "rows", detail="a row has no <mask> position")
                    continue
                raise ValueError(f"task {adapter.task!r} needs a <mask> position on every row")
            positions = torch.tensor([mask_positions[i] for i in rows], dtype=torch.long, device=device)
        groups.append(TaskGroup(adapter, torch.tensor(rows, dtype=torch.long, device=device), positions))
    return groups


def upper_forward(backbone: Backbone, hidden: torch.Tensor, token_mask: torch.Tensor, start_layer: int,
                  groups: Sequence[TaskGroup]) -> list[torch.Tensor]:
    """From H_{start_layer} [B, S, H] of every row to each group's logits [n_g, C_g].

    Every group's prompt layer must be >= start_layer. Used by the server (after the shared lower layers)
    and by the trainer (on cached lower layers, with gradients through generator and head).
    """
    return _upper(backbone, hidden, token_mask, start_layer, groups, None)  # type: ignore[return-value]


def _upper(backbone: Backbone, hidden: torch.Tensor, token_mask: torch.Tensor, start_layer: int,
           groups: Sequence[TaskGroup], faults: Faults) -> list[torch.Tensor | None]:
    """`upper_forward`; with `faults`, a group whose generator or head raises is recorded there, its logits are
    None and the pass goes on for the others (its rows stay in the batch, unprompted, and are never read)."""
    batch, seq, width = hidden.shape
    slots = max(g.adapter.config.prompt_length for g in groups)
    if any(g.adapter.config.prompt_layer < start_layer for g in groups):
        raise ValueError("a task's prompt layer lies below the layer the batch starts from")
    h = torch.cat([hidden.new_zeros(batch, slots, width), hidden], dim=1)  # [B, P+S, H]
    prompt_mask = token_mask.new_zeros(batch, slots)  # [B, P]
    for layer in range(start_layer, backbone.num_layers):
        for g in groups:
            if g.adapter.config.prompt_layer != layer:
                continue
            try:
                h, prompt_mask = _insert_prompt(g, h, prompt_mask, token_mask, slots)
            except Exception as exc:
                if faults is None:
                    raise
                _record(faults, g.adapter, "generator", exc)
        h = backbone.run_layers(h, torch.cat([prompt_mask, token_mask], dim=1), layer, layer + 1)
    logits: list[torch.Tensor | None] = []
    for g in groups:
        if faults is not None and id(g.adapter) in faults:
            logits.append(None)
            continue
        try:
            logits.append(g.adapter.logits(h[g.rows], token_mask[g.rows], prompt_mask[g.rows], g.mask_positions,
                                           backbone))
        except Exception as exc:
            if faults is None:
                raise
            _record(faults, g.adapter, "head", exc)
            logits.append(None)
    return logits


def _insert_prompt(g: TaskGroup, h: torch.Tensor, prompt_mask: torch.Tensor, token_mask: torch.Tensor,
                   slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's prompt into its rows' first L slots, and those slots unmasked."""
    length = g.adapter.config.prompt_length
    prompt = g.adapter.generate(h[g.rows, slots:], token_mask[g.rows]).to(h.dtype)  # [n, L, H]
    # Out of place, so autograd keeps the layer outputs it saved for the backward pass.
    row_idx = g.rows.view(-1, 1).expand(-1, length)
    slot_idx = torch.arange(length, device=h.device).view(1, -1).expand(len(g.rows), -1)
    h = h.index_put((row_idx, slot_idx), prompt)
    prompt_mask = prompt_mask.index_put((row_idx, slot_idx), torch.ones_like(slot_idx, dtype=prompt_mask.dtype))
    return h, prompt_mask


@torch.inference_mode()
def classify_rows(backbone: Backbone, adapters: Sequence[TaskAdapter],
                  encoded: Sequence[Encoded]) -> list[torch.Tensor]:
    """Class probabilities for each row (each its own task), in row order, from one mixed pass.

    Rows with identical token ids (one text asked of several tasks with the same template) run the layers
    below the lowest prompt layer once. Any failure fails the whole call; see `classify_rows_isolated`.
    """
    return _classify(backbone, adapters, encoded, None)  # type: ignore[return-value]


@torch.inference_mode()
def classify_rows_isolated(backbone: Backbone, adapters: Sequence[TaskAdapter],
                           encoded: Sequence[Encoded]) -> list[torch.Tensor | TaskFault]:
    """`classify_rows` where one task cannot fail or change another: a task whose generator or head raises, or
    whose head gives the wrong number of scores, answers a `TaskFault` on each of its rows; a row whose
    probabilities are not finite answers one too. Every other row is exactly what `classify_rows` gives.

    This works without a retry because a row only ever attends to itself: a task's NaN prompt reaches no other
    task's rows. What raises outside any one task's modules (the backbone itself) still raises.
    """
    faults: dict[int, TaskFault] = {}
    probs = _classify(backbone, adapters, encoded, faults)
    out: list[torch.Tensor | TaskFault] = []
    for adapter, p in zip(adapters, probs, strict=True):
        fault = faults.get(id(adapter))
        if fault is not None:
            out.append(fault)
        elif p is None or not bool(torch.isfinite(p).all()):
            out.append(TaskFault(adapter.task, "outputs"))
        else:
            out.append(p)
    return out


# What one extra pass costs, in padded positions: the per-layer calls, one generator and head call per task. With
# 64, batches of 32 MR sentences in arrival order go from 52% padded positions to 15% (64 rows: 12%), in 3-5
# buckets a batch.
BUCKET_OVERHEAD_POSITIONS = 64


def length_buckets(lengths: Sequence[int], overhead: int = BUCKET_OVERHEAD_POSITIONS) -> list[list[int]]:
    """Row indices split into runs of similar length, each to be padded to its own longest row.

    Rows sorted by length; the split points minimise the positions computed (rows x longest row, per bucket) plus
    `overhead` per bucket, by dynamic programming over the sorted lengths. A cut between rows of equal length never
    helps, so only the points where the length changes are tried: quadratic in the distinct lengths (at most the
    backbone's positions), not in the rows, so a batch of thousands of rows costs no more to split.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(order)
    # ends[g]: how many of the sorted rows have a length <= the g-th distinct length.
    ends = [j for j in range(1, n + 1) if j == n or lengths[order[j]] != lengths[order[j - 1]]]
    best = {0: 0}  # best[j]: cheapest split of the j shortest rows, for j at a length change
    cut = {0: 0}
    starts = [0]
    for j in ends:
        longest = lengths[order[j - 1]]
        best[j], cut[j] = min((best[i] + (j - i) * longest + overhead, i) for i in starts)
        starts.append(j)
    buckets, j = [], n
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


def padded_positions(lengths: Sequence[int], overhead: int = BUCKET_OVERHEAD_POSITIONS) -> int:
    """Positions the engine computes for rows of these lengths (after bucketing)."""
    return sum(len(b) * max(lengths[i] for i in b) for b in length_buckets(lengths, overhead))


def _classify(backbone: Backbone, adapters: Sequence[TaskAdapter], encoded: Sequence[Encoded],
              faults: Faults) -> list[torch.Tensor | None]:
    """Each length bucket as its own mixed pass: a row's result is the same in any pass, so this only removes
    padding (on a CPU a pass costs about its padded positions)."""
    if len(adapters) != len(encoded):
        raise ValueError("one adapter per row")
    probs: list[torch.Tensor | None] = [None] * len(encoded)
    for bucket in length_buckets([len(e.input_ids) for e in encoded]):
        for i, p in zip(bucket, _classify_padded(backbone, [adapters[i] for i in bucket],
                                                 [encoded[i] for i in bucket], faults), strict=True):
            probs[i] = p
    return probs


def _classify_padded(backbone: Backbone, adapters: Sequence[TaskAdapter], encoded: Sequence[Encoded],
                     faults: Faults) -> list[torch.Tensor | None]:
    if not encoded:
        return []
    device = backbone.device
    groups = group_by_task(adapters, [e.mask_position for e in encoded], device, faults)
    probs: list[torch.Tensor | None] = [None] * len(encoded)
    if not groups:
        return probs
    unique: dict[tuple[int, ...], int] = {}
    row_to_unique = [unique.setdefault(e.input_ids, len(unique)) for e in encoded]
    ids, mask = pad_rows(list(unique.keys()), backbone.tokenizer.pad_token_id or 0)
    ids, mask = ids.to(device), mask.to(device)
    start = min(g.adapter.config.prompt_layer for g in groups)
    shared = backbone.lower(ids, mask, upto=start)  # [U, S, H]
    index = torch.tensor(row_to_unique, dtype=torch.long, device=device)
    hidden, token_mask = shared[index], mask[index]
    logits = _upper(backbone, hidden, token_mask, start, groups, faults)
    for g, lg in zip(groups, logits, strict=True):
        if lg is None:
            continue
        if faults is not None and tuple(lg.shape) != (len(g.rows), len(g.adapter.labels)):
            faults[id(g.adapter)] = TaskFault(g.adapter.task, "head", detail=(
                f"it gave scores of shape {list(lg.shape)} for {len(g.rows)} rows of {len(g.adapter.labels)} labels"))
            continue
        p = torch.softmax(lg.float(), dim=-1).cpu()
        for j, row in enumerate(g.rows.tolist()):
            probs[row] = p[j]
    return probs
