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

What a pass pays per task stays small with many distinct tasks: every prompt of a layer goes into h in one write,
and probabilities take one softmax per label count. On an accelerator (see GROUP_ON_CPU), same-shaped generators
and linear heads of many tasks also run as batched matmuls over their stacked weights, and verbalizers share one
MLM-head call. A grouped call whose result is not finite for any of its tasks is redone one task at a time, so a
bad task fails exactly as it would alone.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tokenizers
import torch
import torch.nn.functional as F

from lpt_serve.model.adapter import TaskAdapter, special_tokens, template_token_ids
from lpt_serve.model.backbone import Backbone
from lpt_serve.model.generators import group_key, grouped_prompts, is_plain, reads_every_token
from lpt_serve.model.heads import VerbalizerHead, grouped_linear_logits, head_group_key, pooled_states

log = logging.getLogger(__name__)

# Generators and linear heads of the same kind and shape, of at least GROUP_MIN_TASKS tasks in one pass, run as one
# batched matmul over their stacked weights instead of one call per task (verbalizers: one MLM-head call). A task
# with more than GROUP_MAX_ROWS rows in the pass runs on its own: its rows already make a matrix product, and the
# grouped call pads every task to the most rows any of them has.
GROUP_MIN_TASKS = 2
GROUP_MAX_ROWS = 8
# On an accelerator one call per task costs a kernel launch or more each, which grouping saves. On a CPU a task's
# generator costs the reading of its weights (NPG: ~1 MB, at memory bandwidth whether grouped or not), stacking
# them reads and writes them once more, and a head's few ops cost less than laying rows out for a grouped call:
# with 64 tasks in a 64-row batch, per-task work was 37 ms one call per task, 44 with heads grouped and 45 with
# generators grouped too (bench/generators.py, 1 thread, CPU clock). So on a CPU every task runs its own calls.
GROUP_ON_CPU = False


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
    own = _untruncated(tok)
    # Without offsets (`encode_batch_fast`, tokenizers >= 0.21) where it exists: ids are all we read.
    encode = getattr(own, "encode_batch_fast", own.encode_batch)
    body = [encoding.ids for encoding in encode(list(texts), add_special_tokens=False)]
    out = []
    for ids in body:
        truncated = len(ids) > budget
        kept = tuple(ids[:budget])
        full = head_specials + prefix_ids + kept + suffix_ids + tail_specials
        mask_pos = None
        if in_prefix is not None:
            mask_pos = len(head_specials) + in_prefix
        elif in_suffix is not None:
            mask_pos = len(head_specials) + len(prefix_ids) + len(kept) + in_suffix
        out.append(Encoded(full, truncated, mask_pos))
    return out


_UNTRUNCATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _untruncated(tokenizer) -> tokenizers.Tokenizer:
    """The fast tokenizer's own Rust tokenizer, in a copy that never truncates or pads: called directly it costs
    half what transformers' wrapper does per request, and the wrapper's copy is no use here because the wrapper
    re-configures its truncation on every call (shared state that other threads' calls would change)."""
    own = _UNTRUNCATED.get(tokenizer)
    if own is None:
        own = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        own.no_truncation()
        own.no_padding()
        _UNTRUNCATED[tokenizer] = own
    return own


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
    # The layers between two prompt layers run as one span under one mask: the mask changes only where prompts go in.
    inserts = sorted({g.adapter.config.prompt_layer for g in groups})
    bounds = [start_layer, *(k for k in inserts if k > start_layer), backbone.num_layers]
    for begin, end in itertools.pairwise(bounds):
        here = [g for g in groups if g.adapter.config.prompt_layer == begin]
        if here:
            h, prompt_mask = _insert_prompts(_prompts(here, h[:, slots:], token_mask, faults), h, prompt_mask)
        h = backbone.run_layers(h, torch.cat([prompt_mask, token_mask], dim=1), begin, end)
    return _heads(groups, h, token_mask, prompt_mask, backbone, faults)


