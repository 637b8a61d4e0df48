"""A model's tensors as checkpoints hold them: tied weights once, loaded back with a clear error."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

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


# --------------------------------------------------------------------------------------------
# safetensors files: errors a user can cause (a full disk, a truncated download) as one line.


def _os_error(err: Exception, path: Path) -> OSError:
    """safetensors reports I/O errors as SafetensorError('... Os { code: 28, ... }'); recover errno."""
    match = re.search(r"(?:code: |os error )(\d+)", str(err))
    code = int(match.group(1)) if match else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors.torch.save_file, with a failed write raised as the OSError it is."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        raise _os_error(err, Path(path)) from None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors.torch.load_file; a corrupt or truncated file is an LmkilnError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise LmkilnError(
            f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt — "
            f"copy or save it again"
        ) from None


def check_tensor_file(path: str | Path) -> None:
    """Read a safetensors file's header and check its size against it, without loading the data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except SafetensorError as err:
        raise LmkilnError(
            f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt — "
            f"copy or save it again"
        ) from None
