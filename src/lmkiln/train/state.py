"""Everything a run must restore to continue bit-for-bit, and how it saves and loads itself.

`TrainState` holds the loop's counters; `TrainState.save` writes them into a checkpoint together
with the live objects of a `Checkpointed` (model, optimizer, data position, the run's fingerprint
and config) and every rank's RNG states, and `TrainState.load` applies a verified checkpoint back.
Optimizer state is split into tensors (for safetensors) and plain values (for JSON) so that no
checkpoint file is ever a pickle.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from lmkiln.errors import LmkilnError
from lmkiln.runs import checkpoint as ckpt
from lmkiln.runs.tensors import load_model_tensors, model_tensors
from lmkiln.train import distributed
from lmkiln.train.runtime import Runtime

log = logging.getLogger("lmkiln")


class BatchStream(Protocol):
    """Endless micro-batches whose position can be saved and restored."""

    def __next__(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Checkpointed:
    """What a checkpoint holds besides the counters: the live objects and the run's identity."""

    model: nn.Module
    """Unwrapped (not the DDP/compiled module); FSDP2-sharded when `sharded`."""
    optimizer: torch.optim.Optimizer
    batches: BatchStream
    fingerprint: dict[str, Any] = field(default_factory=dict)
    """Settings that must not change when resuming (batch shape, tokenizer, data, model shape)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved config, as saved in trainer.json."""
    sharded: bool = False


@dataclass
class TrainState:
    """Loop counters; saved in trainer.json."""

    step: int = 0
    epoch: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_value: float | None = None
    best_step: int = -1
    bad_evals: int = 0
    nonfinite_steps: int = 0
    nonfinite_streak: int = 0
    rollbacks: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    # -- checkpoints -----------------------------------------------------------------------------
    def save(
        self,
        root: Path,
        parts: Checkpointed,
        runtime: Runtime,
        last_eval: dict[str, float],
        final: bool = False,
    ) -> Path:
        """Write checkpoint `root/step_NNNNNN` atomically (a collective: every rank calls it)."""
        with ckpt.CheckpointWriter(root, self.step, runtime.is_main, runtime.barrier) as writer:
            rng_tensors, rng_meta = capture_rng()  # every rank keeps its own generators
            writer.tensors(f"rng_rank{runtime.rank}.safetensors", rng_tensors)
            writer.json(f"rng_rank{runtime.rank}.json", rng_meta)
            if parts.sharded:
                self._save_sharded(writer, parts, runtime, last_eval, final)
            elif runtime.is_main:
                writer.tensors("model.safetensors", model_tensors(parts.model))
                opt_tensors, opt_meta = optimizer_state(parts.optimizer)
                writer.tensors("optimizer.safetensors", opt_tensors)
                writer.json("trainer.json", self._trainer_json(parts, runtime, last_eval, opt_meta))
            return writer.commit()

    def _save_sharded(
        self,
        writer: ckpt.CheckpointWriter,
        parts: Checkpointed,
        runtime: Runtime,
        last_eval: dict,
        final: bool,
    ) -> None:
        with runtime.collective("sharded checkpoint save"):
            groups = distributed.save_sharded(writer.tmp / "dcp", parts.model, parts.optimizer)
            full = distributed.full_model_state(parts.model) if final else None
        if not runtime.is_main:
            return
        if full is not None:  # the last checkpoint also holds consolidated weights for export
            writer.tensors("model.safetensors", model_tensors(parts.model, full))
        writer.json("trainer.json", self._trainer_json(parts, runtime, last_eval, {"param_groups": groups}))

    def _trainer_json(
        self, parts: Checkpointed, runtime: Runtime, last_eval: dict, optimizer_meta: dict
    ) -> dict:
        return {
            "format": ckpt.FORMAT,
            "state": self.to_dict(),
            "optimizer": optimizer_meta,
            "data": parts.batches.state_dict(),
            "fingerprint": parts.fingerprint,
            "config": parts.config,
            "last_eval": last_eval,
            "world_size": runtime.world_size,
            "sharded": parts.sharded,
        }

    @classmethod
    def load(
        cls, path: Path, parts: Checkpointed, runtime: Runtime, *, data: bool = True, force: bool = False
    ) -> tuple[TrainState, dict[str, float]]:
        """Apply a verified checkpoint to `parts`: (its counters, its last evaluation).

        With data=False the data position and RNG keep going (a rollback after a non-finite step).
        """
        saved = ckpt.read_checkpoint(path, rank=runtime.rank)
        trainer = saved.trainer
        check_drift(trainer.get("fingerprint", {}), parts.fingerprint, force)
        if saved.sharded is not None:
            with runtime.collective("sharded checkpoint load"):
                distributed.load_sharded(
                    saved.sharded, parts.model, parts.optimizer, trainer["optimizer"]["param_groups"]
                )
        elif parts.sharded:
            raise LmkilnError(f"{path} was written without FSDP; resume it with --dist.strategy ddp")
        else:
            load_model_tensors(parts.model, saved.model, str(path / "model.safetensors"))
            load_optimizer_state(parts.optimizer, saved.optimizer, trainer["optimizer"])
        if data:
            parts.batches.load_state_dict(trainer["data"])
            if saved.rng or saved.rng_meta:
                restore_rng(saved.rng, saved.rng_meta)
            else:
                log.warning(
                    "no RNG state for rank %d in %s (world size changed); dropout randomness restarts",
                    runtime.rank,
                    path,
                )
        return cls.from_dict(trainer["state"]), trainer.get("last_eval", {})


def check_drift(old: dict, new: dict, force: bool) -> None:
    """Refuse (or, with force, warn about) a resume whose batch/data/model settings changed."""
    changes = [
        f"{k}: {old.get(k)!r} → {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if not changes:
        return
    text = "; ".join(changes)
    if not force:
        raise LmkilnError(
            f"refusing to resume: the run would change ({text}); start a new run, or pass "
            f"--force to resume anyway"
        )
    log.warning("resuming with changed settings (--force): %s", text)


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) that together hold `optimizer.state_dict()` without pickling."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        plain[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                plain[str(index)][key] = value
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if "torch_cpu" in tensors:
        torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if "python" in meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta:
        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
