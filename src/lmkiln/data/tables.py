"""Tables for supervised training: numeric feature columns and label column(s), split three ways.

Sources: `builtin:digits` (scikit-learn's bundled 8x8 handwritten digits: 1,797 images, 64 pixel
columns `pixel_0..pixel_63` with values 0..16, and a `label` column 0..9; no download), a `.csv`
file with a header line, or a `.parquet` file. Every cell is checked before training starts: a
missing column, a non-numeric or missing feature value, or a label that is not a valid class
raises `LmkilnError` naming the file, the line (CSV) or row (Parquet) and the column.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmkiln.config import TableConfig
from lmkiln.data.rows import open_rows
from lmkiln.errors import LmkilnError

BUILTIN_DIGITS = "builtin:digits"


@dataclass
class RawTable:
    """Columns as read: strings (CSV) or Python/NumPy values (digits, Parquet)."""

    columns: dict[str, list[Any]]
    source: str
    where: Callable[[int], str]
    """Row index (0-based, data rows only) → 'file.csv:12' / 'file.parquet: row 11' for messages."""

    @property
    def n_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


@dataclass
class Table:
    x: np.ndarray
    """(N, F) float32 features."""
    y: np.ndarray
    """(N,) int64 class ids, (N, L) float32 0/1 labels, or (N,)/(N, L) float32 regression targets."""
    feature_names: list[str]
    label_names: list[str]
    class_names: list[str]
    """Classification: the name of each class id (the label text, or the id itself)."""
    kind: str
    source: str

    @property
    def n_outputs(self) -> int:
        """Output width a model needs: classes, or label/target columns."""
        if self.kind == "classification":
            return len(self.class_names)
        return len(self.label_names)


# --------------------------------------------------------------------------------------------
# Reading


def read_table(path: str) -> RawTable:
    if path == BUILTIN_DIGITS:
        return _read_digits()
    file = Path(path).expanduser()
    if not file.is_file():
        raise LmkilnError(f"table not found: {path} (give a .csv or .parquet file, or '{BUILTIN_DIGITS}')")
    suffix = file.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise LmkilnError(f"{file}: unsupported table format {suffix!r}; use .csv or .parquet")
    return _read_file(file)


def _read_digits() -> RawTable:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LmkilnError(
            f"{BUILTIN_DIGITS} needs scikit-learn (it ships the images): pip install 'lmkiln[classic]'"
        ) from None
    digits = load_digits()
    columns: dict[str, list[Any]] = {f"pixel_{i}": list(digits.data[:, i]) for i in range(64)}
    columns["label"] = list(digits.target)
    return RawTable(columns, BUILTIN_DIGITS, lambda row: f"{BUILTIN_DIGITS} row {row}")


def _read_file(path: Path) -> RawTable:
    table = open_rows(path)
    numbers: list[int] = []
    columns: dict[str, list[Any]] = {name: [] for name in table.columns or []}
    for number, row in table.rows:
        numbers.append(number)
        for name in columns:
            columns[name].append(row[name])
    return RawTable(columns, str(path), lambda row: table.where(numbers[row]))


# --------------------------------------------------------------------------------------------
# Checking and converting


def _number(value: Any) -> float | None:
    """A cell as a float; None when it is not a number (NaN and empty cells are numbers: NaN)."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return math.nan
        try:
            return float(text)
        except ValueError:
            return None
    return None


def _numeric_column(raw: RawTable, name: str, role: str) -> np.ndarray:
    """(N,) float64; a text or missing/NaN cell is an error naming its row and column."""
    values = raw.columns[name]
    try:  # fast path: every cell converts and is finite
        out = np.asarray(values, dtype=np.float64)
        if np.isfinite(out).all():
            return out
    except (TypeError, ValueError):
        pass
    out = np.empty(len(values), dtype=np.float64)
    for row, value in enumerate(values):  # find the first bad cell, for the message
        number = _number(value)
        if number is None:
            raise LmkilnError(
                f"{raw.where(row)}: {role} column {name!r} holds {value!r}, not a number"
                + ("; leave it out with table.features" if role == "feature" else "")
            )
        if not math.isfinite(number):
            raise LmkilnError(
                f"{raw.where(row)}: {role} column {name!r} is {'missing' if value in (None, '') else number} "
                f"(NaN/missing values are not allowed; fill or drop the row)"
            )
        out[row] = number
    return out


