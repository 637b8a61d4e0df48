"""The train step: forward/backward over a step's micro-batches, normalised by the whole step's
targets, then clipping. Nearly pure: it returns numbers and leaves gradients in `.grad`.

Every micro-batch's *sum* of loss terms is divided by the number of terms in the whole optimizer
step (all micro-batches, all ranks), counted before any forward pass, so k micro-batches of b are
exactly one batch of k·b, also when padding leaves rows with different numbers of targets.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from lmkiln.train.objectives import Batch, Objective
from lmkiln.train.runtime import Runtime


@dataclass
class StepResult:
    loss: torch.Tensor
    """Mean loss over every target of the step (on the device; no host sync)."""
    grad_norm: torch.Tensor
    """Global gradient norm before clipping."""
    targets: torch.Tensor


def _sync_gradients(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP: skip the all-reduce on all but the last micro-batch; FSDP2: the same via its flag."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(
    model: nn.Module, objective: Objective, micro_batches: list[Batch], runtime: Runtime, grad_clip: float
) -> StepResult:
    """Forward/backward over the micro-batches, normalised by the targets of the whole step.

    Gradients are left in `.grad` (clipped); the caller decides whether to apply them.
    """
    targets = torch.stack([objective.count(b) for b in micro_batches]).sum().to(runtime.device, torch.float32)
    targets = runtime.all_reduce_sum(targets, "step target count")
    # DDP averages gradients over ranks, so each rank's share is scaled up by world_size.
    scale = runtime.world_size / targets.clamp(min=1)
    loss_sum = torch.zeros((), device=runtime.device)
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with _sync_gradients(model, last), runtime.autocast():
            micro_loss = objective(model, batch)
        (micro_loss * scale).backward()
        loss_sum += micro_loss.detach().float()
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    return StepResult(loss=loss_sum * scale / runtime.world_size, grad_norm=grad_norm, targets=targets)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }
