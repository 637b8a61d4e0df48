"""The tasks `lmkiln train` can run, by the config's `task` field, and where each is assembled.

Each task builds its own `TrainSetup` from the layers below and runs THE training loop; they
differ in data, model and objective only:

    pretrain     lmkiln.tasks.pretrain     corpus → tokenizer → shards → transformer
    supervised   lmkiln.tasks.supervised   a table → an MLP (lmkiln.Trainer)
    finetune     lmkiln.tasks.finetune     a base model + a task file → full / frozen / LoRA tuning
    encoder      lmkiln.encoders.task      a Hugging Face encoder → retrieval or classification

Entries import lazily so that the CLI starts fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from lmkiln.config import Config


class TaskResult(Protocol):
    run_dir: Path

    def summary(self) -> str:
        """What `lmkiln train` prints when the run ends (figures, sample, next commands)."""


def _pretrain(cfg: Config, **kwargs: Any) -> TaskResult:
    from lmkiln.tasks.pretrain import pretrain

    return pretrain(cfg, **kwargs)


def _supervised(cfg: Config, **kwargs: Any) -> TaskResult:
    from lmkiln.tasks.supervised import train_table

    return train_table(cfg, **kwargs)


def _encoder(cfg: Config, **kwargs: Any) -> TaskResult:
    from lmkiln.encoders.task import train_encoder

    return train_encoder(cfg, **kwargs)


def _finetune(cfg: Config, **kwargs: Any) -> TaskResult:
    from lmkiln.tasks.finetune import finetune

    return finetune(cfg, **kwargs)


TASK_RUNNERS: dict[str, Callable[..., TaskResult]] = {
    "pretrain": _pretrain,
    "supervised": _supervised,
    "encoder": _encoder,
    "finetune": _finetune,
}


def run_task(
    cfg: Config, resume: str | None = None, force: bool = False, overwrite: bool = False
) -> TaskResult:
    return TASK_RUNNERS[cfg.task](cfg, resume=resume, force=force, overwrite=overwrite)
