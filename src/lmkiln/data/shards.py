"""Token shards: a corpus tokenized once into memory-mapped files, cached by what made them.

Layout of one shard set (a directory named by its cache key):

    manifest.json        format, dtype, vocab size, tokenizer fingerprint, sources, settings, splits
    train_000.bin ...    token ids, uint16 when the vocabulary fits in 16 bits, else uint32
    val_000.bin ...

Each document is followed by the EOS token. The key hashes the source fingerprints (path, size,
mtime), the tokenizer fingerprint and every setting that changes the output, so re-running with the
same inputs reuses the cache and any change rebuilds. A set is written into a temporary directory
and renamed into place after its manifest: an interrupted prepare never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from lmkiln.config import DataConfig
from lmkiln.data.canaries import is_canary
from lmkiln.data.cleaning import (
    CleaningCounts,
    cleaning_active,
    cleaning_settings,
    shard_canaries,
    shard_documents,
)
from lmkiln.data.corpus import Document, source_fingerprints
from lmkiln.data.fast_encode import FastPathMismatch, FlatIds
from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.files import fsync_dir, naming, on_failure, remove_path

log = logging.getLogger(__name__)

FORMAT = 1
BATCH_CHARS = 1 << 21  # text handed to the encoder at once (~2 MB): big enough to use every thread
SPLITS = ("train", "val")


def is_shard_set(path: str) -> bool:
    """True when a corpus spec names an already prepared shard set (a directory with a manifest)."""
    return (Path(path).expanduser() / "manifest.json").is_file()


def cache_root(data: DataConfig) -> Path:
    root = Path(data.cache_dir or os.environ.get("LMKILN_CACHE") or "~/.cache/lmkiln").expanduser()
    if not root.exists():  # a command that fails before caching anything leaves no empty cache
        on_failure(lambda: None if any(p.is_file() for p in root.rglob("*")) else remove_path(root))
    return root


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_settings(data: DataConfig) -> dict:
    """The settings that change what the shards hold (and so belong in the cache key)."""
    return {
        "corpus": data.corpus,
        "field": data.field,
        "text_unit": data.text_unit,
        "split": data.split,
        "val_fraction": data.val_fraction,
        "seed": data.seed,
        "shard_tokens": data.shard_tokens,
        # only when set, so that shard sets (and the runs that name them) made before stay valid
        **({"cleaning": cleaning_settings(data)} if cleaning_active(data) else {}),
        **({"canaries": [data.canaries, data.canary_repeats]} if data.canaries else {}),
    }


def shard_key(data: DataConfig, tokenizer: Tokenizer) -> tuple[str, list]:
    sources = source_fingerprints(data.corpus)
    blob = json.dumps(
        {
            "format": FORMAT,
            "sources": sources,
            "tokenizer": tokenizer.fingerprint,
            "settings": shard_settings(data),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24], sources


def validation_split(seed: int, fraction: float) -> Callable[[str], bool]:
    """The seeded, order-independent document split: document key → held out for validation,
    when blake2b(seed, key) / 2**64 < fraction. Build it once and call it per document."""
    seeded = hashlib.blake2b(f"{seed}\0".encode(), digest_size=8)  # copied per key: 30% faster

    def held(key: str) -> bool:
        digest = seeded.copy()
        digest.update(key.encode())
        return int.from_bytes(digest.digest(), "little") / 2**64 < fraction

    return held


def is_validation(key: str, seed: int, fraction: float) -> bool:
    return validation_split(seed, fraction)(key)


def held_out(keys: Iterable[str], seed: int, fraction: float) -> np.ndarray:
    """`validation_split` of many keys, as a bool array."""
    return np.fromiter(map(validation_split(seed, fraction), keys), dtype=bool)


# --------------------------------------------------------------------------------------------
# Reading


class TokenShards:
    """A complete shard set on disk: memory-mapped token arrays per split."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise LmkilnError(
                f"{self.directory} is not a complete shard set (no manifest.json); "
                f"run `lmkiln data prepare` again"
            )
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            self.dtype = np.dtype(self.manifest["dtype"])
            assert self.dtype in (np.uint16, np.uint32)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
            raise LmkilnError(
                f"{manifest_path}: not a valid shard manifest; prepare the shards again"
            ) from None
        self._arrays: dict[str, list[np.memmap]] = {}

    def tokens(self, split: str) -> int:
        return self.manifest["splits"][split]["tokens"]

    def bytes_per_token(self, split: str) -> float:
        info = self.manifest["splits"][split]
        return info["bytes"] / max(info["tokens"], 1)

    def damaged(self) -> str | None:
        """Why a shard file does not match the manifest (missing, truncated, grown), or None."""
        for split in self.manifest["splits"]:
            for entry in self.manifest["splits"][split]["files"]:
                path = self.directory / Path(entry["name"]).name  # never leave the shard directory
                expected = entry["tokens"] * self.dtype.itemsize
                if not path.is_file():
                    return f"{path}: shard is missing or truncated (no such file)"
                if path.stat().st_size != expected:
                    return (
                        f"{path}: shard is missing or truncated ({path.stat().st_size} bytes, the "
                        f"manifest says {expected})"
                    )
        return None

    def arrays(self, split: str) -> list[np.memmap]:
        if split not in self._arrays:
            problem = self.damaged()
            if problem:
                raise LmkilnError(f"{problem}; delete {self.directory} and prepare again")
            arrays = []
            for entry in self.manifest["splits"][split]["files"]:
                path = self.directory / Path(entry["name"]).name
                if entry["tokens"]:
                    arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
            self._arrays[split] = arrays
        return self._arrays[split]

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        if self.manifest["tokenizer_fingerprint"] != tokenizer.fingerprint:
            raise LmkilnError(
                f"tokenizer does not match the shards in {self.directory} (shards were made with tokenizer "
                f"{self.manifest['tokenizer_fingerprint'][:12]}, this one is {tokenizer.fingerprint[:12]}); "
                f"prepare the shards again with this tokenizer"
            )


