"""Preference pairs → token examples and batches for DPO/ORPO.

A pair is one prompt with two replies, the first preferred. Each side is encoded exactly as a
supervised example (`task_examples.ExampleEncoder`: prompt + reply + EOS, labels only on the
reply and EOS), so the log-probability a side gets is the one `lmkiln eval` and generation see.

A micro-batch of B pairs is ONE padded batch of 2B rows — the B chosen rows, then the B rejected
rows — so both sides share the padding and a single forward pass (TRL's "concatenated forward").
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmkiln.data.formats import Record
from lmkiln.data.loader import IGNORE_INDEX, pad_collate
from lmkiln.data.task_examples import ExampleEncoder, LengthReport, TokenExample
from lmkiln.errors import LmkilnError

log = logging.getLogger("lmkiln")


@dataclass
class PreferencePair:
    chosen: TokenExample
    rejected: TokenExample

    @property
    def length(self) -> int:
        """Tokens of the longer side (the padded width it needs)."""
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


def _chat_prompt(encoder: ExampleEncoder, record: Record) -> list[int]:
    """The conversation's tokens up to and including the assistant generation prompt."""
    return encoder.encode_pieces(encoder.chat.pieces(record.messages, generation_prompt=True)).tokens()[0]


def _chat_side(encoder: ExampleEncoder, record: Record, reply: str) -> TokenExample | None:
    """The conversation plus one assistant reply; only the reply (and its end-of-turn) is trained,
    earlier assistant turns are context. Too long: None (the oldest turns are not dropped here)."""
    prompt = _chat_prompt(encoder, record)
    turn = {"role": "assistant", "content": reply}
    ids, trained = encoder.encode_pieces(encoder.chat.pieces([*record.messages, turn])).tokens()
    if ids[: len(prompt)] != prompt:
        raise LmkilnError(
            f"{record.location}: the chat template renders the prompt differently inside a reply"
        )
    if len(ids) - 1 > encoder.max_length:
        return None
    trained = [False] * len(prompt) + trained[len(prompt) :]
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trained[1:])]
    return TokenExample(ids[:-1], labels)


def encode_pair(encoder: ExampleEncoder, record: Record, report: LengthReport) -> PreferencePair | None:
    """Both sides of a pair under the length policy; None when a side has to be dropped.

    A prompt that alone fills the context is an error rather than a silent drop: no reply fits.
    """
    if record.messages and encoder.chat is None:
        raise LmkilnError(f"{record.location}: a conversation prompt needs the chat template")
    if record.messages:
        prompt = len(_chat_prompt(encoder, record))
    else:
        prompt = encoder.encode_pieces(encoder.prompt_pieces(record)).length
    if prompt >= encoder.max_length:
        raise LmkilnError(
            f"{record.location}: the prompt has {prompt} tokens, no room for a reply within "
            f"finetune.max_length={encoder.max_length}; shorten the prompt or raise max_length"
        )
    sides: list[TokenExample] = []
    truncated = False
    for reply in record.targets[:2]:
        side_report = LengthReport()
        if record.messages:
            example = _chat_side(encoder, record, reply)
        else:
            example = encoder.example(dataclasses.replace(record, targets=[reply]), side_report)
        if example is None:
            report.dropped += 1
            return None
        truncated = truncated or side_report.truncated > 0
        sides.append(example)
    pair = PreferencePair(*sides)
    report.kept += 1
    report.truncated += int(truncated)
    report.longest = max(report.longest, pair.length)
    return pair


def encode_pairs(
    encoder: ExampleEncoder, records: Sequence[Record], split: str
) -> tuple[list[PreferencePair], LengthReport]:
    report = LengthReport()
    pairs = [p for p in (encode_pair(encoder, r, report) for r in records) if p is not None]
    log.info(report.describe(split, encoder.max_length, encoder.cfg.overlong))
    return pairs, report


def preference_collate(
    pairs: Sequence[PreferencePair], pad_id: int, reference: torch.Tensor | None = None
) -> Callable[[list[int]], dict[str, torch.Tensor]]:
    """Micro-batches of pairs: input_ids/labels/attention_mask/position_ids (2B, T), chosen rows
    first; pair_weight (B,) is 0 for the loop's padding slots (index -1); ref_logps (2B,) are the
    reference log-probabilities of each row when they were computed ahead (`reference` (N, 2))."""
    filler = {"input_ids": [pad_id], "labels": [IGNORE_INDEX]}

    def side(index: int, rejected: bool) -> dict[str, list[int]]:
        if index < 0:
            return filler
        example = pairs[index].rejected if rejected else pairs[index].chosen
        return {"input_ids": example.input_ids, "labels": example.labels}

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [side(i, False) for i in indices] + [side(i, True) for i in indices]
        batch = pad_collate(rows, pad_id, side="right")
        batch["pair_weight"] = torch.tensor([1.0 if i >= 0 else 0.0 for i in indices])
        if reference is not None:
            picked = torch.stack([reference[i] if i >= 0 else torch.zeros(2) for i in indices])  # (B, 2)
            batch["ref_logps"] = torch.cat([picked[:, 0], picked[:, 1]])  # (2B,) chosen then rejected
        return batch

    return collate