@dataclass
class _Layout:
    """The rows of G tasks as a [G, n] grid for a grouped call: task after task in `rows` [N], each row's task
    `task` [N] and place `place` [N] among its task's rows; n is the most rows any of them has."""

    rows: torch.Tensor
    task: torch.Tensor
    place: torch.Tensor
    counts: list[int]

    @classmethod
    def of(cls, groups: Sequence[TaskGroup]) -> _Layout:
        counts = [len(g.rows) for g in groups]
        rows = torch.cat([g.rows for g in groups])
        sizes = torch.tensor(counts, device=rows.device)
        task = torch.repeat_interleave(torch.arange(len(groups), device=rows.device), sizes)
        place = torch.arange(len(rows), device=rows.device) - (torch.cumsum(sizes, 0) - sizes)[task]
        return cls(rows, task, place, counts)

    def grid(self, values: torch.Tensor) -> torch.Tensor:
        """[N, ...] in `rows` order -> [G, n, ...], zeros where a task has fewer than n rows."""
        out = values.new_zeros((len(self.counts), max(self.counts), *values.shape[1:]))
        out[self.task, self.place] = values
        return out


@dataclass
class _Chunk:
    """Results for the rows of one or more tasks, one tensor for all of them: `values` [N, ...] in `rows` order,
    `counts` rows per task."""

    rows: torch.Tensor
    values: torch.Tensor
    counts: list[int]


def _partition(groups: Sequence[TaskGroup], key_of: Callable[[TaskGroup], tuple | None]) -> list[list[TaskGroup]]:
    """Groups that may share a grouped call (same key, few rows, at least GROUP_MIN_TASKS of them) together; every
    other group on its own."""
    shared: dict[tuple, list[TaskGroup]] = {}
    alone: list[list[TaskGroup]] = []
    for g in groups:
        key = key_of(g) if len(g.rows) <= GROUP_MAX_ROWS else None
        if key is None:
            alone.append([g])
        else:
            shared.setdefault(key, []).append(g)
    for members in shared.values():
        if len(members) >= GROUP_MIN_TASKS:
            alone.append(members)
        else:
            alone.extend([g] for g in members)
    return alone


def _grouped(members: Sequence[TaskGroup], compute: Callable[[_Layout], torch.Tensor]) -> _Chunk | None:
    """`compute` on the members' rows laid out [G, n, ...]; None when it raised or any value it gave the members'
    rows is not finite: then each member runs on its own, so a bad task is found, and answers, exactly as it would
    without grouping, and no other task's answer comes from a call that had its weights in it."""
    layout = _Layout.of(members)
    try:
        out = compute(layout)[layout.task, layout.place]  # [N, ...]
    except torch.OutOfMemoryError:
        raise
    except Exception:
        log.debug("a grouped call of %d tasks raised; running each on its own", len(members), exc_info=True)
        return None
    if not bool(torch.isfinite(out).all()):
        return None
    return _Chunk(layout.rows, out, layout.counts)


def _prompts(groups: Sequence[TaskGroup], tokens: torch.Tensor, token_mask: torch.Tensor,
             faults: Faults) -> list[_Chunk]:
    """The prompts [N, L, H] of every group whose prompt layer is this one, grouped where they can be; a group
    whose generator fails is recorded in `faults` and left out."""
    chunks: list[_Chunk] = []
    grouping = GROUP_ON_CPU or tokens.device.type != "cpu"
    for members in _partition(groups, lambda g: group_key(g.adapter.generator) if grouping else None):
        if len(members) > 1:
            key = group_key(members[0].adapter.generator)
            span = tokens if reads_every_token(key) else tokens[:, :1]

            def compute(layout: _Layout, members=members, span=span) -> torch.Tensor:
                return grouped_prompts([g.adapter.generator for g in members], layout.grid(span[layout.rows]),
                                       layout.grid(token_mask[layout.rows]))

            chunk = _grouped(members, compute)
            if chunk is not None:
                chunks.append(chunk)
                continue
        for g in members:
            prompt = _prompt_alone(g, tokens, token_mask, faults)
            if prompt is not None:
                chunks.append(_Chunk(g.rows, prompt, [len(g.rows)]))
    return chunks


