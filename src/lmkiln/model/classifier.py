"""Sequence classification with a decoder backbone: hidden states → pooling → a linear head.

The backbone is any `Transformer` (a pretrained run, fully trained, frozen in part or with LoRA
adapters); the head maps the pooled final hidden state (B, C) to class logits (B, n_classes).
Pooling is at the last real token (a causal model has read the whole text there; right padding
is skipped by the attention mask) or the mean over real tokens. It trains through the one loop
with `lmkiln.train.objectives.ClassificationLoss`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmkiln.model.transformer import Transformer


def pool_last(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) → (B, C) at each row's last real token (right padding)."""
    last = mask.sum(dim=1).clamp(min=1) - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pool_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) → (B, C): the mean over real tokens."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


POOLING: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "last": pool_last,
    "mean": pool_mean,
}


class SequenceClassifier(nn.Module):
    """`forward(input_ids, attention_mask=, position_ids=)` → class logits (B, n_classes)."""

    def __init__(self, backbone: Transformer, n_classes: int, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {', '.join(POOLING)}, got {pooling!r}")
        self.backbone, self.pooling = backbone, pooling
        self.head = nn.Linear(backbone.cfg.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=backbone.cfg.init_std)
        nn.init.zeros_(self.head.bias)

    @property
    def cfg(self):
        return self.backbone.cfg

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone.hidden_states(
            input_ids, attention_mask=attention_mask, position_ids=position_ids
        )  # (B, T, C)
        return self.head(POOLING[self.pooling](hidden, attention_mask))


def is_classifier_checkpoint(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("head.") for k in tensors) and any(k.startswith("backbone.") for k in tensors)
