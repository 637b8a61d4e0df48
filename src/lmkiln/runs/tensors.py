"""A model's tensors as checkpoints hold them: tied weights once, loaded back with a clear error."""

from __future__ import annotations

import torch
from torch import nn

from lmkiln.errors import LmkilnError


def tied_aliases(model: nn.Module) -> set[str]:
    """Parameter names that are a second name of an earlier parameter (tied weights)."""
    seen: set[int] = set()
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def model_tensors(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict (or a gathered one) with tied weights stored once (safetensors refuses shared storage)."""
    aliases = tied_aliases(model)
    state = model.state_dict() if state is None else state
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load checkpoint tensors into `model`, refusing (naming `source`) any that do not fit."""
    expected = set(model_tensors(model))
    missing, unexpected = expected - set(tensors), set(tensors) - set(model.state_dict())
    if missing or unexpected:
        raise LmkilnError(
            f"{source}: weights do not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); was it saved from a different model shape?"
        )
    for name, tensor in tensors.items():
        if model.state_dict()[name].shape != tensor.shape:
            raise LmkilnError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(model.state_dict()[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
