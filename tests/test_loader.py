"""Loaders and collators: determinism, exact resume position, padding and packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmkiln.data.loader import (
    IGNORE_INDEX,
    RandomWindows,
    document_ids,
    eval_windows,
    pack_examples,
    pad_collate,
)
from lmkiln.errors import LmkilnError

SHARDS = [np.arange(1000, dtype=np.uint16), np.arange(5000, 5300, dtype=np.uint16)]


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_same_seed_same_batches_and_labels_are_shifted_inputs():
    a, b = take(RandomWindows(SHARDS, 16, 4, seed=1), 5), take(RandomWindows(SHARDS, 16, 4, seed=1), 5)
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["input_ids"][:, 1:], x["labels"][:, :-1])
    c = take(RandomWindows(SHARDS, 16, 4, seed=2), 1)[0]
    assert not torch.equal(a[0]["input_ids"], c["input_ids"])


def test_windows_never_straddle_shards_and_cover_both():
    seen = set()
    for batch in take(RandomWindows(SHARDS, 16, 8, seed=0), 50):
        for row, labels in zip(batch["input_ids"], batch["labels"]):
            full = torch.cat([row, labels[-1:]])
            assert (full.diff() == 1).all()  # consecutive ids: one shard, no seam
            seen.add(int(row[0]) >= 5000)
    assert seen == {True, False}


def test_saved_position_continues_identically():
    stream = RandomWindows(SHARDS, 16, 4, seed=3)
    take(stream, 7)
    state = stream.state_dict()
    expected = take(stream, 3)
    resumed = RandomWindows(SHARDS, 16, 4, seed=3)
    resumed.load_state_dict(state)
    for x, y in zip(expected, take(resumed, 3)):
        assert torch.equal(x["input_ids"], y["input_ids"])


def test_ranks_read_disjoint_slices_of_the_single_process_batch():
    whole = next(RandomWindows(SHARDS, 16, 8, seed=3))
    halves = [next(RandomWindows(SHARDS, 16, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]), whole["input_ids"])


def test_corpus_too_small_for_the_context_says_how_many_tokens():
    with pytest.raises(
        LmkilnError, match=r"has 50 tokens but one training window needs train.seq_len \+ 1 = 65"
    ):
        RandomWindows([np.arange(50, dtype=np.uint16)], 64, 2, seed=0)


def test_eval_windows_are_fixed_and_bounded():
    batches = list(eval_windows(SHARDS, 100, 4, max_tokens=1000))
    assert sum(b["labels"].numel() for b in batches) == 1000
    assert torch.equal(batches[0]["input_ids"][0], torch.arange(100))
    short = list(eval_windows([np.arange(10, dtype=np.uint16)], 100, 4, max_tokens=1000))
    assert short[0]["input_ids"].shape == (1, 9)


def test_document_ids_restart_after_eos():
    tokens = torch.tensor([[5, 0, 6, 7, 0, 8]])
    assert document_ids(tokens, eos_id=0).tolist() == [[0, 0, 1, 1, 1, 2]]


def test_pad_collate_left_and_right():
    examples = [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}, {"input_ids": [4]}]
    right = pad_collate(examples, pad_id=0)
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    left = pad_collate(examples, pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert left["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_packing_records_boundaries_and_restarts_positions():
    examples = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}, {"input_ids": [6, 7, 8, 9]}]
    packed = pack_examples(examples, seq_len=6, pad_id=0)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    assert packed["doc_ids"].tolist() == [[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]
    assert packed["labels"][0, 5] == IGNORE_INDEX


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("size", [24, 25, 7])
def test_epoch_batches_cover_every_example_exactly_once_per_epoch(world, size):
    from lmkiln.data.loader import EpochBatches

    streams = [
        EpochBatches(size, batch_size=6 * world, micro_batch_size=3, seed=0, rank=r, world_size=world)
        for r in range(world)
    ]
    for epoch in range(2):
        seen = []
        steps = streams[0].steps_per_epoch * streams[0].accumulation
        for _ in range(steps):  # every rank draws the same number of micro-batches: no hang
            for stream in streams:
                batch = next(stream)
                assert len(batch) == 3
                seen += [i for i in batch if i >= 0]
        assert sorted(seen) == list(range(size)), (epoch, sorted(seen))
        assert all(s.epoch == epoch + 1 for s in streams)


def test_epoch_batches_resume_exactly_and_reshuffle_each_epoch():
    from lmkiln.data.loader import EpochBatches

    stream = EpochBatches(10, batch_size=4, micro_batch_size=2, seed=5)
    first_epoch = [next(stream) for _ in range(stream.steps_per_epoch * stream.accumulation)]
    for _ in range(3):
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(5)]
    again = EpochBatches(10, batch_size=4, micro_batch_size=2, seed=5)
    again.load_state_dict(state)
    assert [next(again) for _ in range(5)] == expected
    assert first_epoch != expected[: len(first_epoch)]
