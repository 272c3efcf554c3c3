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
from lpt_serve.format import MASK_SLOT, TEXT_SLOT
from lpt_serve.model.adapter import TaskAdapter
from lpt_serve.model.backbone import Backbone


@dataclass(frozen=True)
class Encoded:
    """One tokenized row: ids with special tokens, whether the text was cut, where `<mask>` is (verbalizer)."""

    input_ids: tuple[int, ...]
    truncated: bool
    mask_position: int | None = None


def encode_texts(backbone: Backbone, texts: Sequence[str], template: str | None = None,
                 max_length: int | None = None) -> list[Encoded]:
    """Tokenize texts into a task's template, cutting the text (never the template) to fit the backbone."""
    tok = backbone.tokenizer
    limit = min(max_length or backbone.max_length, backbone.max_length)
    prefix_ids: list[int] = []
    suffix_ids: list[int] = []
    if template is not None:
        prefix, suffix = template.split(TEXT_SLOT, 1)
        prefix = prefix.replace(MASK_SLOT, tok.mask_token or MASK_SLOT)
        suffix = suffix.replace(MASK_SLOT, tok.mask_token or MASK_SLOT)
        prefix_ids = tok(prefix.rstrip(), add_special_tokens=False)["input_ids"] if prefix.strip() else []
        suffix_ids = tok(suffix, add_special_tokens=False)["input_ids"] if suffix.strip() else []
    # The special tokens around one sequence ([CLS] x [SEP], <s> x </s>), read off the tokenizer itself because
    # transformers 5 dropped build_inputs_with_special_tokens.
    around = tok("", add_special_tokens=True)["input_ids"]
    head_specials, tail_specials = around[:1], around[1:]
    specials = len(around)
    budget = max(1, limit - specials - len(prefix_ids) - len(suffix_ids))
    body = tok(list(texts), add_special_tokens=False)["input_ids"]
    out = []
    for ids in body:
        truncated = len(ids) > budget
        full = head_specials + prefix_ids + ids[:budget] + suffix_ids + tail_specials
        mask_pos = None
        if template is not None and tok.mask_token_id is not None and tok.mask_token_id in full:
            mask_pos = full.index(tok.mask_token_id)
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


def group_by_task(adapters: Sequence[TaskAdapter], mask_positions: Sequence[int | None] | None = None,
                  device: torch.device | None = None) -> list[TaskGroup]:
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
            length = g.adapter.config.prompt_length
            prompt = g.adapter.generate(h[g.rows, slots:], token_mask[g.rows]).to(h.dtype)  # [n, L, H]
            # Out of place, so autograd keeps the layer outputs it saved for the backward pass.
            row_idx = g.rows.view(-1, 1).expand(-1, length)
            slot_idx = torch.arange(length, device=h.device).view(1, -1).expand(len(g.rows), -1)
            h = h.index_put((row_idx, slot_idx), prompt)
            prompt_mask = prompt_mask.index_put((row_idx, slot_idx), torch.ones_like(slot_idx, dtype=prompt_mask.dtype))
        h = backbone.run_layers(h, torch.cat([prompt_mask, token_mask], dim=1), layer, layer + 1)
    return [
        g.adapter.logits(h[g.rows], token_mask[g.rows], prompt_mask[g.rows], g.mask_positions, backbone)
        for g in groups
    ]


@torch.inference_mode()
def classify_rows(backbone: Backbone, adapters: Sequence[TaskAdapter],
                  encoded: Sequence[Encoded]) -> list[torch.Tensor]:
    """Class probabilities for each row (each its own task), in row order, from one mixed pass.

    Rows with identical token ids (one text asked of several tasks with the same template) run the layers
    below the lowest prompt layer once.
    """
    if len(adapters) != len(encoded):
        raise ValueError("one adapter per row")
    if not encoded:
        return []
    device = backbone.device
    unique: dict[tuple[int, ...], int] = {}
    row_to_unique = [unique.setdefault(e.input_ids, len(unique)) for e in encoded]
    ids, mask = pad_rows(list(unique.keys()), backbone.tokenizer.pad_token_id or 0)
    ids, mask = ids.to(device), mask.to(device)
    start = min(a.config.prompt_layer for a in adapters)
    shared = backbone.lower(ids, mask, upto=start)  # [U, S, H]
    index = torch.tensor(row_to_unique, dtype=torch.long, device=device)
    hidden, token_mask = shared[index], mask[index]
    groups = group_by_task(adapters, [e.mask_position for e in encoded], device)
    logits = upper_forward(backbone, hidden, token_mask, start, groups)
    probs: list[torch.Tensor | None] = [None] * len(encoded)
    for g, lg in zip(groups, logits, strict=True):
        p = torch.softmax(lg.float(), dim=-1).cpu()
        for j, row in enumerate(g.rows.tolist()):
            probs[row] = p[j]
    return probs  # type: ignore[return-value]
