"""Batches for training: random windows over token shards, and padding/packing collators.

`RandomWindows` draws batch i from a generator seeded by (seed, rank, i), so its whole state is
one integer: saving `position` and restoring it continues with identical batches, on any number
of restarts. Every batch is a dict of tensors; `labels` use IGNORE_INDEX where no loss is taken.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lmkiln.config import BatchPlan
from lmkiln.errors import LmkilnError

IGNORE_INDEX = -100


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) ids -> (B, T) index of the document each token belongs to; EOS closes its document."""
    ends = (tokens == eos_id).long()
    return torch.cumsum(ends, dim=1) - ends


class RandomWindows:
    """Uniformly sampled windows of seq_len+1 tokens (inputs and next-token labels).

    Micro-batch i is drawn by a generator seeded with (seed, i) for all `world_size` ranks at
    once, and each rank keeps its own slice: ranks read disjoint windows, and a run draws the same
    data at any number of processes with the same global batch. The whole state is `position`.
    Windows never straddle two shard files. With `eos_id` set, each batch also carries `doc_ids`
    so the model can keep attention inside documents.
    """

    def __init__(
        self,
        shards: Sequence[np.ndarray],
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        eos_id: int | None = None,
        world_size: int = 1,
    ) -> None:
        self.shards, self.seq_len, self.batch_size = list(shards), seq_len, batch_size
        self.seed, self.rank, self.world_size, self.eos_id = seed, rank, world_size, eos_id
        starts = np.array([max(len(s) - seq_len, 0) for s in self.shards], dtype=np.int64)
        total = sum(len(s) for s in self.shards)
        if starts.sum() == 0:
            raise LmkilnError(
                f"the training split has {total} tokens but one training window needs "
                f"train.seq_len + 1 = {seq_len + 1}; use a larger corpus or a smaller "
                f"train.seq_len"
            )
        self.cumulative = np.cumsum(starts)
        self.position = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        everyone = rng.integers(0, self.cumulative[-1], size=self.batch_size * self.world_size)
        picks = everyone[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        which = np.searchsorted(self.cumulative, picks, side="right")
        offsets = picks - np.concatenate([[0], self.cumulative[:-1]])[which]
        window = self.seq_len + 1
        rows = np.stack([self.shards[s][o : o + window] for s, o in zip(which, offsets)]).astype(np.int64)
        tokens = torch.from_numpy(rows)
        batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
        if self.eos_id is not None:
            batch["doc_ids"] = document_ids(batch["input_ids"], self.eos_id)
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def eval_windows(
    shards: Sequence[np.ndarray], seq_len: int, batch_size: int, max_tokens: int, eos_id: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive non-overlapping windows from the start of each shard, up to max_tokens targets.

    The same windows every time, so validation losses are comparable across steps and runs.
    A split shorter than seq_len+1 is evaluated as one shorter window.
    """
    total = sum(len(s) for s in shards)
    if total < 2:
        return
    seq_len = min(seq_len, max(len(s) for s in shards) - 1)
    rows: list[np.ndarray] = []
    budget = max_tokens
    for shard in shards:
        for start in range(0, len(shard) - seq_len, seq_len):
            if budget <= 0:
                break
            rows.append(np.asarray(shard[start : start + seq_len + 1], dtype=np.int64))
            budget -= seq_len
            if len(rows) == batch_size:
                yield _window_batch(rows, eos_id)
                rows = []
    if rows:
        yield _window_batch(rows, eos_id)


def _window_batch(rows: list[np.ndarray], eos_id: int | None) -> dict[str, torch.Tensor]:
    tokens = torch.from_numpy(np.stack(rows))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    if eos_id is not None:
        batch["doc_ids"] = document_ids(batch["input_ids"], eos_id)
    return batch


# --------------------------------------------------------------------------------------------
# Collators for examples of different lengths (fine-tuning)


def pad_collate(
    examples: Sequence[dict[str, list[int]]],
    pad_id: int,
    side: str = "right",
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """Pad `input_ids` (and `labels`, if present) to the longest example.

    Returns input_ids, attention_mask (1 = real token), position_ids (counting real tokens only,
    so left padding does not shift positions) and labels (ignore_index on padding).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), ignore_index, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example["input_ids"]
        cols = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
        input_ids[row, cols] = torch.tensor(ids, dtype=torch.long)
        labels[row, cols] = torch.tensor(example.get("labels", ids), dtype=torch.long)
        mask[row, cols] = 1
    position_ids = (torch.cumsum(mask, dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}


def pack_examples(
    examples: Sequence[dict[str, list[int]]], seq_len: int, pad_id: int, ignore_index: int = IGNORE_INDEX
) -> dict[str, torch.Tensor]:
    """Pack whole examples greedily into rows of seq_len tokens, recording document boundaries.

    Returns input_ids, labels, doc_ids (a distinct id per example; -1 on padding) and position_ids
    restarting at 0 for each example. A model given doc_ids attends only within an example.
    Examples longer than seq_len must be truncated or dropped by the caller first.
    """
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = [0]
    for example in examples:
        ids = example["input_ids"]
        if len(ids) > seq_len:
            raise ValueError(f"example of {len(ids)} tokens does not fit seq_len {seq_len}")
        if used[-1] + len(ids) > seq_len:
            rows.append([])
            used.append(0)
        rows[-1].append((ids, example.get("labels", ids)))
        used[-1] += len(ids)
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), ignore_index, dtype=torch.long)
    doc_ids = torch.full((n, seq_len), -1, dtype=torch.long)
    position_ids = torch.zeros((n, seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, (ids, labs) in enumerate(row):
            end = at + len(ids)
            input_ids[r, at:end] = torch.tensor(ids)
            labels[r, at:end] = torch.tensor(labs)
            doc_ids[r, at:end] = d
            position_ids[r, at:end] = torch.arange(len(ids))
            at = end
    return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids, "position_ids": position_ids}


# --------------------------------------------------------------------------------------------
# Epochs over map-style datasets (classification, fine-tuning)


GROUP_STEPS = 32
"""Steps per window that length grouping sorts (a wider window pads less but is less random)."""


class EpochBatches:
    """Micro-batches of dataset indices, every example exactly once per epoch across all ranks.

    Each epoch is a seeded permutation (the same on every rank), cut into optimizer steps of
    `batch_size` examples; each step is dealt into `world_size × accumulation` micro-batches of at
    most `micro_batch_size`, and this rank takes its own. The last step of an epoch may be short:
    its examples are dealt round-robin and empty slots hold -1 (a padding example the collate
    function must give zero weight), so every rank runs the same number of micro-batches and
    collectives never hang. Position = (epoch, micro-batch within the epoch): saved and restored
    exactly.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        micro_batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        lengths: Sequence[int] | None = None,
    ) -> None:
        if size <= 0:
            raise LmkilnError("the training set is empty")
        assert batch_size % (micro_batch_size * world_size) == 0, "checked by config.batch_plan"
        self.size, self.batch_size, self.micro = size, batch_size, micro_batch_size
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.accumulation = batch_size // (micro_batch_size * world_size)
        self.steps_per_epoch = -(-size // batch_size)
        self.epoch, self.index = 0, 0  # index counts this rank's micro-batches within the epoch
        self._order: np.ndarray | None = None
        self.lengths = None if lengths is None else np.asarray(lengths)
        """Example lengths: with them, each step's examples have similar lengths (less padding)."""

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
            if self.lengths is not None:
                self._order = self._grouped(self._order, rng)
        return self._order

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sort each window of GROUP_STEPS steps by length, cut it into steps, shuffle the steps.

        A step then pads to a length near its own examples' (sentence pairs: ~1.6x fewer pad
        tokens), while the windows keep the epoch random. A short last step stays last.
        """
        window = self.batch_size * GROUP_STEPS
        parts = [order[i : i + window] for i in range(0, len(order), window)]
        grouped = np.concatenate([p[np.argsort(self.lengths[p], kind="stable")] for p in parts])
        full = len(grouped) // self.batch_size * self.batch_size
        steps = grouped[:full].reshape(-1, self.batch_size)[rng.permutation(full // self.batch_size)]
        return np.concatenate([steps.reshape(-1), grouped[full:]])

    def micro_indices(self, step: int, slot: int) -> list[int]:
        """Indices of micro-batch `slot` (0..accumulation-1) of this rank at `step` of the epoch."""
        order = self._epoch_order()
        chunk = order[step * self.batch_size : (step + 1) * self.batch_size]
        lanes = self.world_size * self.accumulation  # micro-batch slots in one step, over all ranks
        lane = slot * self.world_size + self.rank
        if len(chunk) == self.batch_size:
            picked = chunk[lane * self.micro : (lane + 1) * self.micro]
        else:  # the short last step: deal examples round-robin over the lanes
            picked = chunk[lane::lanes][: self.micro]
        return [int(i) for i in picked] + [-1] * (self.micro - len(picked))

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> list[int]:
        step, slot = divmod(self.index, self.accumulation)
        indices = self.micro_indices(step, slot)
        self.index += 1
        if self.index == self.steps_per_epoch * self.accumulation:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


class CollatedBatches:
    """An index stream made into tensor batches by `collate(indices)`; state is the stream's."""

    def __init__(self, indices: EpochBatches, collate) -> None:
        self.indices, self.collate = indices, collate

    def __iter__(self) -> CollatedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.collate(next(self.indices))

    @property
    def epoch(self) -> int:
        return self.indices.epoch

    def state_dict(self) -> dict:
        return self.indices.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.indices.load_state_dict(state)


def epoch_stream(
    size: int, plan: BatchPlan, seed: int, rank: int, collate, lengths: Sequence[int] | None = None
) -> CollatedBatches:
    """The resumable training stream over a map-style dataset of `size` examples, cut by `plan`;
    given the examples' `lengths`, each step holds examples of similar length."""
    indices = EpochBatches(
        size, plan.batch_size, plan.micro_batch_size, seed, True, rank, plan.world_size, lengths
    )
    return CollatedBatches(indices, collate)
