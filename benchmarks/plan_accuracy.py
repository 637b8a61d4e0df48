"""`lmkiln plan` against measurement: predicted and measured peak memory and step time.

    python -m benchmarks.plan_accuracy [--steps 12] [--rounds 3] [--only NAME,...] [--out FILE.json]

Configurations: pretraining at three sizes, with activation checkpointing and with gradient
accumulation; LoRA fine-tuning of a pretrained-shape base; an MLP; the default shape over two
processes with DDP and with FSDP2. For each, the plan predicts in this process; a fresh worker
process then trains the same model for `--steps` steps on random tokens (rows) and reports its
peak resident memory minus its resident memory before the model was built (VmHWM − VmRSS, the
imports excluded) and its fastest step. Each of `--rounds` rounds predicts and measures again:
the fastest step of each side counts (load that comes and goes on a shared machine then hits
both alike), and so does the median measured peak (glibc's heap keeps a varying share of the
memory a step frees: the same config's peak differs by up to ~15% between processes). Every
prediction should be within 15%.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lmkiln.config import build_config, parse_overrides
from lmkiln.plan.measure import measure

ROOT = Path(__file__).resolve().parents[1]

PRETRAIN_19M = [
    "model.n_layer=6",
    "model.d_model=512",
    "model.n_head=8",
    "model.vocab_size=8192",
    "model.block_size=256",
    "train.seq_len=256",
    "train.batch_size=8",
]
CONFIGS: dict[str, list[str]] = {
    "pretrain-0.9m": [
        "model.n_layer=2",
        "model.d_model=128",
        "model.n_head=4",
        "model.vocab_size=2048",
        "model.block_size=128",
        "train.seq_len=128",
        "train.batch_size=16",
    ],
    "pretrain-3.7m (default recipe shape)": [
        "model.n_layer=4",
        "model.d_model=256",
        "model.n_head=4",
        "model.vocab_size=2048",
        "model.block_size=256",
        "model.dropout=0.1",
        "train.seq_len=128",
        "train.batch_size=16",
    ],
    "pretrain-19m": PRETRAIN_19M,
    "pretrain-19m checkpointed": [*PRETRAIN_19M, "train.activation_checkpointing=true"],
    "gpt2-style 11m, 4 micro-batches": [
        "model.n_layer=4",
        "model.d_model=384",
        "model.n_head=6",
        "model.vocab_size=8192",
        "model.norm=layer",
        "model.position=learned",
        "model.mlp=gelu",
        "model.bias=true",
        "model.block_size=256",
        "train.seq_len=256",
        "train.batch_size=16",
        "train.micro_batch_size=4",
    ],
    "mlp 784-2048-2048-10, batch 512": [
        "task=supervised",
        "mlp.inputs=784",
        "mlp.hidden=[2048,2048]",
        "mlp.outputs=10",
        "train.batch_size=512",
    ],
    "lora r=8 fine-tuning a 3.7m base": [
        "model.n_layer=4",
        "model.d_model=256",
        "model.n_head=4",
        "model.vocab_size=2048",
        "model.block_size=256",
        "train.seq_len=256",
        "train.batch_size=8",
        "finetune.method=lora",
        "optim.lr=1e-3",
    ],
}
"""Name → config overrides over the defaults (`finetune.method=lora` trains adapters only)."""
PRETRAIN_3_7M = CONFIGS["pretrain-3.7m (default recipe shape)"]
SPREAD: dict[str, list[str]] = {
    "pretrain-3.7m, DDP x2": [*PRETRAIN_3_7M, "dist.strategy=ddp"],
    "pretrain-3.7m, FSDP2 x2": [*PRETRAIN_3_7M, "dist.strategy=fsdp"],
}
"""Runs over 2 processes (torchrun, gloo): the plan's per-process peak for the strategy against the
largest of the processes' measured peaks; the plan times one process only, so memory alone."""


def predict(overrides: list[str], spread: bool = False) -> dict:
    from lmkiln.plan import plan_table, plan_training

    # LoRA keys next to a pretraining model's: the sections are not checked against a task
    cfg = build_config([("benchmark", parse_overrides(overrides))], check_sections=False)
    if spread:
        plan = plan_training(cfg, calibrate_steps=0)
        return {"peak_mb": plan.strategies[cfg.dist.strategy] / 2**20}
    plan = (plan_table if cfg.task == "supervised" else plan_training)(cfg, calibrate_steps=3)
    return {
        "peak_mb": plan.memory.total / 2**20,
        "step_s": plan.calibration.step_seconds,
        "parts_mb": {k: round(v / 2**20, 2) for k, v in plan.memory.parts().items()},
    }


def main() -> None:
    import logging

    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--only", default="", help="comma-separated: configs whose name contains one of these"
    )
    parser.add_argument("--out", default="")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternate plan and measurement this often per config: the fastest step of each side "
        "and the median measured peak count",
    )
    args = parser.parse_args()
    from benchmarks.common import machine

    rows = []
    for name, overrides in [*CONFIGS.items(), *SPREAD.items()]:
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        spread = name in SPREAD
        rounds = [
            (predict(overrides, spread), measure(overrides, args.steps, processes=2 if spread else 1))
            for _ in range(args.rounds)
        ]
        predicted, measured = rounds[0]
        peaks = sorted(m["peak_mb"] for _, m in rounds)
        measured["peak_mb"], measured["peak_mb_each"] = statistics.median(peaks), peaks
        row = {"config": name, "overrides": overrides, "predicted": predicted, "measured": measured}
        checked = ["peak_mb"]
        if not spread:
            predicted["step_s"] = min(p["step_s"] for p, _ in rounds)
            measured["step_s"] = min(m["step_s"] for _, m in rounds)
            checked.append("step_s")
        for key in checked:
            row[f"{key}_ratio"] = round(measured[key] / predicted[key], 3)
        row["within_15pct"] = all(abs(row[f"{k}_ratio"] - 1) <= 0.15 for k in checked)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "benchmark": "plan_accuracy",
        "rounds": args.rounds,
        "machine": machine(),
        "steps": args.steps,
        "rows": rows,
        "all_within_15pct": all(r["within_15pct"] for r in rows),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"all_within_15pct": report["all_within_15pct"]}))


if __name__ == "__main__":
    main()
