"""Reading text files strictly as UTF-8: blocks of whole lines, numbered lines, JSON lines.

Every reader of lmkiln's inputs (corpora, task files, tables) goes through here, so a byte that
is not UTF-8 or a line that is not JSON is reported the same way: file, line and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmkiln.errors import LmkilnError

READ_BLOCK = 1 << 23  # bytes decoded at once: decoding line by line cost more than encoding the text


def decoded_blocks(path: Path) -> Iterator[tuple[int, str]]:
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
    for first, text in decoded_blocks(path):
        lines = text.split("\n")
        tail = lines.pop()  # "" after a final newline, else the file's last line
        yield from enumerate((line + "\n" for line in lines), start=first)
        if tail:
            yield first + len(lines), tail


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
