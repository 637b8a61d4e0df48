"""Time to a target validation loss on a real corpus (characters): lmkiln's recipe vs the Trainer.

lmkiln runs `pretrain` (what `lmkiln train --recipe RECIPE --data.corpus PATH` runs) with the
recipe RECIPE. The peer is `transformers.Trainer` training GPT2LMHeadModel of the same shape
(4L/4H/128, context 64, biases, tied embeddings) on the same token shards with nanoGPT's CPU
Shakespeare settings (batch 12, AdamW lr 1e-3, betas 0.9/0.99, weight decay 0.1, 100 warmup
steps, cosine over 2000 steps, clip 1.0). Both are evaluated every `eval_every` steps by the same
function — lmkiln's validation evaluator (`lm_evaluator`: the same fixed windows of the held-out
tail, mean cross-entropy per token) — and the clock counts training only: from the first step,
minus the time spent evaluating (lmkiln's clock starts after its evaluation of the untrained
model, so its matmul-peak probe for the MFU display counts against it). A run stops at the first evaluation at or below the target.
"""

from __future__ import annotations

import logging
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import load_average, ratio

log = logging.getLogger("lmkiln.bench")

RECIPE = "shakespeare-char-fast"
PEER = {"lr": 1e-3, "batch_size": 12, "warmup": 100, "max_steps": 2000}


class TargetReached(Exception):
    """Raised from the evaluation callback to end a run at the target (the benchmark catches it)."""


class EvalClock:
    """Wraps an evaluate(model, runtime) function: times it, keeps the curve, stops at the target."""

    def __init__(self, evaluate, target: float, stop: bool = True) -> None:
        self.evaluate, self.target, self.stop = evaluate, target, stop
        self.start: float | None = None
        self.eval_seconds = 0.0
        self.curve: list[tuple[float, float]] = []  # (training seconds, val_loss)
        self.reached: float | None = None

    def begin(self) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def __call__(self, model: nn.Module, runtime) -> dict[str, float]:
        began = time.perf_counter()
        metrics = self.evaluate(model, runtime)
        ended = time.perf_counter()
        if self.start is None:  # lmkiln's evaluation of the untrained model: training starts now
            self.start = ended
            return metrics
        trained = began - self.start - self.eval_seconds
        self.eval_seconds += ended - began
        self.curve.append((round(trained, 2), round(metrics["val_loss"], 4)))
        if self.reached is None and metrics["val_loss"] <= self.target:
            self.reached = trained
            if self.stop:
                raise TargetReached
        return metrics


