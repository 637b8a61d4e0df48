"""Writing files so that a crash never leaves a half-written one: the one atomic-write helper.

A file is written under a temporary name next to its destination, flushed to disk and renamed
over it (a rename within a directory is atomic on POSIX), and the directory entry is synced.
Directories that must appear whole (checkpoints, shard sets, tokenizers) are written the same way
one level up: into `NAME.tmp…/`, then renamed (see `lmkiln.runs.checkpoint`, `lmkiln.data.shards`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any


def naming(err: OSError, path: str | Path) -> OSError:
    """`err` with `path` as its file name when it has none (a failed write() names no file), so
    the one-line message can say where the disk was full."""
    if err.filename is not None:
        return err
    return type(err)(err.errno, err.strerror or str(err), str(path))


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename into it); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s content to; on success it replaces `path` at once.

    The temporary name keeps the suffix (tools such as matplotlib pick the format from it); on
    an error it is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise naming(err, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A temporary directory to fill; on success it is renamed to `path`.

    If `path` exists by then (another process wrote the same content first, as with a cached
    tokenizer), that one is kept and the temporary copy removed.
    """
    import shutil

    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if not path.is_dir():
            raise naming(err, path) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | Path, value: Any, indent: int = 1) -> Path:
    return write_atomic(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# Undo on failure: what a failing command had started is removed, so nothing is left half-written.
# The CLI wraps each command in `cleanup_on_failure()`; library code registers undo steps with
# `on_failure` (a no-op outside such a block, e.g. when the library is used from Python).

_undo_stack: list[list[Callable[[], None]]] = []


def on_failure(undo: Callable[[], None]) -> None:
    """Run `undo` if the current command fails (in reverse order of registration)."""
    if _undo_stack:
        _undo_stack[-1].append(undo)


@contextmanager
def cleanup_on_failure() -> Iterator[None]:
    """Run the registered undo steps when the block raises (any exception, Ctrl-C included)."""
    _undo_stack.append([])
    try:
        yield
    except BaseException as err:
        if isinstance(err, SystemExit) and err.code in (0, None):
            raise  # a successful early exit, not a failure
        for undo in reversed(_undo_stack[-1]):
            with suppress(OSError):  # best effort: the original error is what the user needs to see
                undo()
        raise
    finally:
        _undo_stack.pop()


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree, if it exists."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def make_output_dir(path: str | Path, keep: Callable[[Path], bool] = lambda path: False) -> Path:
    """Create `path` (and missing parents); if the command then fails, remove what was created
    here (or, for a directory that was empty, what was put in it), unless `keep(path)` says it
    now holds something worth keeping (e.g. a checkpoint)."""
    path = Path(path)
    created = path
    while not created.parent.exists() and created.parent != created:
        created = created.parent
    was_empty = path.is_dir() and not any(path.iterdir())
    existed = path.exists()
    path.mkdir(parents=True, exist_ok=True)

    def undo() -> None:
        if keep(path):
            return
        if not existed:
            remove_path(created)
        elif was_empty:
            for child in path.iterdir():
                remove_path(child)

    if not existed or was_empty:
        on_failure(undo)
    return path


def remove_on_failure(path: str | Path) -> None:
    """Remove `path` if the command fails and it did not exist before (an output being written)."""
    path = Path(path)
    if not path.exists():
        on_failure(lambda: remove_path(path))
