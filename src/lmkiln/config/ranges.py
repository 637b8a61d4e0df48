"""Declared ranges of every numeric config key, checked before anything is built or written.

A value outside its range would otherwise reach torch (a traceback), loop forever
(`data.shard_tokens=0` writes empty shards without end) or "succeed" on nothing
(`train.seq_len=-5` trains on zero tokens). Every int, float or list-of-numbers key must have a
row here; a test fails when a new numeric key has none. A list key's range applies to each item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from lmkiln.errors import LmkilnError


@dataclass(frozen=True)
class Range:
    """low ≤ value ≤ high, with open ends where low_open/high_open; None = unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            if self.low == 0:
                return "positive (> 0)" if self.low_open else "0 or more"
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE = Range(0, low_open=True)
"""> 0 (floats)."""
AT_LEAST_1 = Range(1)
"""A count or size that must be at least 1."""
NON_NEGATIVE = Range(0)
"""0 or more (0 often means 'off' or 'derive it')."""
PROBABILITY = Range(0, 1)
"""[0, 1]."""
FRACTION = Range(0, 1, high_open=True)
"""[0, 1): a held-out share (all of it would leave nothing to train on)."""

FIELD_RANGES: dict[str, Range] = {
    # data
    "data.val_fraction": FRACTION,
    "data.seed": NON_NEGATIVE,
    "data.shard_tokens": Range(1000),  # smaller shards only multiply files (0 never ends)
    "data.dedup_threshold": Range(0, 1, low_open=True),
    "data.dedup_shingle_size": NON_NEGATIVE,
    "data.dedup_num_perm": Range(16, 1024),
    "data.canaries": NON_NEGATIVE,
    "data.canary_repeats": AT_LEAST_1,
    # tokenizer
    "tokenizer.vocab_size": Range(2),
    "tokenizer.min_frequency": NON_NEGATIVE,
    # model
    "model.n_layer": AT_LEAST_1,
    "model.n_head": AT_LEAST_1,
    "model.n_kv_head": NON_NEGATIVE,
    "model.d_model": AT_LEAST_1,
    "model.d_ff": NON_NEGATIVE,
    "model.block_size": AT_LEAST_1,
    "model.vocab_size": NON_NEGATIVE,
    "model.rope_base": POSITIVE,
    "model.norm_eps": POSITIVE,
    "model.dropout": PROBABILITY,
    "model.init_std": POSITIVE,
    "model.head_size": NON_NEGATIVE,
    "model.sliding_window": NON_NEGATIVE,
    "model.rope_factor": POSITIVE,
    "model.rope_low_freq_factor": POSITIVE,
    "model.rope_high_freq_factor": POSITIVE,
    "model.rope_original_context": AT_LEAST_1,
    # optim
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.betas": FRACTION,
    "optim.eps": NON_NEGATIVE,
    "optim.momentum": FRACTION,
    # schedule
    "schedule.warmup_steps": NON_NEGATIVE,
    "schedule.min_lr_ratio": PROBABILITY,
    "schedule.decay_fraction": PROBABILITY,
    # train
    "train.max_steps": AT_LEAST_1,
    "train.max_epochs": NON_NEGATIVE,
    "train.batch_size": AT_LEAST_1,
    "train.micro_batch_size": NON_NEGATIVE,
    "train.seq_len": AT_LEAST_1,
    "train.grad_clip": NON_NEGATIVE,
    "train.eval_every": AT_LEAST_1,
    "train.eval_every_epochs": NON_NEGATIVE,
    "train.eval_tokens": AT_LEAST_1,
    "train.save_every": AT_LEAST_1,
    "train.keep_last": NON_NEGATIVE,
    "train.patience": NON_NEGATIVE,
    "train.min_delta": NON_NEGATIVE,
    "train.max_nonfinite": AT_LEAST_1,
    "train.log_every": AT_LEAST_1,
    "train.seed": NON_NEGATIVE,
    "train.threads": NON_NEGATIVE,
    "train.sample_tokens": NON_NEGATIVE,
    # dist
    "dist.timeout_s": POSITIVE,
    # loss
    "loss.label_smoothing": FRACTION,
    "loss.class_weights": NON_NEGATIVE,
    "loss.huber_delta": POSITIVE,
    # mlp
    "mlp.inputs": NON_NEGATIVE,
    "mlp.hidden": AT_LEAST_1,
    "mlp.outputs": NON_NEGATIVE,
    "mlp.dropout": FRACTION,
    # table
    "table.val_fraction": FRACTION,
    "table.test_fraction": FRACTION,
    "table.seed": NON_NEGATIVE,
    # encoder
    "encoder.val_fraction": FRACTION,
    "encoder.max_length": Range(2),  # room for the special tokens
    "encoder.temperature": POSITIVE,
    "encoder.classifier_dropout": FRACTION,
    # finetune
    "finetune.val_fraction": FRACTION,
    "finetune.freeze_layers": NON_NEGATIVE,
    "finetune.lora_r": AT_LEAST_1,
    "finetune.lora_alpha": POSITIVE,
    "finetune.lora_dropout": FRACTION,
    "finetune.max_length": NON_NEGATIVE,
    "finetune.eval_samples": NON_NEGATIVE,
    "finetune.max_new_tokens": AT_LEAST_1,
    "finetune.scratch_vocab": Range(265),  # the byte alphabet (256) + 9 special tokens
    "finetune.beta": POSITIVE,
    "finetune.label_smoothing": Range(0, 0.5, high_open=True),  # 0.5 would make DPO indifferent
}
"""Allowed values of every numeric key (for a list key: of each item)."""


def check_ranges(cfg: Any) -> None:
    """Raise on the first key whose value (or one of whose items) is outside its declared range."""
    for key, allowed in FIELD_RANGES.items():
        value = attrgetter(key)(cfg)
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if not allowed.holds(item):
                where = f" (item {item!r})" if item is not value else ""
                raise LmkilnError(f"config key '{key}' must be {allowed.describe()}, got {value!r}{where}")
