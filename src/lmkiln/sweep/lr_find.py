"""`lmkiln lr-find`: the learning-rate range test (Smith 2017, "Cyclical Learning Rates").

Train the configured model from its initial weights while the learning rate grows
exponentially from `start` to `end`, one step each; stop when the smoothed loss passes four times
its minimum. The suggestion is the rate where the smoothed loss falls fastest, a common choice
for the peak learning rate (the minimum's rate is already too high for a whole run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lmkiln.config import Config, resolve
from lmkiln.errors import LmkilnError


@dataclass
class RangeTest:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    """Exponentially smoothed training loss at each rate (bias-corrected, factor 0.9)."""
    suggestion: float = math.nan
    diverged_at: float | None = None


def lr_range_test(cfg: Config, steps: int = 100, start: float = 1e-6, end: float = 1.0) -> RangeTest:
    from lmkiln.data.loader import RandomWindows
    from lmkiln.data.prepare import prepare_data
    from lmkiln.tasks.pretrain import build_transformer
    from lmkiln.train.objectives import LanguageModelLoss
    from lmkiln.train.optim import build_optimizer
    from lmkiln.train.runtime import Runtime
    from lmkiln.train.step import to_device, train_step

    if cfg.task != "pretrain":
        raise LmkilnError(f"lmkiln lr-find covers task=pretrain, not task={cfg.task}")
    if not 0 < start < end or steps < 10:
        raise LmkilnError(
            f"lr-find needs 0 < --start < --end and --steps >= 10 (got {start}, {end}, {steps})"
        )
    tokenizer, shards = prepare_data(cfg)
    run = resolve(cfg, vocab_size=tokenizer.tokenizer.vocab_size)
    cfg, t = run.cfg, run.cfg.train
    runtime = Runtime.start(t, cfg.dist)
    model = build_transformer(cfg.model, runtime.device, t.seed, t.activation_checkpointing, t.cpu_matmul)
    optimizer = build_optimizer(model, cfg.optim)
    batches = RandomWindows(shards.shards.arrays("train"), t.seq_len, run.batch.micro_batch_size, t.seed)
    result, smoothed, best = RangeTest(), 0.0, math.inf
    for step in range(steps):
        lr = start * (end / start) ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [to_device(next(batches), runtime.device) for _ in range(run.batch.accumulation)]
        loss = train_step(model, LanguageModelLoss(), micro, runtime, t.grad_clip).loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = 0.9 * smoothed + 0.1 * loss
        value = smoothed / (1 - 0.9 ** (step + 1))
        result.lrs.append(lr)
        result.losses.append(value)
        best = min(best, value)
        if not math.isfinite(value) or value > 4 * best:
            result.diverged_at = lr
            break
    result.suggestion = _steepest(result)
    return result


def _steepest(result: RangeTest) -> float:
    """The rate where the smoothed loss falls fastest per unit of log(lr), before its minimum."""
    lowest = min(range(len(result.losses)), key=result.losses.__getitem__)
    if lowest < 2:
        return result.lrs[lowest]
    slopes = [
        (result.losses[i + 1] - result.losses[i]) / math.log(result.lrs[i + 1] / result.lrs[i])
        for i in range(lowest)
    ]
    return result.lrs[min(range(len(slopes)), key=slopes.__getitem__)]


def plot_range_test(result: RangeTest, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(result.lrs, result.losses)
    ax.axvline(result.suggestion, color="tab:red", linestyle="--", label=f"suggested {result.suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title("learning-rate range test")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
