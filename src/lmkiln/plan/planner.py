"""`lmkiln plan`: parameters, FLOPs, data, predicted memory and time, and what to change.

The memory prediction is `plan.memory` (autograd's saved tensors, probed); the time prediction
is `plan.speed` (real steps on this machine). The advice uses two results from the scaling-law
literature, stated where they are used: about 20 training tokens per parameter is
compute-optimal (Hoffmann et al. 2022, "Chinchilla"), and repeating data beyond about 4 epochs
adds little over fresh data (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models").
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmkiln.config import Config, FinetuneConfig, ModelConfig, TrainConfig, batch_plan, resolve
from lmkiln.config import parse_duration as config_duration
from lmkiln.data.shards import cache_root
from lmkiln.errors import LmkilnError
from lmkiln.model.kernels import resolve_cpu_matmul
from lmkiln.model.transformer import training_flops_per_token
from lmkiln.plan.measure import RuntimeMemory, runtime_memory, runtime_overhead
from lmkiln.plan.memory import (
    ActivationProbe,
    MemoryEstimate,
    per_strategy,
    probe_activations,
    training_memory,
)
from lmkiln.plan.speed import Calibration, calibrate

TOKENS_PER_PARAMETER = 20
"""Compute-optimal training tokens per parameter (Hoffmann et al. 2022)."""
USEFUL_EPOCHS = 4
"""Passes over the same data that still help about as much as new data (Muennighoff et al. 2023)."""
SHAPE_LADDER: list[tuple[int, int, int]] = [
    (2, 64, 2),
    (2, 128, 4),
    (4, 128, 4),
    (4, 192, 4),
    (4, 256, 4),
    (6, 256, 4),
    (6, 384, 6),
    (8, 512, 8),
    (12, 512, 8),
    (12, 768, 12),
    (16, 1024, 16),
    (24, 1024, 16),
    (16, 2048, 32),
]
"""(n_layer, d_model, n_head) candidates for the recommended size, smallest first."""


@dataclass
class Plan:
    cfg: Config
    """The resolved config the plan is for."""
    model: ModelConfig
    probe: ActivationProbe
    memory: MemoryEstimate
    memory_checkpointed: MemoryEstimate
    strategies: dict[str, int]
    """Peak per process by way of spreading the run over STRATEGY_PROCESSES processes."""
    flops_per_token: int
    micro_batch: int
    accumulation: int
    total_steps: int
    data_tokens: int | None
    calibration: Calibration | None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    advice: list[str] = field(default_factory=list)
    recommended: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.seq_len

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens_per_step / self.calibration.step_seconds if self.calibration else None

    @property
    def passes(self) -> float | None:
        """Passes over the training split that the configured steps make."""
        return self.total_steps * self.tokens_per_step / self.data_tokens if self.data_tokens else None

    def summary(self) -> dict:
        """The figures as plain data (saved as plan.json in a run directory, read by the report)."""
        return {
            "parameters": self.probe.total_parameters,
            "trainable_parameters": self.probe.trainable_parameters,
            "embedding_parameters": self.probe.embedding_parameters,
            "flops_per_token": self.flops_per_token,
            "data_tokens": self.data_tokens,
            "predicted_peak_bytes": self.memory.total,
            "memory_parts": self.memory.parts(),
            "step_seconds": self.calibration.step_seconds if self.calibration else None,
            "tokens_per_s": self.tokens_per_s,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "total_steps": self.total_steps,
            "recommended": self.recommended,
        }


# --------------------------------------------------------------------------------------------
# Units on the command line


_MEMORY_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_memory(text: str) -> int:
    """'24GiB', '512MB', '1.5gb' → bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].lower() not in _MEMORY_UNITS:
        raise LmkilnError(f"--memory {text!r}: give a size such as 24GiB, 512MiB or 8GB")
    return int(float(match[1]) * _MEMORY_UNITS[match[2].lower()])


def parse_duration(text: str) -> float:
    """'10m', '90s', '2h', '45' (seconds) → seconds, for `--time`."""
    return config_duration(text, what="--time")


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}" if unit == "GiB" else f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


# --------------------------------------------------------------------------------------------
# Building the plan


def _model_and_method(cfg: Config) -> tuple[Config, ModelConfig, FinetuneConfig | None]:
    """The model the run trains and its LoRA settings (None = every weight trains)."""
    if cfg.task == "finetune":
        from lmkiln.tasks.finetune import load_base

        base = load_base(cfg.finetune.base, max_context=cfg.finetune.max_length or None)
        seq_len = cfg.finetune.max_length or base.model_cfg.block_size
        cfg = dataclasses.replace(
            cfg, model=base.model_cfg, train=dataclasses.replace(cfg.train, seq_len=seq_len)
        )
    elif cfg.task != "pretrain":
        raise LmkilnError(
            f"lmkiln plan covers task=pretrain, task=finetune and task=supervised, not task={cfg.task}"
        )
    lora = cfg.finetune if cfg.finetune.method == "lora" else None
    return cfg, cfg.model, lora


