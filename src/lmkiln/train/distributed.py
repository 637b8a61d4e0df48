"""Several processes: DDP or FSDP2 wrapping, and sharded checkpoints with Distributed Checkpoint.

Launch with `torchrun --nproc-per-node N -m lmkiln train ...` (or `lmkiln train --nproc N`).
FSDP2 shards every transformer block (`fully_shard`) and then the root; its checkpoints are
written by DCP, one shard per rank, and read back at any world size (DCP reshards).

lmkiln writes only tensors through DCP (everything else goes to JSON); reading them back goes
through `lmkiln.runs.dcp`, whose unpickler admits nothing but DCP's own metadata classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkiln.config import Config
from lmkiln.runs.dcp import load_sharded_model, safe_reader, tensors_only_planner
from lmkiln.train.runtime import Runtime


def parallelize(
    model: nn.Module, cfg: Config, runtime: Runtime, find_unused_parameters: bool = False
) -> nn.Module:
    """The module forward/backward run through: DDP wrapper, FSDP2-sharded model, maybe compiled.

    Call before building the optimizer: FSDP2 turns parameters into sharded DTensors.
    """
    train_model = model
    if runtime.distributed and cfg.dist.strategy == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {}
        if runtime.autocast_dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=runtime.autocast_dtype, reduce_dtype=torch.float32
            )
        if cfg.dist.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in _blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    elif runtime.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=find_unused_parameters
        )
    elif cfg.dist.strategy == "fsdp":
        pass  # one process: nothing to shard
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    return train_model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (per-block sharding), wherever they sit in the module tree."""
    from lmkiln.model.transformer import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# --------------------------------------------------------------------------------------------
# Sharded checkpoints


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, list]:
    """(model tensors, optimizer state tensors, optimizer param_groups) in DCP's sharded form."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return model_state, optim_state["state"], optim_state["param_groups"]


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> list:
    """Every rank writes its shard into `directory`; returns the param_groups for JSON."""
    import torch.distributed.checkpoint as dcp

    model_state, optim_tensors, groups = sharded_state(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_tensors}, checkpoint_id=str(directory))
    return groups


def load_sharded(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, param_groups: list | None
) -> None:
    """Load a sharded checkpoint into a model (and optimizer) at this run's world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if optimizer is None:
        load_sharded_model(directory, model)
        return
    model_state, optim_tensors, groups = sharded_state(model, optimizer)
    dcp.load(
        {"model": model_state, "optim": optim_tensors},
        storage_reader=safe_reader(directory),
        planner=tensors_only_planner(),
    )
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict={"state": optim_tensors, "param_groups": param_groups or groups},
    )


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gathered, unsharded weights on CPU (collective: every rank calls it; only rank 0 gets them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
