"""Task heads: the upper layers' output -> class logits.

`linear` works on any backbone. `verbalizer` reuses the backbone's frozen MLM head at the `<mask>` token
and reads the logits of one label word per class (the paper's head); it needs a backbone with an MLM head.

`pooled_states` and `grouped_linear_logits` run the linear heads of many tasks as one pooling and one batched
matmul over their stacked classifiers; `head_group_key` says which heads may share such a call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lpt_serve.model.generators import is_plain, stacked

HEAD_KINDS = ("linear", "verbalizer")
POOLINGS = ("mean", "cls", "mean_prompt")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class LinearHead(nn.Module):
    """Dropout -> Linear(h, C) over a pooled state.

    Pooling defaults to the mean over the real tokens (prompt slots excluded): sentence-transformers trained
    MiniLM's last layer for mean pooling, so that is where its sentence meaning lives; the prompt has already
    steered every token through attention in the upper layers. `cls` and `mean_prompt` (mean over real tokens
    and prompt slots) are there for backbones trained otherwise.
    """

    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "mean", dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor, prompt_mask: torch.Tensor,
                mask_positions: torch.Tensor | None = None, backbone=None) -> torch.Tensor:
        """hidden [B, P+S, H] with P prompt slots first; token_mask [B, S]; prompt_mask [B, P]."""
        return self.classifier(self.dropout(pooled_states(hidden, token_mask, prompt_mask, self.pooling)))


def pooled_states(hidden: torch.Tensor, token_mask: torch.Tensor, prompt_mask: torch.Tensor,
                  pooling: str) -> torch.Tensor:
    """hidden [B, P+S, H] with P prompt slots first -> [B, H], pooled as a linear head with `pooling` does."""
    slots = prompt_mask.shape[1]
    if pooling == "cls":
        return hidden[:, slots]
    if pooling == "mean":
        return masked_mean(hidden[:, slots:], token_mask)
    return masked_mean(hidden, torch.cat([prompt_mask, token_mask], dim=1))


class VerbalizerHead(nn.Module):
    """The backbone's MLM head at `<mask>`, restricted to one label word per class. No weights of its own."""

    def __init__(self, label_word_ids: list[int]) -> None:
        super().__init__()
        self.register_buffer("label_word_ids", torch.tensor(label_word_ids, dtype=torch.long), persistent=False)

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor, prompt_mask: torch.Tensor,
                mask_positions: torch.Tensor | None = None, backbone=None) -> torch.Tensor:
        if mask_positions is None or backbone is None:
            raise ValueError("a verbalizer head needs the <mask> positions and the backbone's MLM head")
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        at_mask = hidden[rows, prompt_mask.shape[1] + mask_positions]  # [B, H]
        # Only the label words' logits are needed; running the full vocab projection on B vectors is cheap.
        return backbone.mlm_logits(at_mask)[:, self.label_word_ids]


# ------------------------------------------------------------------------------------------------ grouped
def head_group_key(head: nn.Module) -> tuple | None:
    """What linear heads must share to run as one grouped call: pooling and classifier shape. None for a head that
    must run on its own (a verbalizer, a replaced or hooked module, training)."""
    if (is_plain(head, LinearHead) and is_plain(head.classifier, nn.Linear) and head.classifier.bias is not None
            and is_plain(head.dropout, nn.Dropout)):
        return ("linear", head.pooling, tuple(head.classifier.weight.shape))
    return None


def grouped_linear_logits(heads: Sequence[LinearHead], pooled: torch.Tensor) -> torch.Tensor:
    """Logits of G linear heads of one `head_group_key`, each on its own rows: pooled [G, n, H] -> [G, n, C]."""
    weight = stacked([h.classifier.weight for h in heads], pooled.dtype)  # [G, C, H]
    bias = stacked([h.classifier.bias for h in heads], pooled.dtype)  # [G, C]
    return torch.baddbmm(bias.unsqueeze(1), pooled, weight.transpose(1, 2))
