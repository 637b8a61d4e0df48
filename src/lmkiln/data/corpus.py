"""Corpus readers: turn a corpus spec into a stream of documents.

A spec is `builtin:pydoc`, a file (.txt, .jsonl, .csv, .parquet), a directory (every supported
file below it) or a glob. Everything streams document by document, so a corpus larger than RAM
works (except `.txt` with text_unit=file, which holds one file at a time). Bad input raises
`LmkilnError` naming the file and line.
"""

from __future__ import annotations

import csv
import glob as globlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from lmkiln.errors import LmkilnError

BUILTIN_PYDOC = "builtin:pydoc"
SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".csv", ".parquet")


class Document(NamedTuple):
    # A named tuple, not a dataclass: a corpus yields one per paragraph or line, and a frozen
    # dataclass's __init__ cost a third of reading a corpus of short paragraphs.
    key: str
    """Stable identity (source and position), used for the seeded train/validation split."""
    text: str


def resolve_sources(spec: str) -> list[Path]:
    """The files a corpus spec names, sorted; raises if there are none."""
    if spec == BUILTIN_PYDOC:
        return []
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise LmkilnError(f"corpus directory {path} holds no {'/'.join(SUFFIXES)} files")
        return files
    if any(ch in spec for ch in "*?["):
        files = sorted(
            Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file()
        )
        if not files:
            raise LmkilnError(f"corpus glob {spec!r} matches no files")
        return files
    raise LmkilnError(f"corpus not found: {spec} (give a file, directory, glob or 'builtin:pydoc')")


def source_fingerprints(spec: str) -> list[list]:
    """What identifies the corpus contents for caching: path, size and modification time per file."""
    if spec == BUILTIN_PYDOC:
        from pydoc_data import topics

        digest = hashlib.sha256("".join(topics.topics.values()).encode()).hexdigest()[:16]
        return [[BUILTIN_PYDOC, sys.version.split()[0], digest]]
    out = []
    for path in resolve_sources(spec):
        stat = path.stat()
        out.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def iter_documents(
    spec: str, field: str = "text", text_unit: str = "paragraph", keep_empty: bool = False
) -> Iterator[Document]:
    """Every non-empty document of a corpus (every one with keep_empty), in a deterministic order."""
    if spec == BUILTIN_PYDOC:
        from pydoc_data import topics

        for name in sorted(topics.topics):
            yield Document(f"pydoc:{name}", topics.topics[name])
        return
    base = _key_base(spec)
    for path in resolve_sources(spec):
        suffix = path.suffix.lower()
        # keys name the file relative to the corpus root, so moving a corpus keeps its split
        name = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.name
        if suffix in (".jsonl", ".json"):
            reader = _read_jsonl(path, name, field)
        elif suffix == ".csv":
            reader = _read_csv(path, name, field)
        elif suffix == ".parquet":
            reader = _read_parquet(path, name, field)
        else:
            reader = _read_text(path, name, text_unit)
        for doc in reader:
            if keep_empty or doc.text.strip():
                yield doc