def plan_training(
    cfg: Config,
    *,
    data_tokens: int | None = None,
    vocab_size: int | None = None,
    memory_limit: int | None = None,
    time_budget: float | None = None,
    calibrate_steps: int = 3,
    measure_overhead: bool = True,
) -> Plan:
    """Predict memory and time of `cfg` on this machine and say what to change.

    measure_overhead: measure the runtime's own memory on this machine (once, then cached).
    data_tokens: tokens of the prepared training split (None skips the data advice);
    vocab_size: the tokenizer's, when model.vocab_size is 0.
    """
    cfg, model_cfg, lora = _model_and_method(cfg)
    if not model_cfg.vocab_size:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size or 4096)
    run = resolve(cfg, model=model_cfg)
    cfg, t = run.cfg, run.cfg.train
    micro, accumulation = run.batch.micro_batch_size, run.batch.accumulation
    probe = probe_activations(model_cfg, t.seq_len, lora)
    machine = runtime_memory(t.cpu_matmul, cache_root(cfg.data)) if measure_overhead else None
    both = [
        training_memory(model_cfg, probe, micro, t.seq_len, cfg.optim, ckpt, machine, accumulation)
        for ckpt in (False, True)
    ]
    memory = both[t.activation_checkpointing]
    plan = Plan(
        cfg=cfg,
        model=model_cfg,
        probe=probe,
        memory=memory,
        memory_checkpointed=both[1],
        strategies=strategy_peaks(
            t,
            lambda rank_micro, rank_accumulation: training_memory(
                model_cfg,
                probe,
                rank_micro,
                t.seq_len,
                cfg.optim,
                t.activation_checkpointing,
                machine,
                rank_accumulation,
            ),
            model_cfg.n_layer,
            cache_root(cfg.data) if measure_overhead else None,
        ),
        flops_per_token=training_flops_per_token(model_cfg, t.seq_len),
        micro_batch=micro,
        accumulation=accumulation,
        total_steps=run.total_steps,
        data_tokens=data_tokens,
        calibration=None,
    )
    if memory_limit is not None:
        _fit_memory(plan, memory_limit, lora, machine)
    if calibrate_steps > 0:
        plan.calibration = calibrate(
            cfg, model_cfg, plan.micro_batch, plan.accumulation, calibrate_steps, lora
        )
        _predict_time(plan)
    _advise_size(plan, time_budget)
    return plan


STRATEGY_PROCESSES = 2
"""The process count the per-strategy figures are given for."""


def strategy_peaks(
    t: TrainConfig,
    estimate_at: Callable[[int, int], MemoryEstimate],
    blocks: int,
    cache_dir: Path | None,
    kind: str = "transformer",
) -> dict[str, int]:
    """Per-process peaks at STRATEGY_PROCESSES processes, each with its share of the batch
    (`estimate_at(micro_batch, accumulation)`; none when the batch does not split).

    FSDP2's sharded (DTensor) weights skip oneDNN's GEMM (`lmkiln.model.kernels`): its processes
    hold torch's default GEMM's runtime, measured apart when `cache_dir` is given.
    """
    try:
        share = batch_plan(t, STRATEGY_PROCESSES)
    except LmkilnError:
        return {}
    estimate = estimate_at(share.micro_batch_size, share.accumulation)
    onednn = resolve_cpu_matmul(t.cpu_matmul)  # else FSDP2 runs the same GEMM: nothing to measure apart
    sharded = runtime_overhead("default", cache_dir, kind) if cache_dir and onednn else None
    return per_strategy(estimate, blocks, STRATEGY_PROCESSES, sharded)


def _predict_time(plan: Plan) -> None:
    t = plan.cfg.train
    plan.train_seconds = plan.total_steps * plan.calibration.step_seconds
    evaluations = plan.total_steps // t.eval_every + 2  # the untrained model and the end too
    eval_tokens = t.eval_tokens
    if plan.data_tokens:  # the validation split is about val_fraction / (1 - val_fraction) of train
        share = plan.cfg.data.val_fraction / max(1 - plan.cfg.data.val_fraction, 1e-9)
        eval_tokens = min(eval_tokens, int(plan.data_tokens * share))
    plan.eval_seconds = evaluations * eval_tokens * plan.calibration.eval_seconds_per_unit