def _prompt_alone(g: TaskGroup, tokens: torch.Tensor, token_mask: torch.Tensor, faults: Faults) -> torch.Tensor | None:
    try:
        key = group_key(g.adapter.generator)
        if key is not None and not reads_every_token(key):
            # A plain NPG reads each row's first token only: that token's rows through its two linears, as its
            # forward does (dropout is off in eval), without four module calls and a gather of every token.
            prompt = _npg_prompts(g.adapter.generator, tokens[:, 0][g.rows])
        else:
            prompt = g.adapter.generate(tokens[g.rows], token_mask[g.rows])  # [n, L, H]
        if prompt.dtype != tokens.dtype:
            prompt = prompt.to(tokens.dtype)
        expected = (len(g.rows), g.adapter.config.prompt_length, tokens.shape[-1])
        if tuple(prompt.shape) != expected:
            raise ValueError(f"task {g.adapter.task!r}: its generator gave prompts of shape {list(prompt.shape)}, "
                             f"not {list(expected)}")
        return prompt
    except Exception as exc:
        if faults is None:
            raise
        _record(faults, g.adapter, "generator", exc)
        return None


def _npg_prompts(generator: torch.nn.Module, first: torch.Tensor) -> torch.Tensor:
    """`NaivePromptGenerator.forward` in eval for first-token states [n, H] -> [n, L, H], its weights cast to the
    states' dtype when stored in another (a compact adapter)."""
    down, up = generator.down, generator.up
    weights = [down.weight, down.bias, up.weight, up.bias]
    if any(w.dtype != first.dtype for w in weights):
        weights = [w.to(first.dtype) for w in weights]
    prompt = F.linear(torch.relu(F.linear(first, weights[0], weights[1])), weights[2], weights[3])
    return prompt.view(first.shape[0], generator.prompt_length, first.shape[-1])


