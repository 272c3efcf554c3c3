"""Prompt generators: hidden states at the prompt layer -> L prompt vectors per row.

See docs/architecture.md, "The method".

All generators take `hidden` [B, S, H] and `mask` [B, S] (1 on real tokens, right padding) and return
[B, L, H]. Everything is vectorised over the batch; ragged rows are handled with masks, not loops.

`grouped_prompts` runs the generators of many tasks of one kind and shape as batched matmuls over their stacked
weights (the grouped-GEMM path LoRAX's SGMV kernels take for LoRA), one call for all of them instead of one each;
`group_key` says which generators may share such a call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

GENERATOR_KINDS = ("npg", "mppg", "appg", "static")


class NaivePromptGenerator(nn.Module):
    """NPG: the first token's vector -> Linear(h, d) -> ReLU -> Linear(d, L*h) -> view(L, h) -> Dropout."""

    def __init__(self, hidden_size: int, prompt_length: int, bottleneck: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.prompt_length = prompt_length
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, prompt_length * hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, _, width = hidden.shape
        prompt = self.up(torch.relu(self.down(hidden[:, 0])))  # [B, L*H]
        return self.dropout(prompt.view(batch, self.prompt_length, width))


def adaptive_bins(lengths: torch.Tensor, slots: int, seq_len: int) -> torch.Tensor:
    """Membership [B, L, S] of token t in slot i, following PyTorch's adaptive pooling on each row's n real tokens.

    Slot i covers tokens [floor(i*n/L), ceil((i+1)*n/L)); bins may overlap, and when n < L a token feeds several slots.
    """
    n = lengths.view(-1, 1)  # [B, 1]
    i = torch.arange(slots, device=lengths.device).view(1, -1)  # [1, L]
    start = torch.div(i * n, slots, rounding_mode="floor")  # [B, L]
    end = torch.div((i + 1) * n + slots - 1, slots, rounding_mode="floor")  # ceil
    t = torch.arange(seq_len, device=lengths.device).view(1, 1, -1)  # [1, 1, S]
    return (t >= start.unsqueeze(-1)) & (t < end.unsqueeze(-1))  # [B, L, S]


class PoolingPromptGenerator(nn.Module):
    """PPG: Linear(h, d) on every real token -> adaptive max/avg pool to L slots -> ReLU -> Linear(d, h) -> Dropout.

    Its size does not depend on L: 2*h*d + d + h parameters.
    """

    def __init__(self, hidden_size: int, prompt_length: int, bottleneck: int, pooling: str,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', not {pooling!r}")
        self.prompt_length = prompt_length
        self.pooling = pooling
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        projected = self.down(hidden)  # [B, S, d]
        return self.dropout(self.up(torch.relu(pool_to_slots(projected, mask, self.prompt_length, self.pooling))))


def pool_to_slots(projected: torch.Tensor, mask: torch.Tensor, slots: int, pooling: str) -> torch.Tensor:
    """[B, S, d] token vectors -> [B, L, d]: each row's real tokens adaptively max- or avg-pooled to L slots."""
    lengths = mask.sum(dim=1).clamp(min=1)  # right padding: the real tokens are the first n
    bins = adaptive_bins(lengths, slots, projected.shape[1])  # [B, L, S]
    if pooling == "avg":
        weights = bins.to(projected.dtype)
        return weights @ projected / weights.sum(-1, keepdim=True)  # [B, L, d]
    # [B, L, S, d] is small here (d = 128, L ~ 5); masked_fill keeps it one fused op, no row loop.
    expanded = projected.unsqueeze(1).masked_fill(~bins.unsqueeze(-1), float("-inf"))
    return expanded.amax(dim=2)


class StaticPrompt(nn.Module):
    """Classic prompt tuning: L learned vectors, the same for every input (used with prompt layer 0)."""

    def __init__(self, hidden_size: int, prompt_length: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.prompt_length = prompt_length
        self.prompt = nn.Parameter(torch.randn(prompt_length, hidden_size) * init_std)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.prompt.unsqueeze(0).expand(hidden.shape[0], -1, -1)


def build_generator(kind: str, hidden_size: int, prompt_length: int, bottleneck: int,
                    dropout: float = 0.1) -> nn.Module:
    if kind == "npg":
        return NaivePromptGenerator(hidden_size, prompt_length, bottleneck, dropout)
    if kind == "mppg":
        return PoolingPromptGenerator(hidden_size, prompt_length, bottleneck, "max", dropout)
    if kind == "appg":
        return PoolingPromptGenerator(hidden_size, prompt_length, bottleneck, "avg", dropout)
    if kind == "static":
        return StaticPrompt(hidden_size, prompt_length)
    raise ValueError(f"unknown generator kind {kind!r}: use one of {', '.join(GENERATOR_KINDS)}")


# ------------------------------------------------------------------------------------------------ grouped
def is_plain(module: nn.Module, kind: type[nn.Module]) -> bool:
    """Of type `kind` exactly (no subclass), in eval mode, its forward neither replaced nor hooked: only then may a
    grouped matmul stand in for calling it (a patched or hooked module, or dropout in training, must run itself)."""
    return (type(module) is kind and not module.training and "forward" not in vars(module)
            and not module._forward_hooks and not module._forward_pre_hooks)


def _plain_linears(*layers: nn.Module) -> bool:
    return all(is_plain(layer, nn.Linear) and layer.bias is not None for layer in layers)


def group_key(generator: nn.Module) -> tuple | None:
    """What generators must share to run as one grouped call: kind, prompt length and weight shapes. None for one
    that must run on its own (a static prompt has no matmul to group; a replaced or hooked module; training)."""
    if not isinstance(generator, NaivePromptGenerator | PoolingPromptGenerator):
        return None
    if not (is_plain(generator, type(generator)) and _plain_linears(generator.down, generator.up)
            and is_plain(generator.dropout, nn.Dropout)):
        return None
    shapes = (tuple(generator.down.weight.shape), tuple(generator.up.weight.shape))
    if isinstance(generator, NaivePromptGenerator):
        return ("npg", generator.prompt_length, *shapes)
    return ("ppg", generator.pooling, generator.prompt_length, *shapes)


def reads_every_token(key: tuple) -> bool:
    """Whether generators of this group key read every token (PPG) or only the first (NPG)."""
    return key[0] != "npg"


def stacked(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[G, ...] of same-shaped tensors, each cast to `dtype` as it is copied (compact adapters keep fp16/bf16)."""
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=dtype, device=tensors[0].device)
    for i, t in enumerate(tensors):
        out[i].copy_(t)
    return out


def _grouped_linear(layers: Sequence[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """Each layer g on its own slice: x [G, n, in] -> [G, n, out], as `layers[g](x[g])` for every g at once."""
    weight = stacked([layer.weight for layer in layers], x.dtype)  # [G, out, in]
    bias = stacked([layer.bias for layer in layers], x.dtype)  # [G, out]
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def grouped_prompts(generators: Sequence[nn.Module], hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Prompts of G generators of one `group_key`, each on its own rows: hidden [G, n, S, H] and mask [G, n, S]
    (rows padded to n per generator) -> [G, n, L, H], what `generators[g](hidden[g], mask[g])` gives for every g.

    Each generator's rows meet only its own weights (a batched matmul never mixes its batch entries), so one
    generator's bad weights reach no other generator's prompts."""
    groups, rows, seq, width = hidden.shape
    first = generators[0]
    length = first.prompt_length
    down = [g.down for g in generators]
    up = [g.up for g in generators]
    if isinstance(first, NaivePromptGenerator):
        x = hidden[:, :, 0]  # [G, n, H]: NPG reads the first token only
        prompt = _grouped_linear(up, torch.relu(_grouped_linear(down, x)))  # [G, n, L*H]
        return prompt.view(groups, rows, length, width)
    projected = _grouped_linear(down, hidden.reshape(groups, rows * seq, width))  # [G, n*S, d]
    pooled = pool_to_slots(projected.view(groups * rows, seq, -1), mask.reshape(groups * rows, seq), length,
                           first.pooling)  # [G*n, L, d]
    prompt = _grouped_linear(up, torch.relu(pooled).view(groups, rows * length, -1))  # [G, n*L, H]
    return prompt.view(groups, rows, length, width)
