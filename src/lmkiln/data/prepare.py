"""From a config to training-ready data: the tokenizer (trained once and cached) and the shards."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from lmkiln.config import Config, DataConfig, TokenizerConfig
from lmkiln.data.cleaning import clean_documents, cleaning_active, cleaning_settings
from lmkiln.data.corpus import source_fingerprints
from lmkiln.data.shards import (
    PrepareReport,
    TokenShards,
    cache_root,
    is_shard_set,
    prepare_shards,
    validation_split,
)
from lmkiln.data.tokenizer import Tokenizer, bytes_per_token, train_bpe, train_char
from lmkiln.errors import LmkilnError
from lmkiln.files import atomic_directory

log = logging.getLogger(__name__)

HELD_OUT_BYTES = 1 << 20  # held-out text used to report compression


@dataclass
class TokenizerReport:
    tokenizer: Tokenizer
    cached: bool
    seconds: float
    bytes_per_token: float
    """Compression on held-out (validation) documents."""


def training_texts(data: DataConfig):
    """Documents the tokenizer learns from: the training split only, so compression is honest;
    cleaned as the shards are (canaries excepted), so no scrubbed secret reaches the vocabulary."""
    held = validation_split(data.seed, data.val_fraction)
    for doc in clean_documents(data):
        if data.split != "document" or not held(doc.key):
            yield doc.text


def held_out_texts(data: DataConfig, max_bytes: int = HELD_OUT_BYTES) -> list[str]:
    """Up to max_bytes of validation documents (or of the corpus tail's documents for split=tail)."""
    texts, size = [], 0
    docs = clean_documents(data)
    held = validation_split(data.seed, data.val_fraction)
    picked = [d for d in docs if data.split == "document" and held(d.key)]
    if not picked:  # tail split, or no validation document: the last documents stand in
        picked = list(clean_documents(data))[-8:]
    for doc in picked:
        texts.append(doc.text)
        size += len(doc.text.encode("utf-8"))
        if size >= max_bytes:
            break
    return texts


def _tokenizer_key(data: DataConfig, tok: TokenizerConfig) -> str:
    blob = json.dumps(
        {
            "sources": source_fingerprints(data.corpus),
            "kind": tok.kind,
            "vocab": tok.vocab_size,
            "min_frequency": tok.min_frequency,
            "field": data.field,
            "unit": data.text_unit,
            "split": [data.split, data.val_fraction, data.seed],
            "format": 1,
            **({"cleaning": cleaning_settings(data)} if cleaning_active(data) else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def build_tokenizer(cfg: Config) -> TokenizerReport:
    """Load (kind=file) or train the tokenizer; trained ones are cached by corpus and settings."""
    tok_cfg, data = cfg.tokenizer, cfg.data
    start = time.perf_counter()
    if tok_cfg.kind == "file":
        if not tok_cfg.path:
            raise LmkilnError(
                "tokenizer.kind=file needs --tokenizer.path (a tokenizer.json or its directory)"
            )
        tokenizer = Tokenizer.load(tok_cfg.path, fast=tok_cfg.fast)
        cached = True
    else:
        directory = cache_root(data) / "tokenizers" / _tokenizer_key(data, tok_cfg)
        cached = (directory / "tokenizer.json").is_file()
        if cached:
            tokenizer = Tokenizer.load(directory, fast=tok_cfg.fast)
        else:
            tokenizer = train_tokenizer(cfg)
            _save_atomically(tokenizer, directory)
    seconds = time.perf_counter() - start
    held_out = held_out_texts(data) if not is_shard_set(data.corpus) else []
    compression = bytes_per_token(tokenizer, held_out) if held_out else float("nan")
    return TokenizerReport(tokenizer, cached, seconds, compression)


def train_tokenizer(cfg: Config) -> Tokenizer:
    data = cfg.data
    texts = _nonempty(training_texts(data)) or _nonempty(d.text for d in clean_documents(data))
    if texts is None:
        raise LmkilnError(f"corpus {data.corpus} is empty: no document has any text")
    if cfg.tokenizer.kind == "char":
        return train_char(texts, fast=cfg.tokenizer.fast)
    return train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, fast=cfg.tokenizer.fast)


def _nonempty(texts):
    """The iterator back with its first item restored, or None if it yields nothing."""
    texts = iter(texts)
    for first in texts:
        return chain([first], texts)
    return None


def _save_atomically(tokenizer: Tokenizer, directory: Path) -> None:
    with atomic_directory(directory) as tmp:
        tokenizer.save(tmp)


def prepare_data(cfg: Config) -> tuple[TokenizerReport, PrepareReport]:
    """The tokenizer and the shards of a config; a prepared shard set is used as it is."""
    if is_shard_set(cfg.data.corpus):
        shards = TokenShards(Path(cfg.data.corpus).expanduser())
        if cfg.tokenizer.kind == "file":
            report = build_tokenizer(cfg)
        else:
            tokenizer = Tokenizer.load(shards.directory / "tokenizer", fast=cfg.tokenizer.fast)
            report = TokenizerReport(tokenizer, True, 0.0, float("nan"))
        shards.check_tokenizer(report.tokenizer)
        return report, PrepareReport(shards, cached=True, seconds=0.0, megabytes=0.0)
    report = build_tokenizer(cfg)
    return report, prepare_shards(cfg.data, report.tokenizer)