def _insert_prompts(chunks: Sequence[_Chunk], h: torch.Tensor,
                    prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every chunk's prompts into its rows' first L slots, and those slots unmasked: one write for all of them."""
    if not chunks:
        return h, prompt_mask
    lengths = {c.values.shape[1] for c in chunks}
    if len(lengths) == 1:  # the usual case, one prompt length: the index in a few ops, not a few per task
        length = lengths.pop()
        rows = torch.cat([c.rows for c in chunks])
        index = (rows.repeat_interleave(length), torch.arange(length, device=h.device).repeat(len(rows)))
        values = [torch.cat([c.values for c in chunks]).reshape(len(rows) * length, -1)]
    else:
        row_idx, slot_idx, values = [], [], []
        for c in chunks:
            rows, length = len(c.rows), c.values.shape[1]
            row_idx.append(c.rows.view(-1, 1).expand(-1, length).reshape(-1))
            slot_idx.append(torch.arange(length, device=h.device).repeat(rows))
            values.append(c.values.reshape(rows * length, -1))
        index = (torch.cat(row_idx), torch.cat(slot_idx))
    # Out of place, so autograd keeps the layer outputs it saved for the backward pass.
    h = h.index_put(index, torch.cat(values).to(h.dtype))
    prompt_mask = prompt_mask.index_put(index, prompt_mask.new_ones(()).expand(len(index[0])))
    return h, prompt_mask


def _heads(groups: Sequence[TaskGroup], h: torch.Tensor, token_mask: torch.Tensor, prompt_mask: torch.Tensor,
           backbone: Backbone, faults: Faults) -> list[torch.Tensor | None]:
    """Each group's logits [n, C], in group order: None where its generator or head failed (recorded in `faults`).
    Grouping (see GROUP_ON_CPU): linear heads of one pooling and shape run as one pooling and one batched matmul;
    verbalizers share one call of the backbone's MLM head."""
    live = [g for g in groups if faults is None or id(g.adapter) not in faults]
    logits: dict[int, torch.Tensor] = {}
    pooled_by: dict[str, torch.Tensor] = {}  # pooling -> every row's pooled state, shared by the linear heads
    grouping = GROUP_ON_CPU or h.device.type != "cpu"

    def key_of(g: TaskGroup) -> tuple | None:
        if not grouping:
            return None
        head = g.adapter.head
        if is_plain(head, VerbalizerHead):
            return ("verbalizer",)
        return head_group_key(head)

    for members in _partition(live, key_of):
        parts: list[torch.Tensor] | None = None
        if len(members) > 1:
            key = key_of(members[0])
            if key[0] == "verbalizer":
                parts = _verbalizer_logits(members, h, prompt_mask.shape[1], backbone)
            else:
                pooling = key[1]

                def compute(layout: _Layout, members=members, pooling=pooling) -> torch.Tensor:
                    pooled = pooled_states(h[layout.rows], token_mask[layout.rows], prompt_mask[layout.rows], pooling)
                    return grouped_linear_logits([g.adapter.head for g in members], layout.grid(pooled))

                chunk = _grouped(members, compute)
                parts = None if chunk is None else list(chunk.values.split(chunk.counts))
        if parts is not None:
            for g, part in zip(members, parts, strict=True):
                logits[id(g)] = part
            continue
        for g in members:
            try:
                logits[id(g)] = _head_alone(g, h, token_mask, prompt_mask, backbone, pooled_by)
            except Exception as exc:
                if faults is None:
                    raise
                _record(faults, g.adapter, "head", exc)
    return [logits.get(id(g)) for g in groups]


def _head_alone(g: TaskGroup, h: torch.Tensor, token_mask: torch.Tensor, prompt_mask: torch.Tensor,
                backbone: Backbone, pooled_by: dict[str, torch.Tensor]) -> torch.Tensor:
    """One task's logits. A plain linear head reads its rows of a pooling done once for the whole pass (pooling
    is row by row, so a row's pooled state is the same either way) and runs its classifier on them: two ops per
    task instead of the gather of its rows' hidden states and the pooling's half dozen."""
    head = g.adapter.head
    key = head_group_key(head)
    if key is None:
        return g.adapter.logits(h[g.rows], token_mask[g.rows], prompt_mask[g.rows], g.mask_positions, backbone)
    pooling = key[1]
    pooled = pooled_by.get(pooling)
    if pooled is None:
        pooled = pooled_by[pooling] = pooled_states(h, token_mask, prompt_mask, pooling)
    weight, bias = head.classifier.weight, head.classifier.bias
    if weight.dtype != pooled.dtype:  # a compact adapter: cast for this call, as `TaskAdapter.logits` does
        weight, bias = weight.to(pooled.dtype), bias.to(pooled.dtype)
    return F.linear(pooled[g.rows], weight, bias)


def _verbalizer_logits(members: Sequence[TaskGroup], h: torch.Tensor, slots: int,
                       backbone: Backbone) -> list[torch.Tensor] | None:
    """Plain verbalizer heads share the backbone's MLM head: one call on every member's `<mask>` state, then each
    member reads its own label words. None (each runs alone) if that call raises or gives a non-finite logit."""
    rows = torch.cat([g.rows for g in members])
    positions = torch.cat([g.mask_positions for g in members])
    try:
        vocab = backbone.mlm_logits(h[rows, slots + positions])  # [N, V]
    except torch.OutOfMemoryError:
        raise
    except Exception:
        log.debug("a shared MLM-head call of %d tasks raised; running each on its own", len(members), exc_info=True)
        return None
    parts = [part[:, g.adapter.head.label_word_ids]
             for g, part in zip(members, vocab.split([len(g.rows) for g in members]), strict=True)]
    if not all(bool(torch.isfinite(p).all()) for p in parts):
        return None
    return parts


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
    by_width: dict[int, list[tuple[TaskGroup, torch.Tensor]]] = {}  # one softmax per label count, not per task
    for g, lg in zip(groups, logits, strict=True):
        if lg is None:
            continue
        if faults is not None and tuple(lg.shape) != (len(g.rows), len(g.adapter.labels)):
            faults[id(g.adapter)] = TaskFault(g.adapter.task, "head", detail=(
                f"it gave scores of shape {list(lg.shape)} for {len(g.rows)} rows of {len(g.adapter.labels)} labels"))
            continue
        by_width.setdefault(lg.shape[-1], []).append((g, lg))
    for members in by_width.values():
        p = torch.softmax(torch.cat([lg for _, lg in members]).float(), dim=-1).cpu()
        for j, row in enumerate(torch.cat([g.rows for g, _ in members]).tolist()):
            probs[row] = p[j]
    return probs
