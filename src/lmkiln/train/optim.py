"""Optimizers, parameter groups and learning-rate schedules, chosen by name.

Weight decay applies to matrices only: norms, biases and embeddings sit in a no-decay group (the
GPT-3/Llama convention). Schedules are pure functions of the step, so a resumed run needs nothing
but the step to continue the exact curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lmkiln.config import OptimConfig, ScheduleConfig
from lmkiln.errors import LmkilnError


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and everything else (norms, biases, embeddings)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim >= 2 and id(param) not in embedding_params:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def _kernel_flags(cfg: OptimConfig, params: list[torch.Tensor], supports_fused: bool) -> dict:
    """fused on devices that have it, foreach otherwise (both give the same numbers as a loop).

    On CPU, foreach is a loop of per-tensor kernels; the fused AdamW step measured 0.76 vs 2.0 ms
    (0.8M parameters) and 6.2 vs 31 ms (10.7M) on the 2-core development machine.
    """
    if cfg.impl == "loop":
        return {"foreach": False}
    if cfg.impl == "foreach":
        return {"foreach": True}
    devices = {p.device.type for g in params for p in g["params"]}
    fused_ok = supports_fused and devices <= {"cuda", "cpu", "mps"}
    if cfg.impl == "fused" or (cfg.impl == "auto" and fused_ok):
        if not fused_ok:
            raise LmkilnError(f"optim.impl=fused is not available for {cfg.name} on {sorted(devices)}")
        return {"fused": True}
    return {"foreach": True}


OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = {
    "adamw": lambda groups, c: torch.optim.AdamW(
        groups, lr=c.lr, betas=c.betas, eps=c.eps, **_kernel_flags(c, groups, True)
    ),
    "adam": lambda groups, c: torch.optim.Adam(
        groups, lr=c.lr, betas=c.betas, eps=c.eps, **_kernel_flags(c, groups, True)
    ),
    "sgd": lambda groups, c: torch.optim.SGD(
        groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, **_kernel_flags(c, groups, True)
    ),
    "rmsprop": lambda groups, c: torch.optim.RMSprop(
        groups, lr=c.lr, momentum=c.momentum, eps=c.eps, **_kernel_flags(c, groups, False)
    ),
    "adagrad": lambda groups, c: torch.optim.Adagrad(
        groups, lr=c.lr, eps=c.eps, **_kernel_flags(c, groups, True)
    ),
}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name not in OPTIMIZERS:
        raise LmkilnError(f"unknown optimizer {cfg.name!r}; valid: {', '.join(OPTIMIZERS)}")
    if cfg.name == "sgd" and cfg.nesterov and cfg.momentum <= 0:
        raise LmkilnError("optim.nesterov needs optim.momentum > 0")
    groups = parameter_groups(model, cfg.weight_decay)
    if not groups:
        raise LmkilnError("the model has no trainable parameters")
    optimizer = OPTIMIZERS[cfg.name](groups, cfg)
    for group in optimizer.param_groups:
        group["peak_lr"] = cfg.lr  # schedules scale from here; kept in the optimizer state
    return optimizer


# --------------------------------------------------------------------------------------------
# Schedules: multiplier of the peak learning rate at a step (0-based), for max_steps in total.


def _warmup(step: int, warmup: int) -> float | None:
    return (step + 1) / warmup if step < warmup else None


def _cosine(step: int, total: int, cfg: ScheduleConfig) -> float:
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _linear(step: int, total: int, cfg: ScheduleConfig) -> float:
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return 1 - (1 - cfg.min_lr_ratio) * progress


def _wsd(step: int, total: int, cfg: ScheduleConfig) -> float:
    decay_steps = max(1, int(total * cfg.decay_fraction))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    return 1 - (1 - cfg.min_lr_ratio) * min(1.0, (step - decay_start + 1) / decay_steps)


SCHEDULES: dict[str, Callable[[int, int, ScheduleConfig], float]] = {
    "cosine": _cosine,
    "linear": _linear,
    "constant": lambda step, total, cfg: 1.0,
    "wsd": _wsd,
}


def lr_multiplier(step: int, total: int, cfg: ScheduleConfig) -> float:
    if cfg.name not in SCHEDULES:
        raise LmkilnError(f"unknown schedule {cfg.name!r}; valid: {', '.join(SCHEDULES)}")
    warm = _warmup(step, cfg.warmup_steps)
    return warm if warm is not None else SCHEDULES[cfg.name](step, total, cfg)


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, total: int, cfg: ScheduleConfig) -> float:
    """Set every group's lr for `step`; returns the multiplier applied to the peak."""
    multiplier = lr_multiplier(step, total, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * multiplier
    return multiplier
