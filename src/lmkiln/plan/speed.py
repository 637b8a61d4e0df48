"""Step time measured on this machine: a few real training steps of the configured model.

FLOP formulas are off by large factors on small models, where per-operator overhead, not
arithmetic, sets the pace (a 0.9M-parameter model reaches a few percent of the CPU's matmul
rate). So the plan times the real thing: the same model, optimizer, micro-batch and
accumulation, through the loop's own `train_step`, on random tokens, after one warm-up step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from lmkiln.config import Config, FinetuneConfig, ModelConfig
from lmkiln.tasks.pretrain import build_transformer
from lmkiln.train.objectives import LanguageModelLoss
from lmkiln.train.optim import build_optimizer
from lmkiln.train.runtime import Runtime
from lmkiln.train.step import train_step


@dataclass(frozen=True)
class Calibration:
    step_seconds: float
    """Seconds of one optimizer step (all micro-batches, clipping, optimizer): the fastest timed
    step, the one least disturbed by other work on the machine."""
    eval_seconds_per_token: float
    """Forward-only seconds per validation token."""
    steps_timed: int
    device: str


def build_model(
    model_cfg: ModelConfig, cfg: Config, device: torch.device, lora: FinetuneConfig | None
) -> nn.Module:
    """The model a run of `cfg` trains (LoRA adapters injected when `lora` is given)."""
    t = cfg.train
    model = build_transformer(model_cfg, device, t.seed, t.activation_checkpointing, t.cpu_matmul)
    if lora is not None:
        from lmkiln.finetune.methods import apply_method

        apply_method(model, model, lora, [])
    return model


def synthetic_batch(model_cfg: ModelConfig, micro_batch: int, seq_len: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len + 1), generator=generator)
    return {"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}


def calibrate(
    cfg: Config,
    model_cfg: ModelConfig,
    micro_batch: int,
    accumulation: int,
    steps: int = 3,
    lora: FinetuneConfig | None = None,
) -> Calibration:
    """Time `steps` optimizer steps (after one warm-up) and a forward pass on this machine."""
    runtime = Runtime.start(cfg.train, cfg.dist)
    model = build_model(model_cfg, cfg, runtime.device, lora).train()
    optimizer = build_optimizer(model, cfg.optim)
    batch = synthetic_batch(model_cfg, micro_batch, cfg.train.seq_len, runtime.device)
    objective = LanguageModelLoss()
    durations = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        result = train_step(model, objective, [batch] * accumulation, runtime, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.loss.item()  # waits for the device
        durations.append(time.perf_counter() - started)
    model.eval()
    forward = []
    with torch.no_grad(), runtime.autocast():
        for _ in range(2):
            started = time.perf_counter()
            objective(model, batch).item()
            forward.append(time.perf_counter() - started)
    return Calibration(
        step_seconds=min(durations[1:]),
        eval_seconds_per_token=min(forward) / batch["input_ids"].numel(),
        steps_timed=steps,
        device=str(runtime.device),
    )