def _fit_memory(plan: Plan, limit: int, lora: FinetuneConfig | None, machine: RuntimeMemory | None) -> None:
    """Choose the largest micro-batch (then activation checkpointing) whose peak fits `limit`."""
    t, m = plan.cfg.train, plan.model
    batch = t.batch_size
    for checkpointing in (t.activation_checkpointing, True):
        for micro in sorted((d for d in range(1, batch + 1) if batch % d == 0), reverse=True):
            estimate = training_memory(
                m, plan.probe, micro, t.seq_len, plan.cfg.optim, checkpointing, machine, batch // micro
            )
            if estimate.total <= limit:
                if (micro, checkpointing) != (plan.micro_batch, t.activation_checkpointing):
                    plan.advice.append(
                        f"to fit {format_bytes(limit)}: train.micro_batch_size={micro} "
                        f"(accumulation {batch // micro})"
                        + (" train.activation_checkpointing=true" if checkpointing else "")
                        + f" → predicted peak {format_bytes(estimate.total)}"
                    )
                plan.memory, plan.micro_batch, plan.accumulation = estimate, micro, batch // micro
                plan.cfg = dataclasses.replace(
                    plan.cfg,
                    train=dataclasses.replace(
                        t, micro_batch_size=micro, activation_checkpointing=checkpointing
                    ),
                )
                return
    smallest = training_memory(m, plan.probe, 1, t.seq_len, plan.cfg.optim, True, machine, batch)
    hint = "" if lora else ", or train LoRA adapters (task=finetune finetune.method=lora)"
    raise LmkilnError(
        f"--memory {format_bytes(limit)} is below the smallest configuration of this model "
        f"(micro-batch 1 with activation checkpointing needs {format_bytes(smallest.total)}); raise "
        f"--memory, or lower model.n_layer/model.d_model or train.seq_len{hint}"
    )


def _shape_parameters(n_layer: int, d_model: int, n_head: int, like: ModelConfig) -> tuple[ModelConfig, int]:
    from lmkiln.model.transformer import matmul_parameters

    shape = dataclasses.replace(like, n_layer=n_layer, d_model=d_model, n_head=n_head, n_kv_head=0, d_ff=0)
    embedding = like.vocab_size * d_model * (1 if like.tie_embeddings else 2)
    return shape, matmul_parameters(shape) - like.vocab_size * d_model + embedding


def _advise_size(plan: Plan, time_budget: float | None) -> None:
    """Compute-optimal size for the time (and data), and a warning about repeated data."""
    if plan.passes is not None and plan.passes > USEFUL_EPOCHS:
        plan.advice.append(
            f"the run passes over the training data {plan.passes:.1f} times (more than {USEFUL_EPOCHS} "
            f"repeats add little: Muennighoff et al. 2023); it will mostly memorize — use more data, "
            f"fewer steps or a smaller model"
        )
    if plan.calibration is None:
        return
    seconds = time_budget or plan.train_seconds
    if time_budget is not None and time_budget < plan.calibration.step_seconds * 10:
        raise LmkilnError(
            f"--time {time_budget:g}s fits no model: ten steps of the smallest useful run take longer "
            f"here (one step of this config: {plan.calibration.step_seconds:.2f} s); raise --time"
        )
    # the FLOP rate achieved by the configured model, assumed for neighbouring sizes
    flop_rate = plan.flops_per_token * plan.tokens_per_s
    compute = flop_rate * seconds
    optimal = math.sqrt(compute / (6 * TOKENS_PER_PARAMETER))
    limit_by = "time"
    if plan.data_tokens:
        by_data = plan.data_tokens * USEFUL_EPOCHS / TOKENS_PER_PARAMETER
        if by_data < optimal:
            optimal, limit_by = by_data, "data"
    candidates = [_shape_parameters(n, d, h, plan.model) for n, d, h in SHAPE_LADDER]
    fitting = [c for c in candidates if c[1] <= optimal] or candidates[:1]
    shape, parameters = fitting[-1]
    tokens = min(parameters * TOKENS_PER_PARAMETER, compute / max(6 * parameters, 1))
    if plan.data_tokens:
        tokens = min(tokens, plan.data_tokens * USEFUL_EPOCHS)
    steps = max(int(tokens // plan.tokens_per_step), 1)
    plan.recommended = {
        "n_layer": shape.n_layer,
        "d_model": shape.d_model,
        "n_head": shape.n_head,
        "parameters": parameters,
        "max_steps": steps,
    }
    plan.advice.append(
        f"compute-optimal size for {'--time' if time_budget else 'this run'} "
        f"({seconds:.0f} s at {flop_rate / 1e9:.2f} GFLOP/s) is ~{optimal / 1e6:.2f}M parameters "
        f"(limited by {limit_by}; {TOKENS_PER_PARAMETER} tokens per parameter, Hoffmann et al. 2022): "
        f"model.n_layer={shape.n_layer} model.d_model={shape.d_model} model.n_head={shape.n_head} "
        f"({parameters / 1e6:.2f}M) train.max_steps={steps}"
    )
    if time_budget is not None and plan.train_seconds and plan.train_seconds > time_budget:
        fits = int(time_budget / plan.calibration.step_seconds)
        plan.advice.append(
            f"the configured run needs {plan.train_seconds:.0f} s; train.max_steps={fits} fits --time"
        )
