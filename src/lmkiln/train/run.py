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
from pathlib import Path

import yaml

from lmkiln.config import Config, flatten, to_dict, to_yaml
from lmkiln.errors import LmkilnError
from lmkiln.train.checkpoint import list_checkpoints

CONFIG_FILE = "config.yaml"


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.run_dir or Path("runs") / cfg.name)


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
            changes = _config_changes(saved, to_dict(cfg))
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
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        tmp = config_file.with_suffix(".yaml.tmp")
        tmp.write_text(to_yaml(cfg), encoding="utf-8")
        tmp.replace(config_file)
    except OSError as err:
        raise LmkilnError(
            f"cannot write to the run directory {path}: {err.strerror or err}; "
            f"choose a writable --train.run_dir"
        ) from None
    return path
