"""The run directory: where a run keeps its config, tokenizer, checkpoints, metrics and plots.

runs/<name>/
  config.yaml        the fully resolved config
  tokenizer/         tokenizer.json + tokenizer_config.json
  checkpoints/       step_NNNNNN/ (see checkpoint.py)
  metrics.jsonl      one JSON line per log step, evaluation, checkpoint
  plots/loss.png     loss and learning-rate curves
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from lmkiln.config import Config, flatten, from_dict, to_dict, to_yaml
from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.files import make_output_dir, on_failure, write_atomic
from lmkiln.runs.checkpoint import list_checkpoints

CONFIG_FILE = "config.yaml"


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.run_dir or Path("runs") / cfg.name)


def saved_config(values: dict, source: str) -> Config:
    """The config a run saved (config.yaml, trainer.json), as a Config."""
    return from_dict(values, source)


def open_run_dir(
    cfg: Config,
    *,
    is_main: bool = True,
    barrier: Callable[[str], None] = lambda name: None,
    resume: str | None = None,
    overwrite: bool = False,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """The run directory of every task: the main process prepares it (and saves the tokenizer),
    then every process meets at a barrier and gets the same path."""
    if is_main:
        path = prepare_run_dir(cfg, resume=resume, overwrite=overwrite)
        if tokenizer is not None:
            tokenizer.save(path / "tokenizer")
    barrier("run directory")
    return run_dir_of(cfg)


def _config_changes(saved: dict, new: dict) -> list[str]:
    old_flat, new_flat = flatten(saved), flatten(new)
    return [
        f"{k}: {old_flat.get(k)!r} → {new_flat.get(k)!r}"
        for k in sorted(set(old_flat) | set(new_flat))
        if old_flat.get(k) != new_flat.get(k)
    ]


def prepare_run_dir(cfg: Config, resume: str | None = None, overwrite: bool = False) -> Path:
    """Create or reuse the run directory, refusing to mix two different runs in one place."""
    path = run_dir_of(cfg)
    config_file = path / CONFIG_FILE
    if path.exists() and not path.is_dir():
        raise LmkilnError(f"run directory {path} exists and is not a directory")
    if config_file.is_file():
        has_checkpoints = bool(list_checkpoints(path / "checkpoints"))
        if overwrite:
            shutil.rmtree(path)
        elif not resume and has_checkpoints:
            saved = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
            changes = _config_changes(to_dict(saved_config(saved, str(config_file))), to_dict(cfg))
            what = (
                f"with a different config ({'; '.join(changes[:4])}{' …' if len(changes) > 4 else ''})"
                if changes
                else "with checkpoints"
            )
            raise LmkilnError(
                f"run directory {path} already exists {what}; pass --resume auto to continue it, "
                f"--overwrite to start over, or --train.run_dir to choose another"
            )
        elif not has_checkpoints:
            for stale in ("metrics.jsonl", "plots"):  # a run that never saved: nothing to keep
                target = path / stale
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(
                    missing_ok=True
                )
    elif path.is_dir() and any(path.iterdir()):
        raise LmkilnError(
            f"{path} is not empty and is not a lmkiln run directory (no {CONFIG_FILE}); "
            f"choose another --train.run_dir"
        )
    try:
        make_output_dir(path, keep=lambda p: bool(list_checkpoints(p / "checkpoints")))
        _restore_config_on_failure(config_file)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        write_atomic(config_file, to_yaml(cfg))
    except OSError as err:
        raise LmkilnError(
            f"cannot write to the run directory {path}: {err.strerror or err}; "
            f"choose a writable --train.run_dir"
        ) from None
    return path


def _restore_config_on_failure(config_file: Path) -> None:
    """A resume that is refused (changed model shape, ...) must not leave the refused settings in
    config.yaml: if the command fails before a new checkpoint is saved, the old file comes back."""
    if not config_file.is_file():
        return
    old_text = config_file.read_text(encoding="utf-8")

    def newest() -> list:
        return list_checkpoints(config_file.parent / "checkpoints")[-1:]

    before = newest()

    def restore() -> None:
        if newest() == before:
            write_atomic(config_file, old_text)

    on_failure(restore)
