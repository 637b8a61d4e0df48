"""Encoder training data: JSONL rows of (query, positive) pairs or (text, label) rows, tokenized
by the encoder's own tokenizer and padded into batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmkiln.data.textfile import jsonl_rows
from lmkiln.errors import LmkilnError


def read_jsonl(
    path: str | Path,
    fields: tuple[str, ...],
    optional: tuple[str, ...] = (),
    flags: dict[str, str] | None = None,
) -> list[dict]:
    """Rows of a JSONL file with the given fields; each row also gets `_line` (1-based).

    Text fields must be strings; a bad line raises LmkilnError naming path:line. `flags` maps a
    field to the command-line flag that names it (for commands that do not take config keys).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmkilnError(f"data file not found: {path}")
    rows = []
    for number, row in jsonl_rows(path):
        missing = [f for f in fields if f not in row]
        if missing:
            raise LmkilnError(
                f"{path}:{number}: no field {missing[0]!r} (fields: {', '.join(row) or 'none'}); "
                f"name the right one with {_flag(missing[0], flags)} NAME"
            )
        kept = {f: row[f] for f in (*fields, *optional) if f in row}
        kept["_line"] = number
        rows.append(kept)
    if not rows:
        raise LmkilnError(f"{path} holds no examples")
    return rows


def _flag(field: str, flags: dict[str, str] | None) -> str:
    if flags and field in flags:
        return flags[field]
    key = {"query": "query_field", "positive": "positive_field", "label": "label_field"}.get(
        field, "text_field"
    )
    return f"--encoder.{key}"


def require_text(row: dict, field: str, path: str | Path) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise LmkilnError(
            f"{path}:{row['_line']}: field {field!r} must be a string, got {type(value).__name__}"
        )
    return value


def label_names(values: list) -> list[str]:
    """Sorted class names; integer labels sort numerically (0, 1, 2, …, 10)."""
    unique = set(values)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in unique):
        return [str(v) for v in sorted(unique)]
    return sorted(str(v) for v in unique)


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and attention mask (B, T)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask
