"""What a run derives from its config, computed once: the batch plan and the resolved config.

The user's `Config` is never changed after it is built. Setup code that learns something the
config leaves open (the tokenizer's vocabulary size, a base model's shape, the number of
processes, the length of an epoch) asks `resolve` for a new `ResolvedConfig` that holds it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from lmkiln.config.schema import BatchPlan, Config, ModelConfig, TrainConfig, batch_plan, validate
from lmkiln.errors import LmkilnError


@dataclass(frozen=True)
class ResolvedConfig:
    """A config with everything derived filled in, and the batch plan; the original is untouched."""

    cfg: Config
    """A copy of the user's config with derived fields set (model.vocab_size, a base model's shape,
    train.seq_len for fine-tuning): what the run directory and checkpoints record."""
    batch: BatchPlan
    total_steps: int
    """Optimizer steps of the whole run (train.max_steps, or train.max_epochs × steps per epoch)."""

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
    return ResolvedConfig(new, batch_plan(t, world_size), total)


def _with_vocab(model: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    if model.vocab_size == 0:
        return dataclasses.replace(model, vocab_size=tokenizer_vocab)
    if model.vocab_size < tokenizer_vocab:
        raise LmkilnError(
            f"model.vocab_size {model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab}); set it to 0 to use the tokenizer's size"
        )
    return model