def _class_ids(raw: RawTable, name: str, n_classes: int) -> tuple[np.ndarray, list[str]]:
    """Class ids and names: integer labels are ids, text labels are numbered in sorted order."""
    values = raw.columns[name]
    numbers = [_number(v) for v in values]
    missing = next((row for row, v in enumerate(values) if v is None or str(v).strip() == ""), None)
    if missing is not None:
        raise LmkilnError(f"{raw.where(missing)}: label column {name!r} is empty")
    if any(n is None for n in numbers):  # text labels: 'cat', 'dog', ...
        names = sorted({str(v).strip() for v in values})
        if n_classes and len(names) > n_classes:
            raise LmkilnError(
                f"{raw.source}: label column {name!r} has {len(names)} classes but mlp.outputs is "
                f"{n_classes}; set mlp.outputs=0 to take the table's count"
            )
        index = {text: i for i, text in enumerate(names)}
        return np.array([index[str(v).strip()] for v in values], dtype=np.int64), names
    for row, number in enumerate(numbers):
        if not (math.isfinite(number) and number.is_integer()):
            raise LmkilnError(
                f"{raw.where(row)}: label {values[row]!r} in column {name!r} is not a class id "
                f"(an integer); for regression targets set loss.name=mse"
            )
        if number < 0 or (n_classes and number >= n_classes):
            limit = f"[0, {n_classes}) (mlp.outputs={n_classes})" if n_classes else "[0, n_classes)"
            raise LmkilnError(f"{raw.where(row)}: label {int(number)} in column {name!r} is outside {limit}")
    ids = np.array(numbers, dtype=np.int64)
    count = n_classes or int(ids.max()) + 1
    return ids, [str(i) for i in range(count)]


def _multilabel(raw: RawTable, names: list[str]) -> np.ndarray:
    columns = []
    for name in names:
        column = _numeric_column(raw, name, "label")
        bad = np.flatnonzero((column != 0) & (column != 1))
        if len(bad):
            raise LmkilnError(
                f"{raw.where(int(bad[0]))}: label column {name!r} holds {column[bad[0]]:g}; multi-label "
                f"targets must be 0 or 1"
            )
        columns.append(column)
    return np.stack(columns, axis=1).astype(np.float32)


def load_table(cfg: TableConfig, kind: str, n_classes: int = 0) -> Table:
    """Read and check a table; `n_classes` > 0 fixes the class count (labels must be below it)."""
    raw = read_table(cfg.path)
    if raw.n_rows == 0:
        raise LmkilnError(f"{raw.source}: the table has no rows")
    available = list(raw.columns)
    for name in [*cfg.label, *cfg.features]:
        if name not in raw.columns:
            role = "label" if name in cfg.label else "feature"
            setting = "table.label" if role == "label" else "table.features"
            raise LmkilnError(
                f"{raw.source}: no {role} column {name!r} (columns: {_shorten(available)}); set {setting}"
            )
    if not cfg.label:
        raise LmkilnError("table.label is empty; name the column(s) that hold the targets")
    features = list(cfg.features) or [name for name in available if name not in cfg.label]
    if not features:
        raise LmkilnError(f"{raw.source}: no feature columns besides the label {cfg.label}")
    x = np.stack([_numeric_column(raw, name, "feature") for name in features], axis=1).astype(np.float32)
    class_names: list[str] = []
    if kind == "classification":
        if len(cfg.label) != 1:
            raise LmkilnError(
                f"classification takes one label column, got {cfg.label}; for several 0/1 label "
                f"columns set loss.name=bce"
            )
        y, class_names = _class_ids(raw, cfg.label[0], n_classes)
    elif kind == "multilabel":
        y = _multilabel(raw, list(cfg.label))
    else:
        columns = [_numeric_column(raw, name, "target") for name in cfg.label]
        y = (columns[0] if len(columns) == 1 else np.stack(columns, axis=1)).astype(np.float32)
    return Table(x, y, features, list(cfg.label), class_names, kind, raw.source)


def _shorten(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------
# Splits and scaling


@dataclass
class Split:
    x: np.ndarray
    y: np.ndarray
    rows: np.ndarray
    """Row numbers in the table (0-based), for tracing a prediction back to its row."""


def split_table(table: Table, cfg: TableConfig) -> dict[str, Split]:
    """Seeded train/val/test split of the rows (test first, then validation, the rest trains)."""
    n = len(table.x)
    if not (0 <= cfg.val_fraction < 1 and 0 <= cfg.test_fraction < 1):
        raise LmkilnError("table.val_fraction and table.test_fraction must be in [0, 1)")
    n_test, n_val = round(n * cfg.test_fraction), round(n * cfg.val_fraction)
    if n - n_test - n_val < 1:
        raise LmkilnError(
            f"{table.source}: {n} rows leave nothing to train on after the validation "
            f"({n_val}) and test ({n_test}) rows; lower table.val_fraction or table.test_fraction"
        )
    order = np.random.default_rng(cfg.seed).permutation(n)
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {name: Split(table.x[rows], table.y[rows], rows) for name, rows in parts.items()}


def standardize(splits: dict[str, Split]) -> tuple[np.ndarray, np.ndarray]:
    """Scale every split with the training rows' mean and standard deviation (constant columns: 1)."""
    train = splits["train"].x
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std == 0] = 1.0
    for split in splits.values():
        split.x = ((split.x - mean) / std).astype(np.float32)
    return mean, std