# --------------------------------------------------------------------------------------------
# Writing


class _SplitWriter:
    """Appends token arrays to numbered shard files of at most `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.files: list[dict] = []
        self.handle = None
        self.bytes = 0
        self.documents = 0

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.files):03d}.bin"
        self.files.append({"name": name, "tokens": 0})
        self.handle = open(self.directory / name, "wb")

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self.handle is None or self.files[-1]["tokens"] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.files[-1]["tokens"]
            chunk, tokens = tokens[:room], tokens[room:]
            self.handle.write(chunk.astype(self.dtype, copy=False).tobytes())
            self.files[-1]["tokens"] += int(chunk.size)

    @property
    def tokens(self) -> int:
        return sum(f["tokens"] for f in self.files)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None

    def info(self) -> dict:
        return {"files": self.files, "tokens": self.tokens, "bytes": self.bytes, "documents": self.documents}


def _batches(documents: Iterator[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in documents:
        batch.append(doc)
        size += len(doc.text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_documents(
    data: DataConfig,
    tokenizer: Tokenizer,
    writers: dict[str, _SplitWriter],
    progress: Callable[[int], None] | None,
    documents: Iterator[Document],
) -> None:
    """Stream, encode (on a worker thread, overlapping the reading) and write every document."""
    limit = tokenizer.vocab_size
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in chain(_batches(documents), [None]):
            if batch is not None:
                future = pool.submit(tokenizer.encode_flat_verified, [d.text for d in batch])
            if pending is not None:
                done_batch, done_future = pending
                done_bytes = _route(done_batch, done_future.result(), data, tokenizer.eos_id, limit, writers)
                if progress:
                    progress(done_bytes)
            pending = (batch, future) if batch is not None else None


def _route(
    batch: list[Document],
    encoded: FlatIds,
    data: DataConfig,
    eos: int,
    limit: int,
    writers: dict[str, _SplitWriter],
) -> int:
    """Write a batch's ids, each document's followed by EOS, to its split; returns its UTF-8 bytes."""
    ids, lengths = encoded
    if ids.size and int(ids.max()) >= limit:
        raise LmkilnError(
            f"token id {int(ids.max())} is outside the vocabulary ({limit} tokens); "
            f"the tokenizer file is inconsistent"
        )
    stream = np.insert(ids, np.cumsum(lengths), eos)  # (tokens + documents,): EOS after each document
    validation = np.zeros(len(batch), dtype=bool)
    if data.split == "document":
        validation = held_out((doc.key for doc in batch), data.seed, data.val_fraction)
        if data.canaries:  # canaries measure memorization of training data: never validation
            validation &= ~np.fromiter((is_canary(doc.key) for doc in batch), dtype=bool, count=len(batch))
    in_validation = np.repeat(validation, lengths + 1)  # (tokens + documents,)
    total = utf8_length("".join(doc.text for doc in batch))
    held = utf8_length("".join(batch[i].text for i in np.flatnonzero(validation)))
    for split, documents, size, tokens in (
        ("train", len(batch) - int(validation.sum()), total - held, stream[~in_validation]),
        ("val", int(validation.sum()), held, stream[in_validation]),
    ):
        writers[split].bytes += size
        writers[split].documents += documents
        if tokens.size:
            writers[split].write(tokens)
    return total


def utf8_length(text: str) -> int:
    """Bytes of `text` in UTF-8, without encoding it when it is ASCII (one byte per character)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _move_tail_to_validation(writers: dict[str, _SplitWriter], fraction: float, directory: Path) -> None:
    """nanoGPT-style split: the last `fraction` of the training tokens become the validation split."""
    train, val = writers["train"], writers["val"]
    move = int(round(train.tokens * fraction))
    if move < 2:
        return
    dtype = train.dtype
    total_bytes, total_tokens = train.bytes + val.bytes, train.tokens + val.tokens
    pieces = []
    while move:
        last = train.files[-1]
        take = min(move, last["tokens"])
        path = directory / last["name"]
        data = np.fromfile(path, dtype=dtype)
        pieces.append(data[len(data) - take :])
        with open(path, "r+b") as fh:
            fh.truncate((len(data) - take) * dtype.itemsize)
        last["tokens"] -= take
        move -= take
        if last["tokens"] == 0:
            path.unlink()
            train.files.pop()
    val.write(np.concatenate(pieces[::-1]))
    val.close()
    # Bytes per token for bits-per-byte: a tail split shares the corpus-wide ratio.
    val.bytes = int(round(total_bytes * val.tokens / total_tokens))
    train.bytes = total_bytes - val.bytes


