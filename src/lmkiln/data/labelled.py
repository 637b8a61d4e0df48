"""Labelled examples (x, y) for supervised training, taken by index into micro-batches.

Two sources: arrays (`TensorExamples`, e.g. a feature matrix and a label vector) and any map-style
`torch.utils.data.Dataset` of (x, y) pairs (`DatasetExamples`, e.g. images with a transform).
`EpochBatches` deals out indices; `collate` turns them into {"x", "y", "weight", "examples"}.

Targets come in three kinds, each with its own dtype:
    classification  y (N,) int64 class ids
    multilabel      y (N, L) float 0/1
    regression      y (N,) or (N, L) float
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lmkiln.errors import LmkilnError

KINDS = ("classification", "multilabel", "regression")


def to_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise LmkilnError(f"cannot make a tensor of {type(value).__name__}: {err}") from None


def as_features(x: torch.Tensor) -> torch.Tensor:
    """float64 features become float32 (the models' dtype); integer inputs (ids) stay as they are."""
    return x.float() if x.is_floating_point() else x


def _targets(y: torch.Tensor, kind: str, what: str) -> torch.Tensor:
    if kind != "classification":
        return y.float()
    if y.is_floating_point():
        whole = torch.isfinite(y) & (y == y.round())
        if not bool(whole.all()):
            row = int((~whole).nonzero()[0][0])
            raise LmkilnError(
                f"{what}: example {row} has label {y.reshape(len(y), -1)[row].tolist()}, not a class id; "
                f"for regression targets use the mse or huber loss"
            )
    if y.ndim != 1:
        raise LmkilnError(
            f"{what}: class labels must be one id per example, got shape {tuple(y.shape)}; "
            f"for several 0/1 labels per example use the bce loss"
        )
    return y.long()


def first_nan(x: torch.Tensor) -> tuple[int, int] | None:
    """(example, feature) of the first NaN/Inf in a floating (N, ...) tensor, or None."""
    if not x.is_floating_point():
        return None
    bad = ~torch.isfinite(x.reshape(len(x), -1))
    if not bool(bad.any()):
        return None
    row, column = bad.nonzero()[0].tolist()
    return row, column


def _check_finite(x: torch.Tensor, what: str, rows: Sequence[int] | None = None) -> None:
    found = first_nan(x)
    if found is not None:
        row, column = found
        row = rows[row] if rows is not None else row
        value = x.reshape(len(x), -1)[found[0], column].item()
        raise LmkilnError(
            f"{what}: example {row}, feature {column} is {value} (features must be finite numbers; "
            f"fill or drop missing values first)"
        )


class Examples(ABC):
    """Indexable (x, y) pairs; subclasses implement `__len__` and `take`."""

    def __init__(self, kind: str, what: str) -> None:
        if kind not in KINDS:
            raise LmkilnError(f"unknown target kind {kind!r}; valid: {', '.join(KINDS)}")
        self.kind, self.what = kind, what
        self.n_classes = 0
        """When set (classification), labels outside [0, n_classes) are an error."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def take(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (B, ...), y (B, ...)) of these examples."""

    def check_labels(self, n_classes: int) -> None:
        """Classification: every label must be a class of a model with `n_classes` outputs."""
        self.n_classes = n_classes


def _check_label_range(y: torch.Tensor, n_classes: int, what: str, rows: Sequence[int]) -> None:
    bad = (y < 0) | (y >= n_classes)
    if bool(bad.any()):
        at = int(bad.nonzero()[0][0])
        raise LmkilnError(
            f"{what}: example {rows[at]} has label {int(y[at])}, outside [0, {n_classes}) "
            f"(the model has {n_classes} outputs)"
        )


class TensorExamples(Examples):
    """Examples held as two tensors (or arrays) with one row per example."""

    def __init__(self, x: Any, y: Any, kind: str, what: str = "data") -> None:
        super().__init__(kind, what)
        self.x, self.y = as_features(to_tensor(x)), _targets(to_tensor(y), kind, what)
        if self.x.ndim == 0 or len(self.x) != len(self.y):
            raise LmkilnError(
                f"{what}: features have {len(self.x) if self.x.ndim else 0} rows but targets have "
                f"{len(self.y)}; give one target per example"
            )
        if len(self.x) == 0:
            raise LmkilnError(f"{what} is empty")
        _check_finite(self.x, what)
        if kind != "classification":
            _check_finite(self.y, f"{what} (targets)")

    def __len__(self) -> int:
        return len(self.x)

    def take(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(indices, dtype=torch.long)
        return self.x[index], self.y[index]

    def check_labels(self, n_classes: int) -> None:
        super().check_labels(n_classes)
        _check_label_range(self.y, n_classes, self.what, range(len(self.y)))


class DatasetExamples(Examples):
    """A map-style Dataset whose items are (x, y) pairs; checked batch by batch as it is read."""

    def __init__(self, dataset: Any, kind: str, what: str = "data") -> None:
        super().__init__(kind, what)
        self.dataset = dataset
        if len(dataset) == 0:
            raise LmkilnError(f"{what} is empty")

    def __len__(self) -> int:
        return len(self.dataset)

    def take(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for index in indices:
            item = self.dataset[index]
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise LmkilnError(f"{self.what}: item {index} is not an (x, y) pair")
            xs.append(to_tensor(item[0]))
            ys.append(to_tensor(item[1]))
        x, y = as_features(torch.stack(xs)), _targets(torch.stack(ys), self.kind, self.what)
        _check_finite(x, self.what, indices)
        if self.n_classes:
            _check_label_range(y, self.n_classes, self.what, indices)
        return x, y


def as_examples(data: Any, kind: str, what: str) -> Examples:
    """(x, y) arrays/tensors, a Dataset of (x, y) pairs, or Examples as they are."""
    if isinstance(data, Examples):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return TensorExamples(data[0], data[1], kind, what)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return DatasetExamples(data, kind, what)
    raise LmkilnError(
        f"{what}: expected an (x, y) pair of arrays/tensors or a Dataset of (x, y) pairs, "
        f"got {type(data).__name__}"
    )


def collate(examples: Examples, indices: list[int]) -> dict[str, Any]:
    """One micro-batch: {"x", "y", "weight" (B,), "examples": int}.

    Padding slots (-1) are left out. A micro-batch of padding only keeps one example with weight
    0: every process must still run forward and backward, or distributed training would hang.
    """
    real = [i for i in indices if i >= 0]
    weight = torch.ones(len(real))
    if not real:
        real, weight = [0], torch.zeros(1)
    x, y = examples.take(real)
    return {"x": x, "y": y, "weight": weight, "examples": int(weight.sum())}
