"""Crash-safe checkpoints: atomic directories, checksummed manifests, no pickle anywhere.

A checkpoint is a directory `step_000123/`:

    model.safetensors      model weights (tied weights stored once)
    optimizer.safetensors  every optimizer state tensor; the rest of its state lives in trainer.json
    rng.safetensors        torch CPU/CUDA generator states
    trainer.json           step, counters, data position, schedule, Python/NumPy RNG, config, fingerprint
    manifest.json          size and SHA-256 of each file above, written last

It is written into `step_000123.tmp-<pid>/`, every file fsynced, the manifest last, then renamed.
A directory without a valid manifest is never offered for resume, and every file is checked
against the manifest before any state is applied. Nothing is ever unpickled: tensors come from
safetensors, everything else from JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmkiln.errors import LmkilnError

log = logging.getLogger(__name__)

FORMAT = 1
NAME = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"


class CorruptCheckpoint(LmkilnError):
    """A checkpoint failed verification (missing file, size or checksum mismatch, bad manifest)."""


def _reached(phase: str) -> None:
    """Fault-injection point: tests patch this to crash a save at a given phase."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"}
    )
    _fsync(path)


@dataclass
class CheckpointData:
    """What one checkpoint holds, in memory."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    trainer: dict[str, Any]


def write_checkpoint(root: Path, step: int, data: CheckpointData) -> Path:
    """Atomically write `root/step_NNNNNN`; on failure the previous checkpoints stay untouched."""
    final = root / checkpoint_name(step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_tensors(tmp / "model.safetensors", data.model)
        _reached("after_model")
        _write_tensors(tmp / "optimizer.safetensors", data.optimizer)
        _reached("after_optimizer")
        _write_tensors(tmp / "rng.safetensors", data.rng)
        _write_json(tmp / "trainer.json", data.trainer)
        _reached("before_manifest")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        _write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": files})
        _fsync(tmp)
        _reached("before_rename")
        if final.exists():  # a stale copy of this step (e.g. from a rolled-back run) is replaced
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LmkilnError(
            f"saving checkpoint {final} failed ({err.strerror or err}); the previous checkpoints are intact"
        ) from None
    return final


def verify_checkpoint(path: Path) -> dict:
    """Check the manifest and every file it lists; returns the manifest or raises CorruptCheckpoint."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CorruptCheckpoint(f"{path}: incomplete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        assert isinstance(files, dict)
    except (json.JSONDecodeError, KeyError, AssertionError, UnicodeDecodeError):
        raise CorruptCheckpoint(f"{manifest_path}: unreadable manifest") from None
    for name, entry in files.items():
        file = _contained(path, name)
        if not file.is_file():
            raise CorruptCheckpoint(f"{file}: missing")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise CorruptCheckpoint(f"{file}: {size} bytes, manifest says {entry.get('bytes')}")
        if _sha256(file) != entry.get("sha256"):
            raise CorruptCheckpoint(f"{file}: SHA-256 does not match the manifest")
    for required in ("model.safetensors", "trainer.json"):
        if required not in files:
            raise CorruptCheckpoint(f"{path}: manifest does not list {required}")
    return manifest


def _contained(directory: Path, name: str) -> Path:
    """A file named by a manifest, refused if it could leave the checkpoint directory."""
    if not isinstance(name, str) or name != Path(name).name or name in ("", ".", ".."):
        raise CorruptCheckpoint(f"{directory}: manifest names a path outside the checkpoint: {name!r}")
    file = directory / name
    if file.is_symlink():
        raise CorruptCheckpoint(f"{file}: symbolic links are not allowed in a checkpoint")
    return file


def read_checkpoint(path: Path, verify: bool = True) -> CheckpointData:
    """Load a verified checkpoint; nothing is applied to any object here."""
    manifest = verify_checkpoint(path) if verify else json.loads((path / MANIFEST).read_text())
    files = manifest["files"]

    def tensors(name: str) -> dict[str, torch.Tensor]:
        return load_file(str(_contained(path, name))) if name in files else {}

    try:
        trainer = json.loads(_contained(path, "trainer.json").read_text(encoding="utf-8"))
        return CheckpointData(
            tensors("model.safetensors"),
            tensors("optimizer.safetensors"),
            tensors("rng.safetensors"),
            trainer,
        )
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RuntimeError, SafetensorError) as err:
        raise CorruptCheckpoint(f"{path}: unreadable checkpoint ({err})") from None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Every directory that looks like a finished checkpoint (has a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = NAME.match(child.name)
        if match and child.is_dir() and not child.is_symlink() and (child / MANIFEST).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that verifies; older ones are tried (with a warning) if newer are corrupt."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except CorruptCheckpoint as err:
            log.warning("skipping corrupt checkpoint: %s", err)
    return None


def remove_stale_partials(root: Path) -> None:
    """Delete leftovers of saves that crashed (tmp directories of processes that are gone)."""
    if not root.is_dir():
        return
    for child in root.iterdir():
        if ".tmp-" in child.name and child.is_dir():
            pid = child.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid)):
                shutil.rmtree(child, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune_checkpoints(root: Path, keep_last: int, keep: set[Path]) -> None:
    """Keep the newest `keep_last` complete checkpoints plus those in `keep` (the best one).

    Runs only after a new checkpoint is complete, so the newest complete one is never deleted
    before its successor exists.
    """
    complete = list_checkpoints(root)
    newest = {path for _, path in complete[-max(keep_last, 1) :]}
    for _, path in complete:
        if path not in newest and path not in keep:
            shutil.rmtree(path, ignore_errors=True)
