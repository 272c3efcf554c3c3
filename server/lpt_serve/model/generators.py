"""Prompt generators: hidden states at the prompt layer -> L prompt vectors per row.

See docs/architecture.md, "The method".

All generators take `hidden` [B, S, H] and `mask` [B, S] (1 on real tokens, right padding) and return
[B, L, H]. Everything is vectorised over the batch; ragged rows are handled with masks, not loops.
"""

from __future__ import annotations

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
        lengths = mask.sum(dim=1).clamp(min=1)  # right padding: the real tokens are the first n
        bins = adaptive_bins(lengths, self.prompt_length, hidden.shape[1])  # [B, L, S]
        if self.pooling == "avg":
            weights = bins.to(projected.dtype)
            pooled = weights @ projected / weights.sum(-1, keepdim=True)  # [B, L, d]
        else:
            # [B, L, S, d] is small here (d = 128, L ~ 5); masked_fill keeps it one fused op, no row loop.
            expanded = projected.unsqueeze(1).masked_fill(~bins.unsqueeze(-1), float("-inf"))
            pooled = expanded.amax(dim=2)
        return self.dropout(self.up(torch.relu(pooled)))


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
