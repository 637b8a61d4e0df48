"""A run that is not learning: warn once when the validation loss has barely moved by mid-run.

A fine-tuning run with too low a learning rate looks healthy (finite losses, steady throughput)
and ends with a model that learned nothing. The first evaluation after `STALL_SHARE` of the steps
compares the validation loss with the untrained model's; a drop under `STALL_MIN_DROP` of it is
reported once, on the console and as a `stall` event in metrics.jsonl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STALL_SHARE = 0.5
"""Share of the run's steps after which the validation loss is checked (once)."""
STALL_MIN_DROP = 0.10
"""Relative drop of the validation loss from the first evaluation below which the run is stalled."""


@dataclass
class StallWatch:
    """Fed every evaluation's validation loss; `check` returns the warning once, or None."""

    total_steps: int
    hint: str
    """What to try, e.g. "the learning rate (1e-4) may be too low for LoRA; raise optim.lr"."""
    metric: str = "val_loss"
    first: float | None = None
    checked: bool = False

    def check(self, step: int, metrics: dict[str, float]) -> dict | None:
        """The stall event's values ({step, share, first, current, drop, message}) or None."""
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value) or self.checked:
            return None
        if self.first is None:
            # The untrained model's loss is the reference; a resumed run has none (comparing with a
            # mid-run value would call a normal late plateau a stall), so it is not watched.
            self.first, self.checked = value, step > 0
            return None
        if step < self.total_steps * STALL_SHARE:
            return None
        self.checked = True
        drop = (self.first - value) / abs(self.first) if self.first else 0.0
        if drop >= STALL_MIN_DROP:
            return None
        share = step / max(self.total_steps, 1)
        message = (
            f"validation loss {self.first:.3g} → {value:.3g} after {share:.0%} of the steps "
            f"(less than {STALL_MIN_DROP:.0%} lower): {self.hint}"
        )
        return {
            "step": step,
            "share": share,
            "first": self.first,
            "current": value,
            "drop": drop,
            "message": message,
        }
