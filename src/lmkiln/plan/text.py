"""What `lmkiln plan` prints, and the plan of a config with its data prepared."""

from __future__ import annotations

from lmkiln.config import Config
from lmkiln.errors import LmkilnError
from lmkiln.plan.memory import MemoryEstimate
from lmkiln.plan.planner import STRATEGY_PROCESSES, Plan, format_bytes, plan_training
from lmkiln.plan.tabular import TablePlan, plan_table, table_rows
from lmkiln.train.observe import format_count, format_duration


def plan_with_data(
    cfg: Config, memory_limit: int | None = None, time_budget: float | None = None
) -> Plan | TablePlan:
    """Prepare (or open the cached) tokenizer and shards of a pretraining config (or read the
    table of a task=supervised one), then plan."""
    if cfg.task == "supervised":
        if memory_limit is not None or time_budget is not None:
            raise LmkilnError(
                "--memory and --time advise a transformer's size and micro-batch; an MLP's plan "
                "takes neither (drop them)"
            )
        cfg, rows = table_rows(cfg)
        return plan_table(cfg, rows=rows)
    data_tokens = vocab = None
    if cfg.task == "pretrain":
        from lmkiln.data.prepare import prepare_data

        tokenizer, shards = prepare_data(cfg)
        data_tokens = shards.shards.manifest["splits"]["train"]["tokens"]
        vocab = tokenizer.tokenizer.vocab_size
    return plan_training(
        cfg, data_tokens=data_tokens, vocab_size=vocab, memory_limit=memory_limit, time_budget=time_budget
    )


def format_plan(plan: Plan | TablePlan) -> str:
    if isinstance(plan, TablePlan):
        return format_table_plan(plan)
    m, t, p = plan.model, plan.cfg.train, plan.probe
    lines = [
        f"model: {p.total_parameters / 1e6:.2f}M parameters ({p.embedding_parameters / 1e6:.2f}M embedding, "
        f"{(p.total_parameters - p.embedding_parameters) / 1e6:.2f}M non-embedding; "
        f"{p.trainable_parameters / 1e6:.3f}M trainable), {m.n_layer} layers × width {m.d_model}, "
        f"{plan.flops_per_token / 1e6:.1f} MFLOP per training token",
    ]
    if plan.data_tokens:
        lines.append(
            f"data: {format_count(plan.data_tokens)} training tokens; the run reads "
            f"{format_count(plan.total_steps * plan.tokens_per_step)} ({plan.passes:.1f} passes)"
        )
    mem = plan.memory
    lines.append(
        f"memory (one process, micro-batch {plan.micro_batch} × {t.seq_len} tokens, "
        f"accumulation {plan.accumulation}): predicted peak {format_bytes(mem.total)}"
    )
    lines.extend(_part_lines(plan.memory))
    lines.append(
        f"  activations per block: {format_bytes(mem.activations_per_block)} "
        f"(checkpointed: {format_bytes(plan.probe.per_block_checkpointed * plan.micro_batch)}); "
        f"peak with activation checkpointing {format_bytes(plan.memory_checkpointed.total)}"
    )
    lines.append(
        f"  KV cache for generation: {format_bytes(mem.kv_cache)} per sequence of {m.block_size} tokens"
    )
    lines.extend(_strategy_lines(plan.strategies))
    c = plan.calibration
    if c is not None:
        flop_rate = plan.flops_per_token * plan.tokens_per_s
        lines.append(
            f"time (measured: {c.steps_timed} steps on {c.device}): {c.step_seconds:.3f} s per step, "
            f"{format_count(plan.tokens_per_s)} tok/s ({flop_rate / 1e9:.2f} GFLOP/s); "
            f"{plan.total_steps} steps ≈ {format_duration(plan.train_seconds)} + evaluation "
            f"≈ {format_duration(plan.eval_seconds)}"
        )
    if plan.advice:
        lines.append("advice:")
        lines.extend(f"  - {line}" for line in plan.advice)
    return "\n".join(lines)


def _part_lines(memory: MemoryEstimate) -> list[str]:
    lines = [f"  {name:<19} {format_bytes(value):>11}" for name, value in memory.parts().items()]
    phases = memory.phases()
    lines.append(
        "  peak = weights + optimizer + runtime + heap_retention + the larger phase of a step "
        f"(end of forward {format_bytes(phases['forward'])}, backward {format_bytes(phases['backward'])})"
    )
    return lines


def _strategy_lines(strategies: dict[str, int]) -> list[str]:
    if not strategies:  # the batch does not split over the processes
        return []
    return [
        f"  per process at {STRATEGY_PROCESSES} processes (each with its share of the batch): "
        f"DDP {format_bytes(strategies['ddp'])}, FSDP2 {format_bytes(strategies['fsdp'])}, "
        f"FSDP2 + CPU offload {format_bytes(strategies['fsdp_offload_device'])} "
        f"(+{format_bytes(strategies['fsdp_offload_host'])} host)"
    ]


def format_table_plan(plan: TablePlan) -> str:
    mlp, t = plan.cfg.mlp, plan.cfg.train
    widths = "→".join(str(w) for w in [mlp.inputs, *mlp.hidden, mlp.outputs])
    kind = f"MLP {widths} ({mlp.activation})" if mlp.hidden else f"linear softmax(Wx+b) {widths}"
    lines = [
        f"model: {kind}, {plan.parameters:,} parameters, "
        f"{plan.flops_per_example / 1e6:.2f} MFLOP per training example"
    ]
    if plan.rows:
        epochs = t.max_epochs or plan.total_steps * t.batch_size / plan.rows["train"]
        lines.append(
            f"data: {plan.cfg.table.path}, {plan.rows['train']:,} training / {plan.rows['val']:,} validation "
            f"/ {plan.rows['test']:,} test rows; the run makes {plan.total_steps:,} steps "
            f"({epochs:g} epochs)"
        )
    lines.append(
        f"memory (one process, micro-batch {plan.micro_batch}, accumulation {plan.accumulation}): "
        f"predicted peak {format_bytes(plan.memory.total)}"
    )
    lines.extend(_part_lines(plan.memory))
    lines.extend(_strategy_lines(plan.strategies))
    c = plan.calibration
    if c is not None:
        stop = " at most (early stopping may end it sooner)" if t.patience else ""
        evaluation = f" + evaluation ≈ {format_duration(plan.eval_seconds)}" if plan.eval_seconds else ""
        lines.append(
            f"time (measured: {c.steps_timed} steps on {c.device}): {c.step_seconds * 1e3:.2f} ms per step, "
            f"{format_count(plan.examples_per_s)} examples/s; {plan.total_steps:,} steps{stop} "
            f"≈ {format_duration(plan.train_seconds)}{evaluation}"
        )
    return "\n".join(lines)
