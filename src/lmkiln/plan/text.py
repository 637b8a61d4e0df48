"""What `lmkiln plan` prints, and the plan of a config with its data prepared."""

from __future__ import annotations

from lmkiln.config import Config
from lmkiln.plan.memory import per_strategy
from lmkiln.plan.planner import Plan, format_bytes, plan_training
from lmkiln.train.observe import format_count, format_duration


def plan_with_data(cfg: Config, memory_limit: int | None = None, time_budget: float | None = None) -> Plan:
    """Prepare (or open the cached) tokenizer and shards of a pretraining config, then plan."""
    data_tokens = vocab = None
    if cfg.task == "pretrain":
        from lmkiln.data.prepare import prepare_data

        tokenizer, shards = prepare_data(cfg)
        data_tokens = shards.shards.manifest["splits"]["train"]["tokens"]
        vocab = tokenizer.tokenizer.vocab_size
    return plan_training(
        cfg, data_tokens=data_tokens, vocab_size=vocab, memory_limit=memory_limit, time_budget=time_budget
    )


def format_plan(plan: Plan) -> str:
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
    for name, value in plan.memory_parts().items():
        lines.append(f"  {name:<19} {format_bytes(value):>11}")
    lines.append(
        f"  activations per block: {format_bytes(mem.activations_per_block)} "
        f"(checkpointed: {format_bytes(plan.probe.per_block_checkpointed * plan.micro_batch)}); "
        f"peak with activation checkpointing {format_bytes(plan.memory_checkpointed.total)}"
    )
    lines.append(
        f"  KV cache for generation: {format_bytes(mem.kv_cache)} per sequence of {m.block_size} tokens"
    )
    strategies = per_strategy(mem, m.n_layer, 2)
    lines.append(
        "  per process at 2 processes: DDP "
        + format_bytes(strategies["ddp"])
        + ", FSDP2 "
        + format_bytes(strategies["fsdp"])
        + ", FSDP2 + CPU offload "
        + format_bytes(strategies["fsdp_offload_device"])
        + f" (+{format_bytes(strategies['fsdp_offload_host'])} host)"
    )
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
