"""Corpus readers: turn a corpus spec into a stream of documents.

A spec is `builtin:pydoc` (Python's reference manual), `builtin:stdlib` (that manual plus every
docstring of the standard library), a file (.txt, .jsonl, .csv, .parquet), a directory (every supported
file below it) or a glob. Everything streams document by document, so a corpus larger than RAM
works (except `.txt` with text_unit=file, which holds one file at a time). Bad input raises
`LmkilnError` naming the file and line.
"""

from __future__ import annotations

import ast
import functools
import glob as globlib
import hashlib
import os
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from lmkiln.data.rows import open_rows
from lmkiln.data.textfile import decoded_blocks, decoded_lines, jsonl_rows
from lmkiln.errors import LmkilnError

BUILTIN_PYDOC = "builtin:pydoc"
BUILTIN_STDLIB = "builtin:stdlib"
BUILTINS = (BUILTIN_PYDOC, BUILTIN_STDLIB)
SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".csv", ".parquet")


class Document(NamedTuple):
    # A named tuple, not a dataclass: a corpus yields one per paragraph or line, and a frozen
    # dataclass's __init__ cost a third of reading a corpus of short paragraphs.
    key: str
    """Stable identity (source and position), used for the seeded train/validation split."""
    text: str


def resolve_sources(spec: str) -> list[Path]:
    """The files a corpus spec names, sorted; raises if there are none."""
    if spec in BUILTINS:
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
    raise LmkilnError(
        f"corpus not found: {spec} (give a file, directory, glob, 'builtin:pydoc' or 'builtin:stdlib')"
    )


def source_fingerprints(spec: str) -> list[list]:
    """What identifies the corpus contents for caching: path, size and modification time per file."""
    if spec == BUILTIN_PYDOC:
        return [[BUILTIN_PYDOC, sys.version.split()[0], _pydoc_digest()]]
    if spec == BUILTIN_STDLIB:
        # sizes, not contents: parsing every file only to fingerprint them would cost seconds
        listing = "\n".join(f"{name}\t{path.stat().st_size}" for name, path in _stdlib_files(_stdlib_root()))
        digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
        return [[BUILTIN_STDLIB, sys.version.split()[0], digest, _pydoc_digest()]]
    out = []
    for path in resolve_sources(spec):
        stat = path.stat()
        out.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def iter_documents(
    spec: str, field: str = "text", text_unit: str = "paragraph", keep_empty: bool = False
) -> Iterator[Document]:
    """Every non-empty document of a corpus (every one with keep_empty), in a deterministic order."""
    if spec in BUILTINS:
        yield from _pydoc_topics()
        if spec == BUILTIN_STDLIB:
            yield from _stdlib_docstrings()
        return
    base = _key_base(spec)
    for path in resolve_sources(spec):
        suffix = path.suffix.lower()
        # keys name the file relative to the corpus root, so moving a corpus keeps its split
        name = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.name
        if suffix in (".jsonl", ".json"):
            reader = _read_jsonl(path, name, field)
        elif suffix in (".csv", ".parquet"):
            reader = _read_table(path, name, field)
        else:
            reader = _read_text(path, name, text_unit)
        for doc in reader:
            if keep_empty or doc.text.strip():
                yield doc


def _pydoc_topics() -> Iterator[Document]:
    from pydoc_data import topics

    for name in sorted(topics.topics):
        yield Document(f"pydoc:{name}", topics.topics[name])


def _pydoc_digest() -> str:
    from pydoc_data import topics

    return hashlib.sha256("".join(topics.topics.values()).encode()).hexdigest()[:16]


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> list[tuple[str, Path]]:
    """(path relative to the standard library's root, path) of its .py files, sorted; no site-packages."""
    files = []
    for path in root.rglob("*.py"):
        name = path.relative_to(root).as_posix()
        if not name.startswith(("site-packages/", "dist-packages/")) and path.is_file():
            files.append((name, path))
    return sorted(files)


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _stdlib_docstrings() -> Iterator[Document]:
    """Module, class and function docstrings, keyed `stdlib:json/decoder.py:42` (the docstring's line)."""
    yield from _parsed_stdlib(_stdlib_root())


@functools.cache
def _parsed_stdlib(root: Path) -> tuple[Document, ...]:
    """Parsed once per process: training the tokenizer and writing the shards both read the corpus,
    and parsing ~1,900 files takes seconds (the ~3 MB of text is cheap to keep)."""
    return tuple(_read_stdlib_docstrings(root))


def _read_stdlib_docstrings(root: Path) -> Iterator[Document]:
    for name, path in _stdlib_files(root):
        try:
            with warnings.catch_warnings():  # old files' invalid escapes: nothing the user can fix
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes(), filename=name)
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue  # the test suite ships a few deliberately broken files
        # ast.walk is breadth-first; sorting by line keeps a file's docstrings in reading order
        found = []
        for node in ast.walk(tree):
            if isinstance(node, _DOCUMENTED):
                text = ast.get_docstring(node)
                if text and text.strip():
                    found.append((node.body[0].lineno, text))
        for line, text in sorted(found):
            yield Document(f"stdlib:{name}:{line}", text)


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


# A run of blank lines after a line's "\n" ([^\S\n] is what str.strip() removes, less "\n"). Anchoring
# on the "\n" instead of `^` with re.MULTILINE makes the split 3x faster.
_BLANK_RUN = re.compile(r"\n((?:[^\S\n]*\n)+)")
_LEADING_BLANK = re.compile(r"(?:[^\S\n]*\n)+")


def _paragraphs(path: Path, name: str) -> Iterator[Document]:
    """Runs of non-blank lines: one regex split per block (a loop over lines is several times slower)."""
    pending, pending_line, where = "", 0, f"{name}:"
    for first, text in decoded_blocks(path):
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


# Each reader yields Documents keyed `name` + position; `path` is only read and named in errors.


def _read_text(path: Path, name: str, text_unit: str) -> Iterator[Document]:
    if text_unit == "file":
        yield Document(name, "".join(text for _, text in decoded_blocks(path)))
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


def _read_jsonl(path: Path, name: str, field: str) -> Iterator[Document]:
    for number, row in jsonl_rows(path):
        if field not in row:
            raise LmkilnError(
                f"{path}:{number}: no field {field!r} (fields: {', '.join(row) or 'none'}); "
                f"choose one with --data.field"
            )
        yield Document(f"{name}:{number}", _field_text(row[field], path, str(number), field))


def _read_table(path: Path, name: str, field: str) -> Iterator[Document]:
    """The `field` column of a .csv or .parquet file, one document per row."""
    table = open_rows(path, columns=[field])
    if field not in table.columns:
        where = f"{path}:1" if path.suffix.lower() == ".csv" else str(path)
        raise LmkilnError(
            f"{where}: no column {field!r} (columns: {', '.join(table.columns)}); choose one with --data.field"
        )
    parquet = path.suffix.lower() == ".parquet"
    for number, row in table.rows:
        value = row[field]
        if parquet and value is None:
            continue
        key, where = (
            (f"{name}:row{number}", f"row {number}") if parquet else (f"{name}:{number}", str(number))
        )
        yield Document(key, _field_text(value or "", path, where, field))
