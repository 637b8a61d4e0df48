"""What a run derives from its config, computed once: the batch plan and the resolved config.

The user's `Config` is never changed after it is built. Setup code that learns something the
config leaves open (the tokenizer's vocabulary size, a base model's shape, the number of
processes, the length of an epoch) asks `resolve` for a new `ResolvedConfig` that holds it.

Fine-tuning defaults follow the method: a built-in recipe states one learning rate, tuned for
full fine-tuning; LoRA adapters and partly frozen models need more (`METHOD_LR_SCALE`). Only a
value the user did not set is adapted (`set_by_user`), and each adaptation leaves a note that
the run prints and records.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from lmkiln.config.layers import record_sources, set_by_user, value_sources
from lmkiln.config.schema import BatchPlan, Config, ModelConfig, TrainConfig, batch_plan, validate
from lmkiln.errors import LmkilnError

METHOD_LR_SCALE: dict[str, float] = {"full": 1.0, "freeze": 3.0, "lora": 10.0}
"""Learning rate of each fine-tuning method as a multiple of the recipe's (full fine-tuning's).
LoRA trains small low-rank updates from a zero init and needs about 10x (peft's and other
toolkits' examples agree); freezing the embeddings sits in between. Measured in
benchmarks/method_defaults.py."""

METHOD_NAMES = {"full": "full fine-tuning", "freeze": "frozen-layer", "lora": "LoRA"}

WARMUP_SHARE = 0.1
"""A recipe's warm-up is capped at this share of the run's steps: a 20-step warm-up made for
long runs would spend a third of a 60-step run (300 examples, 3 epochs) below the peak."""


@dataclass(frozen=True)
class ResolvedConfig:
    """A config with everything derived filled in, and the batch plan; the original is untouched."""

    cfg: Config
    """A copy of the user's config with derived fields set (model.vocab_size, a base model's shape,
    train.seq_len for fine-tuning): what the run directory and checkpoints record."""
    batch: BatchPlan
    total_steps: int
    """Optimizer steps of the whole run (train.max_steps, or train.max_epochs × steps per epoch)."""
    notes: tuple[str, ...] = ()
    """Values resolution chose for the user, each with why and how to override it (printed when
    the run starts and kept in its summary)."""

    @property
    def train(self) -> TrainConfig:
        return self.cfg.train

    @property
    def model(self) -> ModelConfig:
        return self.cfg.model


def resolve(
    cfg: Config,
    world_size: int = 1,
    *,
    model: ModelConfig | None = None,
    vocab_size: int | None = None,
    examples: int | None = None,
    derived: dict[str, Any] | None = None,
) -> ResolvedConfig:
    """Derive once, returning a new config and the plan; `cfg` is not changed.

    model: a whole model section (a base model's shape); vocab_size: the tokenizer's, filled in
    when model.vocab_size is 0; derived: other dotted fields that setup fixes (e.g.
    {"train.seq_len": 512, "finetune.labels": [...]}); examples: the training set's size, for
    runs of train.max_epochs epochs. The batch plan is made for `world_size` processes.
    """
    new = copy.deepcopy(cfg)
    if model is not None:
        new.model = copy.deepcopy(model)
    if vocab_size is not None:
        new.model = _with_vocab(new.model, vocab_size)
    for key, value in (derived or {}).items():
        section, name = key.split(".")
        setattr(new, section, dataclasses.replace(getattr(new, section), **{name: value}))
    validate(new)
    t = new.train
    steps_per_epoch = -(-examples // t.batch_size) if examples else 0
    total = t.max_epochs * steps_per_epoch if t.max_epochs and steps_per_epoch else t.max_steps
    notes = method_defaults(new, total) if new.task == "finetune" else []
    return ResolvedConfig(new, batch_plan(t, world_size), total, tuple(notes))


def method_defaults(cfg: Config, total_steps: int) -> list[str]:
    """Adapt, in place, the optimizer settings the user left to the recipe to the fine-tuning
    method and the run's length; returns one note per adapted value.

    An adapted value's source becomes "method default", so resolving the result again (a Trainer
    given a resolved config) leaves it as it is.
    """
    notes: list[str] = []
    sources = value_sources(cfg)
    method = cfg.finetune.method
    scale = METHOD_LR_SCALE[method]
    if scale != 1.0 and not set_by_user(cfg, "optim.lr"):
        recipe_lr = cfg.optim.lr
        cfg.optim.lr = recipe_lr * scale
        notes.append(
            f"lr {cfg.optim.lr:g}: {METHOD_NAMES[method]} default ({scale:g}x the recipe's "
            f"{recipe_lr:g}); set optim.lr to override"
        )
        if sources is not None:
            sources["optim.lr"] = "method default"
    warmup_cap = max(1, int(total_steps * WARMUP_SHARE))
    if cfg.schedule.warmup_steps > warmup_cap and not set_by_user(cfg, "schedule.warmup_steps"):
        notes.append(
            f"warm-up {warmup_cap} steps: {WARMUP_SHARE:.0%} of this run's {total_steps} steps (the "
            f"recipe's {cfg.schedule.warmup_steps} would not reach the peak soon enough); set "
            f"schedule.warmup_steps to override"
        )
        cfg.schedule.warmup_steps = warmup_cap
        if sources is not None:
            sources["schedule.warmup_steps"] = "method default"
    if sources is not None:
        record_sources(cfg, sources)
    return notes


def _with_vocab(model: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    if model.vocab_size == 0:
        return dataclasses.replace(model, vocab_size=tokenizer_vocab)
    if model.vocab_size < tokenizer_vocab:
        raise LmkilnError(
            f"model.vocab_size {model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab}); set it to 0 to use the tokenizer's size"
        )
    return model
