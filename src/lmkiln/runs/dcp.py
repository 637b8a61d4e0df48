"""Reading Distributed Checkpoint (DCP) shards of FSDP runs without trusting a pickle.

DCP stores its index as a pickle (`.metadata`) and would unpickle non-tensor values with
`weights_only=False`. lmkiln writes only tensors through DCP (everything else goes to JSON) and
reads the index with an unpickler that admits nothing but DCP's own metadata classes. Writing
shards is training's job (`lmkiln.train.distributed`); reading them in one process (export,
inference) happens here.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkiln.errors import LmkilnError


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes DCP's `.metadata` index is made of (no callables, no builtins)."""

    ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    ALLOWED = {
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED or (module in self.ALLOWED_MODULES and not name.startswith("__")):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


def safe_reader(directory: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            data = (Path(self.path) / ".metadata").read_bytes()
            try:
                metadata = _MetadataUnpickler(io.BytesIO(data)).load()
            except Exception as err:  # noqa: BLE001 - any failure means a file we must not trust
                raise LmkilnError(f"{directory}/.metadata: refused ({err})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(directory))


def tensors_only_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # lmkiln never writes non-tensor items
            raise LmkilnError(
                f"unexpected non-tensor item {read_item.dest_index.fqn} in a sharded checkpoint"
            )

    return TensorsOnly()


def load_sharded_model(directory: Path, model: nn.Module) -> None:
    """Load the model tensors of a sharded checkpoint into `model` (sharded or not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model_state = get_model_state_dict(model)
    dcp.load({"model": model_state}, storage_reader=safe_reader(directory), planner=tensors_only_planner())
    set_model_state_dict(model, model_state)


def consolidate(directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights of a sharded checkpoint, read in one process (for export and inference)."""
    load_sharded_model(directory, model)
    return dict(model.state_dict())
