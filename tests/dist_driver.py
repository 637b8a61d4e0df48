"""Run under torchrun by tests/test_distributed.py for faults that need code inside the workers."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import torch


def hang(timeout_s: float) -> None:
    """Rank 1 never joins the collective; rank 0 must fail with an error naming it."""
    from lmkiln.config import DistConfig, TrainConfig
    from lmkiln.errors import LmkilnError
    from lmkiln.train.runtime import Runtime

    runtime = Runtime.start(TrainConfig(device="cpu"), DistConfig(timeout_s=timeout_s))
    if runtime.rank == 1:
        time.sleep(120)
    start = time.perf_counter()
    try:
        runtime.all_reduce_sum(torch.ones(1), "test gradient sum")
    except LmkilnError as err:
        print(f"rank {runtime.rank} after {time.perf_counter() - start:.1f}s: {err}", flush=True)
        os._exit(3)
    os._exit(0)


def nan_on_rank1(args: list[str], out: str) -> None:
    """Rank 1's loss is NaN at its 3rd training step; with nonfinite=skip both ranks must skip."""
    from lmkiln.config import load_config
    from lmkiln.tasks.pretrain import pretrain
    from lmkiln.train.objectives import LanguageModelLoss

    original, calls = LanguageModelLoss.__call__, {"n": 0}

    def call(self, model, batch):
        loss = original(self, model, batch)
        if model.training and os.environ["RANK"] == "1":
            calls["n"] += 1
            if calls["n"] == 3:
                return loss * float("nan")
        return loss

    LanguageModelLoss.__call__ = call
    result = pretrain(load_config(overrides=args))
    digest = hashlib.sha256()
    for name, tensor in sorted(result.model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().numpy().tobytes())
    with open(f"{out}.rank{os.environ['RANK']}", "w") as fh:
        json.dump(
            {
                "hash": digest.hexdigest(),
                "nonfinite": result.fit.state.nonfinite_steps,
                "step": result.fit.state.step,
            },
            fh,
        )


if __name__ == "__main__":
    if sys.argv[1] == "hang":
        hang(float(sys.argv[2]))
    else:
        nan_on_rank1([a for a in sys.argv[3:] if a != "--"], sys.argv[2])
