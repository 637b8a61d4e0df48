"""lmkiln: build language models from scratch and fine-tune them.

Importing lmkiln is cheap and has no side effects; heavy modules (torch, transformers, peft) load
only when the code that needs them runs. `lmkiln.Trainer` (fit any nn.Module with lmkiln's
training loop) is imported on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {"Trainer": "lmkiln.train.supervised"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmkiln' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
