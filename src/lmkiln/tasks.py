"""The tasks `lmkiln train` can run, by the config's `task` field.

Each task builds its own `TrainSetup` and runs THE training loop; they differ in data, model and
objective only. Entries import lazily so that the CLI starts fast.
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
    from lmkiln.train.pretrain import pretrain

    return pretrain(cfg, **kwargs)


def _supervised(cfg: Config, **kwargs: Any) -> TaskResult:
    from lmkiln.train.tabular import train_table

    return train_table(cfg, **kwargs)


def _encoder(cfg: Config, **kwargs: Any) -> TaskResult:
    from lmkiln.interop.encoder_task import train_encoder

    return train_encoder(cfg, **kwargs)


def _finetune(cfg: Config, **kwargs: Any) -> TaskResult:
    from lmkiln.finetune.setup import finetune

    return finetune(cfg, **kwargs)


TASKS: dict[str, Callable[..., TaskResult]] = {
    "pretrain": _pretrain,
    "supervised": _supervised,
    "encoder": _encoder,
    "finetune": _finetune,
}


def run_task(
    cfg: Config, resume: str | None = None, force: bool = False, overwrite: bool = False
) -> TaskResult:
    return TASKS[cfg.task](cfg, resume=resume, force=force, overwrite=overwrite)
