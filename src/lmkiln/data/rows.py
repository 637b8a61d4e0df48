"""Rows of a table file — `.csv` with a header line, `.parquet`, `.jsonl` — read in one place.

Corpora (a text column), task files for fine-tuning and evaluation (fields per row) and tables
for supervised training (numeric columns) all read their files here. Every row comes with a
number that locates it in messages: the line for `.csv` and `.jsonl` (`file.csv:12`), the 1-based
row for `.parquet` (`file.parquet:row 12`). A malformed file (no header, duplicate column names,
a line with the wrong number of fields, a line that is not a JSON object) stops with one line
naming the file and line.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkiln.data.textfile import decoded_lines, jsonl_rows
from lmkiln.errors import LmkilnError

ROW_SUFFIXES = (".csv", ".parquet", ".jsonl", ".json")


@dataclass
class RowFile:
    path: Path
    columns: list[str] | None
    """Column names (.csv header, .parquet schema), or None for .jsonl (each row has its own keys)."""
    rows: Iterator[tuple[int, dict[str, Any]]]
    """(number, row) pairs, read lazily: the file streams."""

    def where(self, number: int) -> str:
        """`file.csv:12` or `file.parquet:row 12`."""
        return (
            f"{self.path}:row {number}" if self.path.suffix.lower() == ".parquet" else f"{self.path}:{number}"
        )


def open_rows(path: str | Path, columns: Sequence[str] | None = None) -> RowFile:
    """The rows of a table file; `columns` narrows what a .parquet file reads (others read all)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmkilnError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path, columns)
    if suffix in (".jsonl", ".json"):
        return RowFile(path, None, jsonl_rows(path))
    raise LmkilnError(f"{path}: unsupported table file; use {', '.join(ROW_SUFFIXES)}")


def _csv_rows(path: Path) -> RowFile:
    csv.field_size_limit(2**31 - 1)
    # strict: an unterminated quote is an error at its line, not the rest of the file in one field
    reader = csv.reader((line for _, line in decoded_lines(path)), strict=True)
    header = _next_csv_row(reader, path)
    if not header:
        raise LmkilnError(f"{path}: empty file; expected a header line with column names")
    header = [name.strip() for name in header]
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise LmkilnError(f"{path}:1: duplicate column names {duplicates}")

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        while (row := _next_csv_row(reader, path)) is not None:
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                raise LmkilnError(
                    f"{path}:{reader.line_num}: {len(row)} fields, but the header has {len(header)} columns"
                )
            yield reader.line_num, dict(zip(header, row))

    return RowFile(path, header, rows())


def _next_csv_row(reader: Any, path: Path) -> list[str] | None:
    start = reader.line_num + 1  # where the record begins: an unterminated quote fails at the end
    try:
        return next(reader, None)
    except csv.Error as err:
        raise LmkilnError(
            f'{path}:{start}: not valid CSV ({err}); an opening quote " needs a closing one'
        ) from None


def _parquet_rows(path: Path, columns: Sequence[str] | None) -> RowFile:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LmkilnError(f"reading {path} needs pyarrow: pip install 'lmkiln[data]'") from None

    def unreadable(err: Exception) -> LmkilnError:
        return LmkilnError(f"{path}: not a readable parquet file ({err}); check the file or its suffix")

    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as err:
        raise unreadable(err) from None
    names = list(parquet.schema_arrow.names)
    wanted = [c for c in columns if c in names] if columns is not None else None

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        number = 0
        try:
            for batch in parquet.iter_batches(columns=wanted, batch_size=4096):
                for values in batch.to_pylist():
                    number += 1
                    yield number, values
        except pa.ArrowException as err:
            raise unreadable(err) from None

    return RowFile(path, names, rows())