class HFLogits(nn.Module):
    """A GPT2LMHeadModel seen as lmkiln sees a model: forward(input_ids) → logits, or with
    targets the summed cross-entropy (what `LanguageModelLoss` asks of a model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, label_smoothing: float = 0.0, **_
    ) -> torch.Tensor:
        logits = self.model(input_ids=input_ids).logits  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=-100,
            reduction="sum",
            label_smoothing=label_smoothing,
        )


def lmkiln_config(
    corpus: str, cache: str, run_dir: str, eval_every: int, eval_tokens: int, max_steps: int = 0
):
    from lmkiln.config import load_config

    extra = [f"train.max_steps={max_steps}"] if max_steps else []
    return load_config(
        recipe=RECIPE,
        overrides=[
            f"data.corpus={corpus}",
            f"data.cache_dir={cache}",
            f"train.run_dir={run_dir}",
            f"train.eval_every={eval_every}",
            f"train.eval_tokens={eval_tokens}",
            "train.save_every=1000000",
            "train.sample_tokens=0",
            "log.progress=off",
            "log.plot=false",
            *extra,
        ],
    )


def run_lmkiln(corpus: str, target: float, eval_every: int, eval_tokens: int) -> dict:
    """pretrain() with the recipe; the evaluator is wrapped to keep time and stop at the target."""
    import lmkiln.tasks.pretrain as pretrain_module

    with tempfile.TemporaryDirectory(prefix="lmkiln-bench-ttl-") as work:
        cfg = lmkiln_config(corpus, f"{work}/cache", f"{work}/run", eval_every, eval_tokens)
        original = pretrain_module.lm_evaluator
        clocks: list[EvalClock] = []

        def timed_evaluator(shards, config, eos_id):
            clocks.append(EvalClock(original(shards, config, eos_id), target))
            return clocks[-1]

        pretrain_module.lm_evaluator = timed_evaluator
        try:
            pretrain_module.pretrain(cfg, overwrite=True)
        except TargetReached:
            pass
        finally:
            pretrain_module.lm_evaluator = original
        clock = clocks[-1]
    return {
        "recipe": RECIPE,
        "seconds_to_target": None if clock.reached is None else round(clock.reached, 2),
        "curve": clock.curve,
        "settings": {
            "lr": cfg.optim.lr,
            "batch_size": cfg.train.batch_size,
            "warmup": cfg.schedule.warmup_steps,
            "max_steps": cfg.train.max_steps,
            "schedule": cfg.schedule.name,
        },
    }


def run_peer(corpus: str, target: float, eval_every: int, eval_tokens: int) -> dict:
    """transformers.Trainer on lmkiln's shards of the same corpus, evaluated by lmkiln's evaluator."""
    from transformers import TrainerCallback

    from benchmarks import peers
    from benchmarks.common import Shape
    from lmkiln.data.prepare import build_tokenizer
    from lmkiln.data.shards import prepare_shards
    from lmkiln.tasks.pretrain import lm_evaluator
    from lmkiln.train.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="lmkiln-bench-ttl-") as work:
        cfg = lmkiln_config(corpus, f"{work}/cache", f"{work}/run", eval_every, eval_tokens)
        tokenizer = build_tokenizer(cfg).tokenizer
        shards = prepare_shards(cfg.data, tokenizer).shards
        tokens = np.concatenate(shards.arrays("train"))
        m = cfg.model
        shape = Shape(
            "ttl", m.n_layer, m.n_head, m.d_model, cfg.train.seq_len, PEER["batch_size"], tokenizer.vocab_size
        )
        clock = EvalClock(lm_evaluator(shards, cfg, None), target, stop=False)
        runtime = Runtime(torch.device("cpu"))

        class Evaluate(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.begin()

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % eval_every == 0:
                    model.eval()
                    with torch.no_grad():
                        clock(HFLogits(model), runtime)
                    model.train()
                control.should_training_stop = clock.reached is not None

        peers.hf_trainer_run(
            shape,
            PEER["max_steps"],
            tokens,
            torch.device("cpu"),
            lr=PEER["lr"],
            warmup=PEER["warmup"],
            callbacks=[Evaluate()],
        )
    return {
        "recipe": "nanoGPT CPU Shakespeare settings via transformers.Trainer",
        "seconds_to_target": None if clock.reached is None else round(clock.reached, 2),
        "curve": clock.curve,
        "settings": {**PEER, "schedule": "cosine"},
    }


def measure(corpus: str, target: float, eval_every: int, eval_tokens: int) -> dict:
    loads = [load_average()[0]]
    ours = run_lmkiln(corpus, target, eval_every, eval_tokens)
    loads.append(load_average()[0])
    theirs = run_peer(corpus, target, eval_every, eval_tokens)
    loads.append(load_average()[0])
    lm, peer = ours["seconds_to_target"], theirs["seconds_to_target"]
    return {
        "corpus": corpus,
        "target_val_loss": target,
        "eval_every": eval_every,
        "eval_tokens": eval_tokens,
        "lmkiln": ours,
        "transformers": theirs,
        "time_ratio_lmkiln_over_transformers": None
        if lm is None or peer is None
        else round(ratio(lm, peer), 3),
        "load_average": loads,
    }