def _key_base(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    parts = []
    for part in path.parts:  # a glob: the directories before the first wildcard
        if any(ch in part for ch in "*?["):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


READ_BLOCK = 1 << 23  # bytes decoded at once: decoding line by line cost more than encoding the text


def _decoded_blocks(path: Path) -> Iterator[tuple[int, str]]:
    """(number of its first line, text) of consecutive blocks of whole lines, decoded strictly.

    Lines end at "\n" only (as iterating a binary file does). Blocks of whole lines are decoded at
    once; a block that fails is decoded again line by line to name the bad line.
    """
    number, offset, pending = 1, 0, b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(READ_BLOCK)
            data = pending + chunk
            cut = len(data) if not chunk else data.rfind(b"\n") + 1
            block, pending = data[:cut], data[cut:]
            if block:
                text = _decode_block(path, block, number - 1, offset)
                if number == 1 and text.startswith("\ufeff"):
                    text = text[1:]  # a byte-order mark is not text
                yield number, text
                number += text.count("\n")
                offset += len(block)
            if not chunk:
                return


def decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for each line, keeping its "\n"."""
    for first, text in _decoded_blocks(path):
        lines = text.split("\n")
        tail = lines.pop()  # "" after a final newline, else the file's last line
        yield from enumerate((line + "\n" for line in lines), start=first)
        if tail:
            yield first + len(lines), tail


# A run of blank lines after a line's "\n" ([^\S\n] is what str.strip() removes, less "\n"). Anchoring
# on the "\n" instead of `^` with re.MULTILINE makes the split 3x faster.
_BLANK_RUN = re.compile(r"\n((?:[^\S\n]*\n)+)")
_LEADING_BLANK = re.compile(r"(?:[^\S\n]*\n)+")


def _paragraphs(path: Path, name: str) -> Iterator[Document]:
    """Runs of non-blank lines: one regex split per block (a loop over lines is several times slower)."""
    pending, pending_line, where = "", 0, f"{name}:"
    for first, text in _decoded_blocks(path):
        if not text.endswith("\n"):
            text += "\n"  # the file's last line: closing it changes no paragraph's text
        line = first  # the number of the line the current piece starts at
        leading = _LEADING_BLANK.match(text)
        if leading:  # blank lines that open the block end a paragraph begun in the block before
            if pending:
                yield Document(where + str(pending_line), pending.rstrip("\r\n"))
                pending = ""
            line += leading.group().count("\n")
            text = text[leading.end() :]
        # [paragraph, blank run, paragraph, blank run, ..., the rest]; the "\n" that ends each
        # paragraph's last line belongs to neither piece
        pieces = _BLANK_RUN.split(text)
        for index in range(0, len(pieces) - 1, 2):
            paragraph, blank = pieces[index], pieces[index + 1]
            if not pending:
                pending_line = line
            pending += paragraph
            yield Document(where + str(pending_line), pending.rstrip("\r\n"))
            pending = ""
            line += paragraph.count("\n") + 1 + blank.count("\n")
        if pieces[-1]:  # a paragraph that may go on in the next block
            if not pending:
                pending_line = line
            pending += pieces[-1]
    if pending:
        yield Document(where + str(pending_line), pending.rstrip("\r\n"))


def _decode_block(path: Path, block: bytes, lines_before: int, offset: int) -> str:
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError:
        pass
    raw_lines = [line + b"\n" for line in block.split(b"\n")]
    for number, raw in enumerate(raw_lines, start=lines_before + 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise LmkilnError(
                f"{path}:{number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte offset "
                f"{offset + err.start} of the file); convert the file to UTF-8"
            ) from None
        offset += len(raw)
    raise AssertionError("a block that failed to decode has no bad line")


# Each reader yields Documents keyed `name` + position; `path` is only read and named in errors.


def _read_text(path: Path, name: str, text_unit: str) -> Iterator[Document]:
    if text_unit == "file":
        yield Document(name, "".join(text for _, text in _decoded_blocks(path)))
        return
    if text_unit == "line":
        for number, line in decoded_lines(path):
            yield Document(f"{name}:{number}", line.rstrip("\r\n"))
        return
    yield from _paragraphs(path, name)


def _field_text(value: object, path: Path, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    raise LmkilnError(f"{path}:{where}: field {field!r} must be a string, got {type(value).__name__}")


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line; a bad line raises naming path:line."""
    for number, line in decoded_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LmkilnError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise LmkilnError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _read_jsonl(path: Path, name: str, field: str) -> Iterator[Document]:
    for number, row in jsonl_rows(path):
        if field not in row:
            raise LmkilnError(
                f"{path}:{number}: no field {field!r} (fields: {', '.join(row) or 'none'}); "
                f"choose one with --data.field"
            )
        yield Document(f"{name}:{number}", _field_text(row[field], path, str(number), field))


def _read_csv(path: Path, name: str, field: str) -> Iterator[Document]:
    csv.field_size_limit(2**31 - 1)
    lines = (line for _, line in decoded_lines(path))
    reader = csv.DictReader(lines)
    if reader.fieldnames is None:
        return
    if field not in reader.fieldnames:
        raise LmkilnError(
            f"{path}:1: no column {field!r} (columns: {', '.join(reader.fieldnames)}); "
            f"choose one with --data.field"
        )
    for row in reader:
        yield Document(f"{name}:{reader.line_num}", row[field] or "")


def _read_parquet(path: Path, name: str, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LmkilnError(f"reading {path} needs pyarrow: pip install 'lmkiln[data]'") from None
    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise LmkilnError(
            f"{path}: no column {field!r} (columns: {', '.join(columns)}); choose one with --data.field"
        )
    row = 0
    for batch in parquet.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is not None:
                yield Document(f"{name}:row{row}", _field_text(value, path, f"row {row}", field))
