"""`lmkiln plan` for task=supervised: an MLP (or softmax(Wx + b)) fitted to a table.

The same method as for transformers, on the real model: weights, gradients and optimizer state
from the parameter count; the activations are the tensors autograd saves for one micro-batch,
counted with `saved_tensors_hooks`; while backward runs, the gradients of the widest layer's
input and output are alive too; the runtime's own memory is measured once on this machine
with a tiny MLP. Time comes from a few real steps (`plan.speed`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lmkiln.config import Config, resolve
from lmkiln.data.shards import cache_root
from lmkiln.errors import LmkilnError
from lmkiln.model.transformer import count_parameters
from lmkiln.plan.measure import RuntimeMemory, runtime_memory
from lmkiln.plan.memory import (
    FP32,
    MemoryEstimate,
    mapped_bytes,
    optimizer_states,
    saved_tensor_bytes,
)
from lmkiln.plan.planner import strategy_peaks
from lmkiln.plan.speed import Calibration, build_workload, calibrate


@dataclass
class TablePlan:
    cfg: Config
    """The resolved config, mlp.inputs and mlp.outputs filled in."""
    parameters: int
    linear_layers: int
    memory: MemoryEstimate
    strategies: dict[str, int]
    """Peak per process by way of spreading the run over STRATEGY_PROCESSES processes."""
    flops_per_example: int
    micro_batch: int
    accumulation: int
    total_steps: int
    rows: dict[str, int] | None
    """Rows per split (train, val, test) of the table; None when planned without it."""
    calibration: Calibration | None
    train_seconds: float | None = None
    eval_seconds: float | None = None

    @property
    def examples_per_s(self) -> float | None:
        return self.cfg.train.batch_size / self.calibration.step_seconds if self.calibration else None

    def summary(self) -> dict:
        """The figures as plain data (saved as plan.json in a run directory, read by the report)."""
        return {
            "parameters": self.parameters,
            "trainable_parameters": self.parameters,
            "flops_per_example": self.flops_per_example,
            "rows": self.rows,
            "predicted_peak_bytes": self.memory.total,
            "memory_parts": self.memory.parts(),
            "step_seconds": self.calibration.step_seconds if self.calibration else None,
            "examples_per_s": self.examples_per_s,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "total_steps": self.total_steps,
        }


def plan_table(
    cfg: Config,
    *,
    rows: dict[str, int] | None = None,
    calibrate_steps: int = 3,
    measure_overhead: bool = True,
) -> TablePlan:
    """Predict memory and time of a task=supervised config (mlp.inputs and mlp.outputs set)."""
    if not (cfg.mlp.inputs and cfg.mlp.outputs):
        raise LmkilnError(
            "planning task=supervised without its table needs mlp.inputs and mlp.outputs "
            "(e.g. mlp.inputs=784 mlp.outputs=10)"
        )
    run = resolve(cfg, examples=rows["train"] if rows else None)
    cfg = run.cfg
    micro, accumulation = run.batch.micro_batch_size, run.batch.accumulation
    # the probe runs the real model once on the CPU: an MLP that is planned fits there
    work = build_workload(cfg, cfg.model, micro, torch.device("cpu"))
    saved = saved_tensor_bytes(work.model, lambda: work.objective(work.model, work.batch))
    parameters = count_parameters(work.model)
    linears = [m for m in work.model.modules() if isinstance(m, torch.nn.Linear)]
    widest = max(max(m.in_features, m.out_features) for m in linears)
    mapped = mapped_bytes([(p.numel(), 1) for p in work.model.parameters()])
    machine = runtime_memory(cfg.train.cpu_matmul, cache_root(cfg.data), "mlp") if measure_overhead else None

    def estimate_at(rows: int, accumulation: int) -> MemoryEstimate:
        """Activations and the backward's gradients scale with the rows a process takes."""
        activations = rows * sum(saved) // micro
        return _table_memory(parameters, mapped, cfg, activations, rows * widest, accumulation, machine)

    memory = estimate_at(micro, accumulation)
    plan = TablePlan(
        cfg=cfg,
        parameters=parameters,
        linear_layers=len(linears),
        memory=memory,
        strategies=strategy_peaks(
            cfg.train, estimate_at, len(linears), cache_root(cfg.data) if measure_overhead else None, "mlp"
        ),
        # forward one multiply-add per weight, backward two (input and weight gradients)
        flops_per_example=6 * sum(m.weight.numel() for m in linears),
        micro_batch=micro,
        accumulation=accumulation,
        total_steps=run.total_steps,
        rows=rows,
        calibration=None,
    )
    if calibrate_steps > 0:
        plan.calibration = calibrate(cfg, cfg.model, micro, accumulation, calibrate_steps)
        plan.train_seconds = plan.total_steps * plan.calibration.step_seconds
        if rows and rows.get("val"):
            t = cfg.train
            if t.max_epochs and t.eval_every_epochs:
                evaluations = t.max_epochs // t.eval_every_epochs + 1
            else:
                evaluations = plan.total_steps // max(t.eval_every, 1) + 2
            plan.eval_seconds = evaluations * rows["val"] * plan.calibration.eval_seconds_per_unit
    return plan


def _table_memory(
    parameters: int,
    mapped_gradients: int,
    cfg: Config,
    activations: int,
    widest_row: int,
    accumulation: int,
    machine: RuntimeMemory | None,
) -> MemoryEstimate:
    """An MLP's parts: `activations` saved for its micro-batch, `widest_row` = rows × widest layer."""
    machine = machine or RuntimeMemory(0, 0.0)
    gradients = parameters * FP32
    # backward holds the gradients of the widest layer's input and output at once
    transient = 2 * widest_row * FP32
    estimate = MemoryEstimate(
        weights=parameters * FP32,
        gradients=gradients,
        optimizer=optimizer_states(cfg.optim) * parameters * FP32,
        activations=activations,
        activations_per_block=0,
        logits=0,  # (micro-batch, outputs): among the saved activations
        backward_transient=transient,
        runtime=machine.overhead,
        heap_retention=0,
        kv_cache=0,
        accumulating=accumulation > 1,
    )
    return estimate.retaining(machine.heap_retention, mapped_gradients)


def table_rows(cfg: Config) -> tuple[Config, dict[str, int]]:
    """Read the config's table: the config with the MLP's widths taken from it, and rows per split."""
    from lmkiln.data.tables import load_table, split_table
    from lmkiln.tasks.supervised import check_widths
    from lmkiln.train.objectives import LOSS_KINDS

    kind = LOSS_KINDS[cfg.loss.name]
    table = load_table(cfg.table, kind, cfg.mlp.outputs if kind == "classification" else 0)
    check_widths(cfg, table)
    splits = split_table(table, cfg.table)
    mlp = dataclasses.replace(cfg.mlp, inputs=table.x.shape[1], outputs=table.n_outputs)
    return dataclasses.replace(cfg, mlp=mlp), {name: len(split.rows) for name, split in splits.items()}
