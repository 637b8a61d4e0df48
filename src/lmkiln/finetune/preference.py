"""DPO's reference model without a second copy of the weights.

- precomputed: before the first step the untrained model scores every pair once; the numbers
  travel in the batches (`ref_logps`). Resuming recomputes them from the same base, identically.
- adapters_disabled (LoRA): the trained model with its adapters switched off IS the base, so
  each step scores the batch a second time under peft's `disable_adapter()`, without gradients.

ORPO has no reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmkiln.config import FinetuneConfig
from lmkiln.data.preference import PreferencePair, preference_collate
from lmkiln.errors import LmkilnError
from lmkiln.train.objectives import Batch
from lmkiln.train.preference import PreferenceLoss, Reference, sequence_logps


def reference_kind(cfg: FinetuneConfig) -> str:
    """'none' (ORPO), 'precomputed' or 'adapters_disabled'."""
    if cfg.objective != "dpo":
        return "none"
    if cfg.reference == "auto":
        return "adapters_disabled" if cfg.method == "lora" else "precomputed"
    if cfg.reference == "adapters_disabled" and cfg.method != "lora":
        raise LmkilnError(
            f"finetune.reference=adapters_disabled needs method=lora (method is {cfg.method}); "
            f"use reference=precomputed"
        )
    return cfg.reference


def adapters_disabled(peft_model: object) -> Reference:
    """Reference log-probs from the same model with its LoRA adapters switched off."""

    def reference(model: nn.Module, batch: Batch) -> torch.Tensor:
        with torch.no_grad(), peft_model.disable_adapter():
            return sequence_logps(model, batch)[0]

    return reference


@torch.no_grad()
def precompute_reference(
    model: nn.Module, pairs: Sequence[PreferencePair], micro: int, pad_id: int, device: torch.device
) -> torch.Tensor:
    """(N, 2) summed log-probs of every pair's chosen and rejected reply under `model` as it is now."""
    was_training = model.training
    model.eval()
    collate = preference_collate(pairs, pad_id)
    found = []
    for start in range(0, len(pairs), micro):
        batch = collate(list(range(start, min(start + micro, len(pairs)))))
        batch = {k: v.to(device) for k, v in batch.items()}
        sums = sequence_logps(model, batch)[0].float().cpu()  # (2b,)
        found.append(torch.stack(sums.chunk(2), dim=1))  # (b, 2)
    model.train(was_training)
    return torch.cat(found)


def preference_loss(cfg: FinetuneConfig, peft_model: object | None) -> PreferenceLoss:
    """The objective of a preference run; the LoRA reference is computed in the step."""
    if cfg.beta <= 0 or not 0 <= cfg.label_smoothing < 0.5:
        raise LmkilnError(
            f"finetune.beta must be > 0 (got {cfg.beta}) and finetune.label_smoothing in [0, 0.5) "
            f"(got {cfg.label_smoothing})"
        )
    reference = adapters_disabled(peft_model) if reference_kind(cfg) == "adapters_disabled" else None
    return PreferenceLoss(cfg.objective, cfg.beta, cfg.label_smoothing, reference)
