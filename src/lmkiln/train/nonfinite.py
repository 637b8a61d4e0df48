"""The non-finite policy: what the loop does when a step's loss or gradient norm is NaN/Inf.

The update is never applied. `train.nonfinite` then says: stop with an error naming the step and
the data position (the default), skip the step, or roll back to the last checkpoint; skipping and
rolling back give up after `train.max_nonfinite` consecutive bad steps.
"""

from __future__ import annotations

from lmkiln.config import TrainConfig
from lmkiln.errors import LmkilnError
from lmkiln.train.state import TrainState


class NonFiniteError(LmkilnError):
    """A step produced a non-finite loss or gradient norm and the policy says stop."""


def describe(step: int, loss: float, grad_norm: float, position: object, accumulation: int) -> str:
    """Where it happened: the step, its figures and the micro-batches of the data stream."""
    where = f"step {step} (loss {loss}, grad norm {grad_norm}"
    if isinstance(position, int):
        return where + f", micro-batches {position - accumulation}..{position - 1} of the data stream)"
    return where + ")"


def decide(state: TrainState, train: TrainConfig, where: str) -> str:
    """Count the bad step in `state` and return the action, "skip" or "rollback", or raise."""
    state.nonfinite_steps += 1
    state.nonfinite_streak += 1
    if train.nonfinite == "stop":
        raise NonFiniteError(
            f"non-finite loss or gradient at {where}; the update was not applied. "
            f"Lower optim.lr, check the data, or set train.nonfinite=skip"
        )
    if state.nonfinite_streak > train.max_nonfinite:
        raise NonFiniteError(
            f"{state.nonfinite_streak} consecutive non-finite steps, the last at {where}; "
            f"giving up (train.max_nonfinite={train.max_nonfinite})"
        )
    return train.nonfinite
