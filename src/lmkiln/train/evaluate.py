"""In-loop evaluators: a model's validation metrics over fixed batches, one evaluator per kind.

    lm_evaluator              next-token loss, perplexity (and bits per byte) of a language model:
                              pretraining windows, fine-tuning targets, `lmkiln eval --task perplexity`
    classification_evaluator  loss, accuracy and macro F1 of a classifier over token inputs: a decoder
                              with a head (fine-tuning) and an encoder with a head

Metric keys: what the loop evaluates (metrics.jsonl, `train.monitor`, early stopping, the best
checkpoint) is named `val_<metric>` — val_loss, val_ppl, val_bpb, val_accuracy, val_f1_macro,
val_recall@k, val_mrr, val_mse, … Whole-set figures reported outside the loop (`Trainer.evaluate`,
a test report, `lmkiln eval`) use the bare names (loss, accuracy, …). An evaluator is called by
the loop in eval mode, without gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lmkiln.data.loader import IGNORE_INDEX
from lmkiln.train.metrics import classification_metrics
from lmkiln.train.objectives import Batch, LanguageModelLoss, classifier_logits
from lmkiln.train.runtime import Runtime

Evaluator = Callable[[nn.Module, Runtime], dict[str, float]]
"""Validation metrics of a model (called in eval mode, without grad), keys `val_<metric>`."""


# --------------------------------------------------------------------------------------------
# Language models


def summed_lm_loss(
    model: nn.Module, batches: Sequence[Batch], runtime: Runtime | None = None
) -> tuple[float, float]:
    """(summed next-token loss, number of targets) over `batches`, summed over every process.

    Ranks take turns; all run the same number of forwards (FSDP's forward is a collective): a
    rank without a batch of its own repeats the first one with zero weight.
    """
    device = runtime.device if runtime is not None else next(model.parameters()).device
    rank, world = (runtime.rank, runtime.world_size) if runtime is not None else (0, 1)
    objective = LanguageModelLoss()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for turn in range(-(-len(batches) // world)):
        index = turn * world + rank
        batch = {k: v.to(device) for k, v in batches[min(index, len(batches) - 1)].items()}
        loss, n = objective(model, batch).double(), objective.count(batch).double()
        if index < len(batches):
            loss_sum += loss
            count += n
    if runtime is not None:
        runtime.all_reduce_sum(loss_sum, "validation loss sum")
        runtime.all_reduce_sum(count, "validation target count")
    return loss_sum.item(), count.item()


def lm_metrics(loss_sum: float, count: float, n_bytes: float | None = None, prefix: str = "val_") -> dict:
    """Mean loss, perplexity and (given the text's UTF-8 bytes) bits per byte."""
    loss = loss_sum / max(count, 1)
    names = ("loss", "ppl", "bpb") if prefix else ("loss", "perplexity", "bits_per_byte")
    metrics = {prefix + names[0]: loss, prefix + names[1]: math.exp(min(loss, 50.0))}
    if n_bytes is not None:
        metrics[prefix + names[2]] = loss_sum / math.log(2) / max(n_bytes, 1)
    return metrics


def lm_evaluator(batches: Sequence[Batch], bytes_per_token: float | None = None) -> Evaluator:
    """val_loss and val_ppl (and val_bpb, given the split's UTF-8 bytes per token) over `batches`."""

    def evaluate(model: nn.Module, runtime: Runtime) -> dict[str, float]:
        loss_sum, count = summed_lm_loss(model, batches, runtime)
        n_bytes = None if bytes_per_token is None else count * bytes_per_token
        return lm_metrics(loss_sum, count, n_bytes)

    return evaluate


# --------------------------------------------------------------------------------------------
# Classifiers over token inputs


@torch.no_grad()
def classify(
    model: nn.Module, batches: Sequence[Batch], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted class, cross-entropy, true class) of every real example, in order.

    Batches hold input_ids, labels (IGNORE_INDEX for padding slots) and attention_mask/position_ids.
    """
    predicted, losses, target = [], [], []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        real = batch["labels"] != IGNORE_INDEX
        logits = classifier_logits(model, batch).float()[real]
        labels = batch["labels"][real]
        predicted.append(logits.argmax(dim=-1).cpu())
        losses.append(nn.functional.cross_entropy(logits, labels, reduction="none").cpu())
        target.append(labels.cpu())
    return torch.cat(predicted), torch.cat(losses), torch.cat(target)


def classification_scores(
    predicted: torch.Tensor, losses: torch.Tensor, target: torch.Tensor, n_classes: int, prefix: str = "val_"
) -> dict[str, float]:
    found = classification_metrics(predicted, target, n_classes)
    return {
        f"{prefix}loss": float(losses.mean()),
        f"{prefix}accuracy": found["accuracy"],
        f"{prefix}f1_macro": found["f1_macro"],
    }


def classification_evaluator(batches: Sequence[Batch], n_classes: int) -> Evaluator:
    """val_loss, val_accuracy and val_f1_macro over the whole validation set (every process
    scores all of it: exact, and cheap next to training)."""

    def evaluate(model: nn.Module, runtime: Runtime) -> dict[str, float]:
        return classification_scores(*classify(model, batches, runtime.device), n_classes)

    return evaluate
