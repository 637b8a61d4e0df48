"""Generating text: prompts in, streamed text out, stop strings honoured.

The token loop itself (KV cache, sampling, padding) is `lmkiln.model.generate.generate_ids`; this
module turns text into prompt ids and growing id lists back into safe-to-show text deltas.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmkiln.data.tokenizer import Tokenizer
from lmkiln.model.generate import Sampling, generate_ids


class TextStream:
    """Turns growing token lists into text deltas: holds back a cut UTF-8 sequence or a stop prefix."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special=True)
        for stop in self.stop:
            at = text.find(stop)
            if at >= 0:
                self.stopped = True
                text = text[:at]
        return text

    def push(self, token: int) -> str:
        """Add a token; return the newly safe-to-show text."""
        self.ids.append(token)
        text = self.text()
        safe = text
        if not self.stopped:
            safe = text.rstrip("\ufffd")
            for stop in self.stop:  # a suffix that could still grow into a stop string waits
                for k in range(min(len(stop) - 1, len(safe)), 0, -1):
                    if safe.endswith(stop[:k]):
                        safe = safe[:-k]
                        break
        delta = safe[len(self.emitted) :] if safe.startswith(self.emitted) else ""
        self.emitted += delta
        return delta


def generate_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[str],
    sampling: Sampling,
    on_text: Callable[[int, str], None] | None = None,
    encode_template: bool = False,
) -> list[str]:
    """Complete each prompt; `on_text(row, delta)` streams text as it is produced."""
    encode = tokenizer.encode_template if encode_template else tokenizer.encode
    # An empty prompt starts a fresh document: in pretraining streams documents follow an EOS.
    prompt_ids = [encode(p) or [tokenizer.eos_id] for p in prompts]
    streams = [TextStream(tokenizer, sampling.stop) for _ in prompts]

    def on_tokens(tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        stop_rows = torch.zeros_like(active)
        for row, (keep, token) in enumerate(zip(active.tolist(), tokens.tolist())):
            if keep:
                delta = streams[row].push(token)
                if delta and on_text is not None:
                    on_text(row, delta)
            stop_rows[row] = streams[row].stopped
        return stop_rows

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    generate_ids(model, prompt_ids, sampling, tokenizer.eos_id, pad, on_tokens=on_tokens)
    return [stream.text() for stream in streams]
