"""Crash-safe checkpoints: atomic directories, checksummed manifests, no pickle anywhere.

A checkpoint is a directory `step_000123/`:

    model.safetensors      model weights (tied weights stored once)
    optimizer.safetensors  every optimizer state tensor; the rest of its state lives in trainer.json
    rng_rank0.safetensors  torch CPU/CUDA generator states of rank 0 (one file pair per rank)
    rng_rank0.json         Python and NumPy generator states of rank 0
    trainer.json           step, counters, data position, optimizer param groups, config, fingerprint
    dcp/                   (FSDP runs) model and optimizer shards written by Distributed Checkpoint
    manifest.json          size and SHA-256 of each file above, written last

It is written into `step_000123.tmp/`, every file fsynced, the manifest last, then renamed.
With several processes each rank adds its own RNG file (and, with FSDP, its shard under `dcp/`).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmkiln.errors import LmkilnError
from lmkiln.files import fsync_dir, fsync_file
from lmkiln.runs.tensors import save_tensors

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


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_tensors(path, {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, {"format": "pt"})
    fsync_file(path)


@dataclass
class CheckpointData:
    """What one checkpoint holds for one rank, in memory (nothing applied yet)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    trainer: dict[str, Any]
    rng_meta: dict[str, Any] = field(default_factory=dict)
    sharded: Path | None = None
    """Directory of a DCP-sharded model/optimizer state (FSDP runs), else None."""


class CheckpointWriter:
    """Writes one checkpoint atomically, with every rank adding its own files.

    All ranks enter and commit together; only the main rank creates the temporary directory,
    writes the manifest (sizes and SHA-256 of every file, last) and renames it into place.
    """

    def __init__(self, root: Path, step: int, is_main: bool = True, barrier=lambda name: None) -> None:
        self.root, self.step, self.is_main, self.barrier = root, step, is_main, barrier
        self.final = root / checkpoint_name(step)
        self.tmp = root / f"{self.final.name}.tmp"

    def __enter__(self) -> CheckpointWriter:
        try:
            if self.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp.mkdir()
        except OSError as err:
            raise self._failed(err) from None
        self.barrier("checkpoint start")
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if isinstance(error, OSError):
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise self._failed(error) from None

    def _failed(self, err: OSError) -> LmkilnError:
        return LmkilnError(
            f"saving checkpoint {self.final} failed ({err.strerror or err}); the previous "
            f"checkpoints are intact"
        )

    def tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        _write_tensors(self.tmp / name, tensors)
        _reached("after_" + name.split(".")[0])

    def json(self, name: str, value: Any) -> None:
        _write_json(self.tmp / name, value)

    def commit(self) -> Path:
        self.barrier("checkpoint files")
        if self.is_main:
            files = {
                str(p.relative_to(self.tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                for p in sorted(self.tmp.rglob("*"))
                if p.is_file()
            }
            _reached("before_manifest")
            _write_json(self.tmp / MANIFEST, {"format": FORMAT, "step": self.step, "files": files})
            for directory in [p for p in self.tmp.rglob("*") if p.is_dir()] + [self.tmp]:
                fsync_dir(directory)
            _reached("before_rename")
            if self.final.exists():  # a stale copy of this step (e.g. from a rolled-back run) is replaced
                shutil.rmtree(self.final)
            os.rename(self.tmp, self.final)
            fsync_dir(self.root)
        self.barrier("checkpoint commit")
        return self.final


def write_checkpoint(root: Path, step: int, data: CheckpointData) -> Path:
    """One process writes a whole checkpoint (e.g. merged weights for export); files left empty are skipped."""
    with CheckpointWriter(root, step) as writer:
        writer.tensors("model.safetensors", data.model)
        if data.optimizer:
            writer.tensors("optimizer.safetensors", data.optimizer)
        if data.rng or data.rng_meta:
            writer.tensors("rng_rank0.safetensors", data.rng)
            writer.json("rng_rank0.json", data.rng_meta)
        writer.json("trainer.json", data.trainer)
        return writer.commit()


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
    if "trainer.json" not in files or not ("model.safetensors" in files or "dcp/.metadata" in files):
        raise CorruptCheckpoint(f"{path}: manifest lists no trainer.json or no model weights")
    return manifest


def _contained(directory: Path, name: str) -> Path:
    """A file named by a manifest, refused if it could leave the checkpoint directory.

    Names are plain file names, or `dcp/<file>` for the shards of a sharded checkpoint.
    """
    parts = name.split("/") if isinstance(name, str) else []
    plain = all(p and p not in (".", "..") and p == Path(p).name for p in parts)
    if not plain or len(parts) > 2 or (len(parts) == 2 and parts[0] != "dcp"):
        raise CorruptCheckpoint(f"{directory}: manifest names a path outside the checkpoint: {name!r}")
    file = directory.joinpath(*parts)
    if file.is_symlink() or file.parent.is_symlink():
        raise CorruptCheckpoint(f"{file}: symbolic links are not allowed in a checkpoint")
    return file


def read_checkpoint(path: Path, verify: bool = True, rank: int = 0) -> CheckpointData:
    """Load a verified checkpoint (this rank's RNG); nothing is applied to any object here."""
    manifest = verify_checkpoint(path) if verify else json.loads((path / MANIFEST).read_text())
    files = manifest["files"]

    def tensors(name: str) -> dict[str, torch.Tensor]:
        return load_file(str(_contained(path, name))) if name in files else {}

    def json_file(name: str) -> dict:
        if name not in files:
            return {}
        value = json.loads(_contained(path, name).read_text(encoding="utf-8"))
        if not isinstance(value, dict):
            raise CorruptCheckpoint(f"{path / name}: expected a JSON object")
        return value

    try:
        return CheckpointData(
            tensors("model.safetensors"),
            tensors("optimizer.safetensors"),
            tensors(f"rng_rank{rank}.safetensors"),
            json_file("trainer.json"),
            json_file(f"rng_rank{rank}.json"),
            path / "dcp" if "dcp/.metadata" in files else None,
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
    """Delete leftovers of saves that crashed (a run directory belongs to one job at a time)."""
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.endswith(".tmp") and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


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
