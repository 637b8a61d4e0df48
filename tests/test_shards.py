"""Token shards: round trip, dtype choice, the cache, atomic writes, and errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import write

from lmkiln.config import DataConfig
from lmkiln.data import shards as shards_module
from lmkiln.data.corpus import iter_documents
from lmkiln.data.shards import TokenShards, prepare_shards, shard_dtype
from lmkiln.data.tokenizer import train_bpe, train_char
from lmkiln.errors import LmkilnError

CORPUS = "\n\n".join(
    f"Paragraph {i}: the quick brown fox {i * 7} jumps over the lazy dog." for i in range(300)
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(iter([CORPUS]), vocab_size=400)


@pytest.fixture
def corpus(tmp_path):
    return write(tmp_path / "c.txt", CORPUS)


def test_round_trip_every_document_with_eos(corpus, tokenizer):
    report = prepare_shards(DataConfig(corpus=str(corpus), val_fraction=0.2), tokenizer)
    assert not report.cached
    shards = report.shards
    assert shards.dtype == np.uint16
    tokens = np.concatenate([np.concatenate(shards.arrays(s)) for s in ("train", "val")])
    docs = [d.text for d in iter_documents(str(corpus))]
    assert tokens.size == sum(len(tokenizer.encode(t)) + 1 for t in docs)
    assert (tokens == tokenizer.eos_id).sum() == len(docs)
    # each document decodes back exactly (order within a split is preserved)
    train_docs = tokenizer.decode(np.concatenate(shards.arrays("train")).tolist()).split("<|endoftext|>")[:-1]
    assert set(train_docs) <= set(docs)
    assert 0 < shards.tokens("val") < shards.tokens("train")
    assert shards.manifest["splits"]["val"]["documents"] > 0


def test_dtype_never_wraps():
    assert shard_dtype(65_536) == np.uint16
    assert shard_dtype(65_537) == np.uint32


def test_cache_hit_and_rebuild_on_any_change(corpus, tokenizer):
    data = DataConfig(corpus=str(corpus))
    first = prepare_shards(data, tokenizer)
    again = prepare_shards(data, tokenizer)
    assert again.cached and again.shards.directory == first.shards.directory
    changed_setting = prepare_shards(DataConfig(corpus=str(corpus), val_fraction=0.3), tokenizer)
    assert not changed_setting.cached
    other_tok = prepare_shards(data, train_char(iter([CORPUS])))
    assert not other_tok.cached
    corpus.write_text(CORPUS + "\n\nnew text", encoding="utf-8")
    os.utime(corpus, ns=(1, 1))  # a content change always changes size or mtime
    assert not prepare_shards(data, tokenizer).cached


def test_interrupted_prepare_leaves_nothing_that_looks_complete(
    corpus, tokenizer, monkeypatch, isolated_cache
):
    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_module, "_move_tail_to_validation", explode)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(DataConfig(corpus=str(corpus), split="tail"), tokenizer)
    root = isolated_cache / "shards"
    assert not any(root.iterdir()), list(root.iterdir())


def test_tail_split_matches_nanogpt(corpus, tokenizer):
    shards = prepare_shards(
        DataConfig(corpus=str(corpus), split="tail", text_unit="file", val_fraction=0.1), tokenizer
    ).shards
    everything = tokenizer.encode(CORPUS) + [tokenizer.eos_id]
    cut = len(everything) - round(len(everything) * 0.1)
    assert np.concatenate(shards.arrays("train")).tolist() == everything[:cut]
    assert np.concatenate(shards.arrays("val")).tolist() == everything[cut:]


def test_many_shard_files_stream(corpus, tokenizer):
    shards = prepare_shards(DataConfig(corpus=str(corpus), shard_tokens=1000), tokenizer).shards
    files = shards.manifest["splits"]["train"]["files"]
    assert len(files) > 3 and all(f["tokens"] <= 1000 for f in files)


def test_mismatched_tokenizer_and_truncated_shard_are_detected(corpus, tokenizer):
    shards = prepare_shards(DataConfig(corpus=str(corpus)), tokenizer).shards
    with pytest.raises(LmkilnError, match="tokenizer does not match the shards"):
        shards.check_tokenizer(train_char(iter(["xyz"])))
    first = shards.directory / "train_000.bin"
    with open(first, "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(LmkilnError, match="missing or truncated"):
        TokenShards(shards.directory).arrays("train")


def test_empty_corpus_is_refused(tmp_path, tokenizer):
    f = write(tmp_path / "empty.txt", "\n\n   \n")
    with pytest.raises(LmkilnError, match="is empty"):
        prepare_shards(DataConfig(corpus=str(f)), tokenizer)


def test_fast_path_mismatch_falls_back_to_reference(corpus, tokenizer, monkeypatch):
    tok = train_bpe(iter([CORPUS]), vocab_size=400)
    real = tok._fast.encode_flat

    def wrong_ids(texts):  # every id shifted by one: the sample check must catch it
        ids, lengths = real(texts)
        return (ids + 1) % 400, lengths

    monkeypatch.setattr(tok._fast, "encode_flat", wrong_ids)
    shards = prepare_shards(DataConfig(corpus=str(corpus)), tok).shards
    assert shards.manifest["encoder"] == "tokenizers"
    reference = np.concatenate([np.concatenate(shards.arrays(s)) for s in ("train", "val")])
    assert reference.size == sum(len(tokenizer.encode(d.text)) + 1 for d in iter_documents(str(corpus)))


def test_validation_split_is_blake2b_of_seed_and_key():
    # The split decides which documents a cached shard set holds out: changing it silently would
    # change every run's validation set. It is this formula, whatever the implementation.
    import hashlib

    from lmkiln.data.shards import held_out, is_validation

    keys = [f"corpus/part-{i}.txt:{3 * i + 1}" for i in range(500)] + ["", "é 日本"]
    for seed, fraction in ((0, 0.5), (1337, 0.1)):
        expected = [
            int.from_bytes(hashlib.blake2b(f"{seed}\0{k}".encode(), digest_size=8).digest(), "little") / 2**64
            < fraction
            for k in keys
        ]
        assert held_out(keys, seed, fraction).tolist() == expected
        assert [is_validation(k, seed, fraction) for k in keys[:20]] == expected[:20]
        assert 0 < sum(expected) < len(keys)
