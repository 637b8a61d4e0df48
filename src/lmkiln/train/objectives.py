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
from lmkiln.model.loss import upcast

Batch = dict[str, torch.Tensor]
MODEL_INPUTS = ("doc_ids", "position_ids", "attention_mask")


class Objective(Protocol):
    def count(self, batch: Batch) -> torch.Tensor:
        """How many loss terms this micro-batch contributes (a scalar tensor)."""

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The sum of this micro-batch's loss terms (a scalar tensor with grad)."""


@dataclass
class LanguageModelLoss:
    """Next-token cross-entropy over every label that is not IGNORE_INDEX.

    The model computes it: `model(input_ids, targets=labels, label_smoothing=..., **inputs)` returns
    the summed loss, as lmkiln's Transformer does (and nanoGPT's GPT).
    """

    label_smoothing: float = 0.0

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        # lmkiln's Transformer computes the loss itself (see `lmkiln.model.loss`: large
        # vocabularies never hold every logit); through its forward, so DDP/FSDP/compile wrappers
        # see an ordinary call.
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        return model(
            batch["input_ids"], targets=batch["labels"], label_smoothing=self.label_smoothing, **inputs
        )


# --------------------------------------------------------------------------------------------
# Losses for models that map inputs "x" to predictions compared with targets "y".


@dataclass
class SupervisedLoss:
    """loss(model(x), y) with a named criterion; counts examples (or elements, for multi-label).

    An optional per-example "weight" (B,) scales each example's terms in both the sum and the
    count; weight 0 marks a padding example (an empty slot of the last batch of an epoch) that
    must not change the loss or the gradient. Cross-entropy labels equal to IGNORE_INDEX also
    count for nothing.
    """

    name: str = "cross_entropy"
    label_smoothing: float = 0.0
    class_weights: list[float] = field(default_factory=list)
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in SUPERVISED_LOSSES:
            raise LmkilnError(f"unknown loss {self.name!r}; valid: {', '.join(SUPERVISED_LOSSES)}")

    def count(self, batch: Batch) -> torch.Tensor:
        y, weight = batch["y"], batch.get("weight")
        if self.name == "cross_entropy":
            terms = (y != IGNORE_INDEX).to(torch.float32)  # (B,)
            if self.class_weights:  # a weighted mean divides by the weights of the targets
                classes = torch.tensor(self.class_weights, device=y.device)
                terms = terms * classes[y.clamp(min=0)]
            if weight is None:
                return terms.sum() if self.class_weights else (y != IGNORE_INDEX).sum()
            return (terms * weight).sum()
        if weight is None:
            return torch.tensor(y.numel(), device=y.device)
        return weight.sum() * (y[0].numel() if len(y) else 0)  # terms per example × examples

    @property
    def kind(self) -> str:
        """The kind of target this loss learns: classification, multilabel or regression."""
        return LOSS_KINDS[self.name]

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.total(model(batch["x"]), batch)

    def total(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The (weighted) sum of the loss terms of already computed model outputs."""
        terms = SUPERVISED_LOSSES[self.name](self, outputs, batch["y"])  # (B,) or (B, ...)
        weight = batch.get("weight")
        if weight is None:
            return terms.sum()
        return (terms.reshape(len(weight), -1) * weight.to(terms.dtype)[:, None]).sum()


def _cross_entropy(loss: SupervisedLoss, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    weight = torch.tensor(loss.class_weights, device=logits.device) if loss.class_weights else None
    if weight is not None and len(weight) != logits.shape[-1]:
        raise LmkilnError(
            f"loss.class_weights has {len(weight)} values but the model has {logits.shape[-1]} outputs"
        )
    return F.cross_entropy(
        upcast(logits),
        y,
        weight=weight,
        ignore_index=IGNORE_INDEX,
        reduction="none",
        label_smoothing=loss.label_smoothing,
    )


def _as_target(prediction: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 prediction shaped like y (a (B, 1) output meets (B,) targets)."""
    prediction = upcast(prediction)
    return prediction.reshape(y.shape), y.to(prediction.dtype)


# Each returns the unreduced loss terms: (B,) for cross-entropy, y's shape for the others.
SUPERVISED_LOSSES: dict[str, Callable[[SupervisedLoss, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "bce": lambda loss, logits, y: F.binary_cross_entropy_with_logits(
        *_as_target(logits, y), reduction="none"
    ),
    "mse": lambda loss, pred, y: F.mse_loss(*_as_target(pred, y), reduction="none"),
    "huber": lambda loss, pred, y: F.huber_loss(
        *_as_target(pred, y), reduction="none", delta=loss.huber_delta
    ),
}

LOSS_KINDS = {
    "cross_entropy": "classification",
    "bce": "multilabel",
    "mse": "regression",
    "huber": "regression",
}


@dataclass
class ClassificationLoss:
    """A `SupervisedLoss` criterion on a classifier's logits for token inputs: the one
    classification objective of a decoder with a head (fine-tuning) and of an encoder.

    Batch: input_ids (B, T), labels (B,) class ids, IGNORE_INDEX for the loop's padding slots,
    and the model inputs present among attention_mask/position_ids, passed as keywords.
    """

    criterion: SupervisedLoss = field(default_factory=SupervisedLoss)

    def count(self, batch: Batch) -> torch.Tensor:
        return self.criterion.count({"y": batch["labels"]})

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.criterion.total(classifier_logits(model, batch), {"y": batch["labels"]})


def classifier_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B, n_classes) logits of a classifier called as model(input_ids, attention_mask=, position_ids=)."""
    inputs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    return model(batch["input_ids"], **inputs)


def loss_from_criterion(criterion: nn.Module) -> SupervisedLoss:
    """The SupervisedLoss equal to a PyTorch criterion (so `nn.CrossEntropyLoss()` can be passed as is).

    The loop needs a sum and a count of loss terms to make gradient accumulation and padded last
    batches exact, so the criterion's settings are carried over rather than the module called.
    """
    reduction = getattr(criterion, "reduction", "mean")
    if reduction != "mean":
        raise LmkilnError(f"{type(criterion).__name__}(reduction={reduction!r}): only the mean is supported")
    if isinstance(criterion, nn.CrossEntropyLoss):
        if criterion.ignore_index != IGNORE_INDEX:
            raise LmkilnError(f"CrossEntropyLoss(ignore_index=...) must keep the default {IGNORE_INDEX}")
        weights = criterion.weight.tolist() if criterion.weight is not None else []
        return SupervisedLoss("cross_entropy", criterion.label_smoothing, weights)
    if isinstance(criterion, nn.BCEWithLogitsLoss):
        if criterion.weight is not None or criterion.pos_weight is not None:
            raise LmkilnError("BCEWithLogitsLoss with weight/pos_weight is not supported; pass loss='bce'")
        return SupervisedLoss("bce")
    if isinstance(criterion, nn.MSELoss):
        return SupervisedLoss("mse")
    if isinstance(criterion, nn.HuberLoss):
        return SupervisedLoss("huber", huber_delta=criterion.delta)
    raise LmkilnError(
        f"unsupported loss module {type(criterion).__name__}; pass CrossEntropyLoss, BCEWithLogitsLoss, "
        f"MSELoss, HuberLoss, or a name: {', '.join(SUPERVISED_LOSSES)}"
    )