def _remove_stale_tmp(final: Path) -> None:
    for tmp in final.parent.glob(final.name + ".tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class PrepareReport:
    shards: TokenShards
    cached: bool
    seconds: float
    megabytes: float

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / max(self.seconds, 1e-9)


def prepare_shards(
    data: DataConfig, tokenizer: Tokenizer, progress: Callable[[int], None] | None = None
) -> PrepareReport:
    """Tokenize the corpus into a cached shard set, or reuse the one these inputs already made."""
    key, sources = shard_key(data, tokenizer)
    root = cache_root(data) / "shards"
    final = root / key
    if (final / "manifest.json").is_file():
        cached = TokenShards(final)
        problem = cached.damaged()
        if problem is None:
            return PrepareReport(cached, cached=True, seconds=0.0, megabytes=0.0)
        log.warning("cached shards are damaged (%s); preparing them again", problem)
        shutil.rmtree(final, ignore_errors=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LmkilnError(
            f"cannot create the shard cache {root}: {err.strerror}; set --data.cache_dir"
        ) from None
    _remove_stale_tmp(final)
    tmp = root / f"{key}.tmp-{os.getpid()}"
    start = time.perf_counter()
    try:
        manifest = _build(data, tokenizer, tmp, sources, progress)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise naming(err, final) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same set first; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(root)
    megabytes = (manifest["splits"]["train"]["bytes"] + manifest["splits"]["val"]["bytes"]) / 1e6
    return PrepareReport(TokenShards(final), cached=False, seconds=seconds, megabytes=megabytes)


def _build(
    data: DataConfig, tokenizer: Tokenizer, tmp: Path, sources: list, progress: Callable[[int], None] | None
) -> dict:
    dtype = shard_dtype(tokenizer.vocab_size)
    for attempt in range(2):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writers = {s: _SplitWriter(tmp, s, dtype, data.shard_tokens) for s in SPLITS}
        counts, canaries = CleaningCounts(), shard_canaries(data)
        try:
            _write_documents(data, tokenizer, writers, progress, shard_documents(data, counts, canaries))
            break
        except FastPathMismatch:
            if attempt:
                raise
            log.warning("fast encoder disagreed with the reference; re-encoding with tokenizers")
    for writer in writers.values():
        writer.close()
    if writers["train"].tokens + writers["val"].tokens == 0:
        raise LmkilnError(f"corpus {data.corpus} is empty: no document has any text")
    split = data.split
    if data.val_fraction > 0 and (split == "tail" or writers["val"].tokens == 0):
        if split == "document":
            log.warning(
                "no document fell into the validation split (%d documents); holding out the last "
                "%.0f%% of the tokens instead",
                writers["train"].documents,
                100 * data.val_fraction,
            )
            split = "tail"
        _move_tail_to_validation(writers, data.val_fraction, tmp)
    manifest = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "encoder": tokenizer.fast_path,
        "sources": sources,
        "settings": shard_settings(data),
        "split_used": split,
        "splits": {s: w.info() for s, w in writers.items()},
        **({"cleaning": counts.as_dict()} if cleaning_active(data) else {}),
        **({"canaries": [c.as_dict() for c in canaries]} if canaries else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tokenizer.save(tmp / "tokenizer")  # a shard set carries its tokenizer: it is self-contained
    manifest_path = tmp / "manifest.json"
    with open(manifest_path, "w", encoding="utf-8") as fh:  # written last: its presence means complete
        json.dump(manifest, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(tmp)
    return manifest
