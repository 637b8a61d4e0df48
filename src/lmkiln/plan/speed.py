"""Step time measured on this machine: a few real training steps of the configured model.

FLOP formulas are off by large factors on small models, where per-operator overhead, not
arithmetic, sets the pace (a 0.9M-parameter model reaches a few percent of the CPU's matmul
rate). So the plan times the real thing: the same model, optimizer, micro-batch and
accumulation, through the loop's own `train_step`, on random tokens (random rows for an MLP),
after one warm-up step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from lmkiln.config import Config, FinetuneConfig, ModelConfig
from lmkiln.tasks.pretrain import build_transformer
from lmkiln.train.objectives import LanguageModelLoss, Objective, SupervisedLoss
from lmkiln.train.optim import build_optimizer
from lmkiln.train.runtime import Runtime
from lmkiln.train.step import train_step


@dataclass(frozen=True)
class Calibration:
    step_seconds: float
    """Seconds of one optimizer step (all micro-batches, clipping, optimizer): the fastest timed
    step, the one least disturbed by other work on the machine."""
    eval_seconds_per_unit: float
    """Forward-only seconds per validation token (per row, for an MLP)."""
    steps_timed: int
    device: str


@dataclass
class Workload:
    """One training step's work: the model a run of the config trains, its objective and a
    synthetic micro-batch of the run's shape (random tokens, or random rows for an MLP)."""

    model: nn.Module
    objective: Objective
    batch: dict[str, torch.Tensor]


def build_workload(
    cfg: Config,
    model_cfg: ModelConfig,
    micro_batch: int,
    device: torch.device,
    lora: FinetuneConfig | None = None,
) -> Workload:
    """The workload of `cfg`: a transformer (LoRA adapters injected when `lora` is given) or, for
    task=supervised, the MLP of its `mlp` section (mlp.inputs and mlp.outputs set)."""
    t = cfg.train
    generator = torch.Generator().manual_seed(0)
    if cfg.task == "supervised":
        from lmkiln.model.mlp import build_mlp

        inputs, outputs = cfg.mlp.inputs, cfg.mlp.outputs
        torch.manual_seed(t.seed)
        model = build_mlp(cfg.mlp, inputs, outputs).to(device)
        objective = SupervisedLoss(**vars(cfg.loss))
        x = torch.randn(micro_batch, inputs, generator=generator)
        if objective.kind == "classification":
            y = torch.randint(0, outputs, (micro_batch,), generator=generator)
        elif objective.kind == "multilabel":
            y = torch.randint(0, 2, (micro_batch, outputs), generator=generator).float()
        else:
            y = torch.randn(micro_batch, outputs, generator=generator)
        return Workload(model, objective, {"x": x.to(device), "y": y.to(device)})
    model = build_transformer(model_cfg, device, t.seed, t.activation_checkpointing, t.cpu_matmul)
    if lora is not None:
        from lmkiln.finetune.methods import apply_method

        apply_method(model, model, lora, [])
    tokens = torch.randint(0, model_cfg.vocab_size, (micro_batch, t.seq_len + 1), generator=generator)
    batch = {"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}
    return Workload(model, LanguageModelLoss(), batch)


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
    work = build_workload(cfg, model_cfg, micro_batch, runtime.device, lora)
    model, objective, batch = work.model.train(), work.objective, work.batch
    optimizer = build_optimizer(model, cfg.optim)
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
    units_per_row = 1 if cfg.task == "supervised" else cfg.train.seq_len
    return Calibration(
        step_seconds=min(durations[1:]),
        eval_seconds_per_unit=min(forward) / (micro_batch * units_per_row),
        steps_timed=steps,
        device=str(runtime.device),
    )
