"""Objectives: what the training step minimises, as (sum of loss terms, number of terms).

The step divides every micro-batch's *sum* by the number of terms in the whole optimizer step
(all micro-batches, all ranks), counted before any forward pass. That makes k micro-batches of b
exactly one batch of k·b, also when padding leaves rows with different numbers of targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.data.loader import IGNORE_INDEX
from lmkiln.errors import LmkilnError

Batch = dict[str, torch.Tensor]
MODEL_INPUTS = ("doc_ids", "position_ids", "attention_mask")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in at least fp32 (bf16 logits lose too much in the softmax)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class Objective(Protocol):
    def count(self, batch: Batch) -> torch.Tensor:
        """How many loss terms this micro-batch contributes (a scalar tensor)."""

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The sum of this micro-batch's loss terms (a scalar tensor with grad)."""


@dataclass
class LanguageModelLoss:
    """Next-token cross-entropy over every label that is not IGNORE_INDEX."""

    label_smoothing: float = 0.0

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        logits = model(batch["input_ids"], **inputs)  # (B, T, V)
        return F.cross_entropy(
            upcast(logits.flatten(0, 1)),
            batch["labels"].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )


# --------------------------------------------------------------------------------------------
# Losses for models that map inputs "x" to predictions compared with targets "y".


@dataclass
class SupervisedLoss:
    """loss(model(x), y) with a named criterion; counts examples (or elements, for multi-label)."""

    name: str = "cross_entropy"
    label_smoothing: float = 0.0
    class_weights: list[float] = field(default_factory=list)
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in SUPERVISED_LOSSES:
            raise LmkilnError(f"unknown loss {self.name!r}; valid: {', '.join(SUPERVISED_LOSSES)}")

    def count(self, batch: Batch) -> torch.Tensor:
        y = batch["y"]
        if self.name == "cross_entropy":
            valid = y != IGNORE_INDEX
            if self.class_weights:  # a weighted mean divides by the weights of the targets
                weights = torch.tensor(self.class_weights, device=y.device)
                return weights[y[valid]].sum()
            return valid.sum()
        return torch.tensor(y.numel(), device=y.device)

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return SUPERVISED_LOSSES[self.name](self, model(batch["x"]), batch["y"])


def _cross_entropy(loss: SupervisedLoss, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    weight = torch.tensor(loss.class_weights, device=logits.device) if loss.class_weights else None
    return F.cross_entropy(
        upcast(logits),
        y,
        weight=weight,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=loss.label_smoothing,
    )


SUPERVISED_LOSSES: dict[str, Callable[[SupervisedLoss, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "bce": lambda loss, logits, y: F.binary_cross_entropy_with_logits(
        upcast(logits), y.to(upcast(logits).dtype), reduction="sum"
    ),
    "mse": lambda loss, pred, y: F.mse_loss(
        upcast(pred).reshape(y.shape), y.to(upcast(pred).dtype), reduction="sum"
    ),
    "huber": lambda loss, pred, y: F.huber_loss(
        upcast(pred).reshape(y.shape), y.to(upcast(pred).dtype), reduction="sum", delta=loss.huber_delta
    ),
}
