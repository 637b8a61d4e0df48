"""The training loop: one loop for pretraining, fine-tuning, LoRA, classifiers and any nn.Module.

Methods differ only in the `TrainSetup` they build (model, objective, batches, optimizer,
evaluation). The loop body reads top to bottom (`TrainLoop._step`):

    set lr → next micro-batches → train_step → guard non-finite → optimizer step
           → maybe log → maybe evaluate (early stopping, best) → maybe checkpoint

A run killed at any point resumes from its newest complete checkpoint with identical results:
the checkpoint holds weights, optimizer, counters, the data position and every RNG state
(`TrainState.save` / `TrainState.load`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkiln.config import Config, ResolvedConfig, parse_duration, resolve, to_dict
from lmkiln.errors import Interrupted, LmkilnError
from lmkiln.runs import checkpoint as ckpt
from lmkiln.runs.tensors import load_model_tensors
from lmkiln.train import distributed, nonfinite
from lmkiln.train.evaluate import Evaluator
from lmkiln.train.objectives import Batch, Objective
from lmkiln.train.observe import RunLog, Throughput, recent_train_loss
from lmkiln.train.optim import set_learning_rate
from lmkiln.train.runtime import Runtime, measure_matmul_peak
from lmkiln.train.stall import StallWatch
from lmkiln.train.state import BatchStream, Checkpointed, TrainState
from lmkiln.train.step import StepResult, to_device, train_step

log = logging.getLogger("lmkiln")


@dataclass
class TrainSetup:
    """Everything one training method provides to the loop."""

    model: nn.Module
    """The module whose weights are trained, saved and evaluated (unwrapped)."""
    objective: Objective
    train_batches: BatchStream
    optimizer: torch.optim.Optimizer
    total_steps: int
    """Optimizer steps of the whole run (the schedule's length)."""
    evaluate: Evaluator | None = None
    """Validation metrics of the model, keys `val_<metric>` (see `lmkiln.train.evaluate`)."""
    train_model: nn.Module | None = None
    """What forward/backward go through (a DDP wrapper or compiled module); defaults to model."""
    flops_per_token: float = 0.0
    """Training FLOPs per token, for the MFU estimate (0 = not reported)."""
    fingerprint: dict[str, Any] = field(default_factory=dict)
    """Settings that must not change when resuming (batch shape, tokenizer, data, model shape)."""
    tokens_in: Callable[[Batch], int] = lambda batch: batch["input_ids"].numel()
    """Tokens (or examples) a micro-batch holds, for throughput."""
    epoch_of: Callable[[], int] | None = None
    """Completed epochs of the training data, for epoch-based stopping."""
    unit: str = "tokens"
    """What tokens_in counts ('tokens' or 'examples'): the progress display says tok/s or ex/s."""
    stall_hint: str | None = None
    """When set, warn once if the validation loss has barely moved by mid-run, with this advice
    (`lmkiln.train.stall`); fine-tuning sets it."""


@dataclass
class FitResult:
    state: TrainState
    last_eval: dict[str, float]
    checkpoint: Path | None
    stop_reason: str
    first_eval: dict[str, float] = field(default_factory=dict)
    """Validation metrics of the untrained model (empty when resumed)."""
    train_loss: float | None = None
    """The mean logged training loss over the last 50 steps; None when nothing was logged."""

    def best_checkpoint(self) -> Path | None:
        """The checkpoint of the best evaluation, when it is not the last step's."""
        best = self.state.best_step
        if self.checkpoint is None or best < 0 or best == self.state.step:
            return None
        path = self.checkpoint.parent / ckpt.checkpoint_name(best)
        return path if path.is_dir() else None

    def restore_best(self, model: nn.Module) -> int:
        """Load the best checkpoint's weights into `model`; returns the step the weights are from."""
        path = self.best_checkpoint()
        if path is None:
            return self.state.step
        load_model_tensors(model, ckpt.read_checkpoint(path).model, str(path / "model.safetensors"))
        return self.state.best_step


class TrainLoop:
    """Runs the loop for one `TrainSetup`; use `fit()`.

    `cfg` is the run's `ResolvedConfig` (a plain `Config` is resolved here at this world size).
    """

    def __init__(
        self,
        setup: TrainSetup,
        cfg: Config | ResolvedConfig,
        runtime: Runtime,
        run_dir: Path | None,
        on_eval: Callable[[int, dict[str, float]], bool] | None = None,
    ) -> None:
        resolved = cfg if isinstance(cfg, ResolvedConfig) else resolve(cfg, runtime.world_size)
        if resolved.batch.world_size != runtime.world_size:
            raise LmkilnError(
                f"the batch plan was made for {resolved.batch.world_size} processes, this run has "
                f"{runtime.world_size}"
            )
        self.setup, self.cfg, self.runtime = setup, resolved.cfg, runtime
        self.tcfg = resolved.cfg.train
        self.accumulation = resolved.batch.accumulation
        self.run_dir = run_dir
        self.ckpt_root = run_dir / "checkpoints" if run_dir else None
        self.state = TrainState()
        self.train_model = setup.train_model if setup.train_model is not None else setup.model
        self.parts = Checkpointed(
            setup.model,
            setup.optimizer,
            setup.train_batches,
            setup.fingerprint,
            to_dict(resolved.cfg),
            runtime.distributed and distributed.is_sharded(setup.model),
        )
        self.budget = parse_duration(self.tcfg.max_time) if self.tcfg.max_time else 0.0
        """train.max_time in seconds (0 = no wall-clock budget)."""
        self.last_eval: dict[str, float] = {}
        self.last_saved_step = -1
        self.signum: int | None = None
        self.log = RunLog.disabled()
        # called with (step, validation metrics) after each evaluation; True stops the run
        # ("pruned": a hyper-parameter search gave up on it)
        self.on_eval = on_eval
        self.stall = StallWatch(setup.total_steps, setup.stall_hint) if setup.stall_hint else None

    @property
    def sharded(self) -> bool:
        return self.parts.sharded

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, final: bool = False) -> Path | None:
        """Write a checkpoint of the current step (a collective: every rank calls it)."""
        if self.ckpt_root is None or self.last_saved_step == self.state.step:
            return None
        start = time.perf_counter()
        path = self.state.save(self.ckpt_root, self.parts, self.runtime, self.last_eval, final)
        if self.runtime.is_main:
            best = self.state.best_step
            keep = {self.ckpt_root / ckpt.checkpoint_name(best)} if best >= 0 else set()
            ckpt.prune_checkpoints(self.ckpt_root, self.tcfg.keep_last, keep)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            record = {"step": self.state.step, "seconds": time.perf_counter() - start, "bytes": size}
            self.log.record("checkpoint", {**record, "path": str(path)})
        self.last_saved_step = self.state.step
        return path

    def restore(self, path: Path, data: bool = True, force: bool = False) -> None:
        """Apply a verified checkpoint; with data=False the data position and RNG keep going (rollback)."""
        self.state, self.last_eval = TrainState.load(path, self.parts, self.runtime, data=data, force=force)
        self.last_saved_step = self.state.step

    def resume_from(self, resume: str, force: bool) -> Path | None:
        if self.ckpt_root is None:
            raise LmkilnError("resuming needs a run directory")
        if resume == "auto":
            path = ckpt.latest_checkpoint(self.ckpt_root)
            if path is None:
                log.info("no complete checkpoint in %s; starting from scratch", self.ckpt_root)
                return None
        else:
            path = Path(resume) if Path(resume).is_dir() else self.ckpt_root / resume
        if not (path / ckpt.MANIFEST).is_file():
            available = [p.name for _, p in ckpt.list_checkpoints(self.ckpt_root)]
            raise LmkilnError(
                f"checkpoint not found: {resume} (available in {self.ckpt_root}: "
                f"{', '.join(available) or 'none'})"
            )
        self.restore(path, force=force)
        return path

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, resume: str | None = None, force: bool = False) -> FitResult:
        first_eval = self._start(resume, force)
        try:
            with self._interrupt_handlers():
                stop_reason = self._run()
        finally:
            self.log.plot(force=True)
            self.log.close()
        train_loss = recent_train_loss(self.log.history, self.state.step)
        return FitResult(self.state, self.last_eval, self._latest_path(), stop_reason, first_eval, train_loss)

    def _start(self, resume: str | None, force: bool) -> dict[str, float]:
        """Clean up, resume, open the log and evaluate the untrained model; returns that evaluation."""
        started = time.perf_counter()
        if self.ckpt_root is not None and self.runtime.is_main:
            ckpt.remove_stale_partials(self.ckpt_root)
        resumed = self.resume_from(resume, force) if resume else None
        seconds = time.perf_counter() - started
        if self.runtime.is_main:
            self.log = RunLog(self.run_dir, self.cfg.log, self.setup.total_steps, self.state.step)
        if resumed is not None:
            log.info("resumed from %s at step %d (%.1f s)", resumed, self.state.step, seconds)
            self.log.record("resume", {"step": self.state.step, "seconds": seconds, "path": str(resumed)})
        peak = measure_matmul_peak(self.runtime.device) if self.setup.flops_per_token else 0.0
        self.throughput = Throughput(self.setup.flops_per_token, peak)
        self.window_loss, self.window_steps = torch.zeros((), device=self.runtime.device), 0
        first_eval = self._run_evaluation() if self.state.step == 0 and self.setup.evaluate else {}
        self.train_model.train()
        self.started, self.seconds_before = time.perf_counter(), self.state.train_seconds
        return first_eval

    def _run(self) -> str:
        while self.state.step < self.setup.total_steps:
            stop_reason = self._step()
            if stop_reason:
                return stop_reason
        return "max_steps"

    def _step(self) -> str | None:
        """One optimizer step and what follows it; returns why the run stops after it, or None."""
        setup, tcfg = self.setup, self.tcfg
        step = self.state.step
        peak_lr = setup.optimizer.param_groups[0]["peak_lr"]
        lr = set_learning_rate(setup.optimizer, step, self._schedule_length(), self.cfg.schedule) * peak_lr
        batches = [
            to_device(next(setup.train_batches), self.runtime.device) for _ in range(self.accumulation)
        ]
        result = train_step(self.train_model, setup.objective, batches, self.runtime, tcfg.grad_clip)
        if not self._guard(result, step):
            return None
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
        epoch_before = self._count(batches, result)
        out_of_time = self._out_of_time()
        last = self.state.step == setup.total_steps or self._epochs_done() or out_of_time
        if self.state.step % tcfg.log_every == 0 or last:
            self._log_step(lr, result)
        stop = None
        if setup.evaluate is not None and (self._eval_due(epoch_before) or last):
            stop = self._evaluate(last)
            last = last or stop is not None
        if self.state.step % tcfg.save_every == 0 or last:
            self.save(final=last)
        if self.signum is not None:
            raise Interrupted(self.signum, self.state.step, self.save() or self._latest_path())
        if last:
            return stop or (
                "max_epochs" if self._epochs_done() else "max_time" if out_of_time else "max_steps"
            )
        return None

    # -- the wall-clock budget (train.max_time) ------------------------------------------------
    def _schedule_length(self) -> int:
        """Steps the schedule spans: total_steps, or with a budget the steps that fit in it.

        The fit uses the mean time per step so far (evaluations included), so the decay lands at
        the deadline; it is re-estimated every step and never exceeds total_steps.
        """
        step, elapsed = self.state.step, self.state.train_seconds
        if not self.budget or step == 0 or elapsed <= 0:
            return self.setup.total_steps
        fitted = math.ceil(step * self.budget / elapsed)
        return max(step + 1, min(self.setup.total_steps, fitted))

    def _out_of_time(self) -> bool:
        """True when the next step would end past the budget (by the mean step time so far)."""
        if not self.budget:
            return False
        step, elapsed = self.state.step, self.state.train_seconds
        if step == 1 and elapsed > self.budget:
            raise LmkilnError(
                f"train.max_time ({self.tcfg.max_time}) is shorter than one training step "
                f"({elapsed:.1f} s); raise it or make the batch smaller"
            )
        late = elapsed + elapsed / step >= self.budget
        if self.runtime.distributed:  # clocks differ by rank; stop together or collectives hang
            flag = torch.tensor(float(late), device=self.runtime.device)
            late = bool(self.runtime.all_reduce_max(flag, "time budget flag").item())
        return late

    def _count(self, batches: list[Batch], result: StepResult) -> int:
        """Advance the counters after an applied step; returns the epoch before it."""
        self.state.step += 1
        tokens = sum(self.setup.tokens_in(b) for b in batches) * self.runtime.world_size
        self.state.tokens_seen += tokens
        self.throughput.add(tokens)
        self.window_loss += result.loss
        self.window_steps += 1
        self.state.train_seconds = self.seconds_before + time.perf_counter() - self.started
        epoch_before = self.state.epoch
        if self.setup.epoch_of is not None:
            self.state.epoch = self.setup.epoch_of()
        return epoch_before

    def _eval_due(self, epoch_before: int) -> bool:
        """Every eval_every steps; epoch-based runs (max_epochs > 0) every eval_every_epochs epochs."""
        per_epochs = self.tcfg.eval_every_epochs
        if self.tcfg.max_epochs and per_epochs and self.setup.epoch_of is not None:
            return self.state.epoch != epoch_before and self.state.epoch % per_epochs == 0
        return self.state.step % self.tcfg.eval_every == 0

    def _epochs_done(self) -> bool:
        return bool(self.tcfg.max_epochs) and self.state.epoch >= self.tcfg.max_epochs

    def _latest_path(self) -> Path | None:
        if self.ckpt_root is None:
            return None
        found = ckpt.list_checkpoints(self.ckpt_root)
        return found[-1][1] if found else None

    # -- non-finite steps ----------------------------------------------------------------------
    def _guard(self, result: StepResult, step: int) -> bool:
        """Apply the step only if loss and gradient norm are finite on every rank (one host sync)."""
        flags = torch.stack(
            [
                (~torch.isfinite(result.loss) | ~torch.isfinite(result.grad_norm)).float(),
                torch.tensor(float(self.signum is not None), device=result.loss.device),
            ]
        )
        bad, interrupted = self.runtime.all_reduce_max(flags, "step health flags").tolist()
        if interrupted and self.signum is None:
            self.signum = signal.SIGTERM  # another rank was signalled; stop together
        if not bad:
            self.state.nonfinite_streak = 0
            return True
        self.setup.optimizer.zero_grad(set_to_none=True)
        loss, norm = result.loss.item(), result.grad_norm.item()
        position = self.setup.train_batches.state_dict().get("position")
        where = nonfinite.describe(step + 1, loss, norm, position, self.accumulation)
        record = {"step": step + 1, "loss": loss, "grad_norm": norm}
        self.log.record("nonfinite", {**record, "nonfinite_steps": self.state.nonfinite_steps + 1})
        if nonfinite.decide(self.state, self.tcfg, where) == "rollback":
            self._roll_back(where)
        else:
            self.log.message(f"non-finite at {where}; step skipped")
        return False

    def _roll_back(self, where: str) -> None:
        path = ckpt.latest_checkpoint(self.ckpt_root) if self.ckpt_root else None
        if path is None:
            raise nonfinite.NonFiniteError(f"non-finite loss at {where} and no checkpoint to roll back to")
        kept = (self.state.nonfinite_steps, self.state.nonfinite_streak, self.state.rollbacks + 1)
        self.restore(path, data=False, force=True)
        self.state.nonfinite_steps, self.state.nonfinite_streak, self.state.rollbacks = kept
        self.log.message(f"non-finite at {where}; rolled back to {path.name}")

    # -- logging and evaluation ----------------------------------------------------------------
    def _log_step(self, lr: float, result: StepResult) -> None:
        summed = self.runtime.all_reduce_sum(self.window_loss.clone(), "logged loss").item()
        loss = summed / max(self.window_steps, 1) / self.runtime.world_size
        self.window_loss, self.window_steps = torch.zeros((), device=self.runtime.device), 0
        values = {
            "step": self.state.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": result.grad_norm.item(),
            "tokens": self.state.tokens_seen,
            **self.throughput.report(),
            "elapsed_s": self.state.train_seconds,
            "nonfinite_steps": self.state.nonfinite_steps,
        }
        peak = self.runtime.peak_memory_mb()
        if peak is not None:
            values["peak_memory_mb"] = peak
        if self.state.epoch:
            values["epoch"] = self.state.epoch
        # An objective may report figures of its own (preference: reward margin and accuracy).
        logged_metrics = getattr(self.setup.objective, "logged_metrics", None)
        if logged_metrics is not None:
            values.update(logged_metrics())
        self.log.record("train", values)
        rate = self.state.step / max(self.state.train_seconds, 1e-9)
        eta = (self.setup.total_steps - self.state.step) / rate if rate else float("inf")
        if self.budget:  # a time budget usually ends the run long before max_steps
            eta = min(eta, max(0.0, self.budget - self.state.train_seconds))
        shown = {"loss": loss, "lr": lr, "grad": values["grad_norm"]}
        shown[f"{self.setup.unit}_per_s"] = values["tokens_per_s"]
        if "mfu" in values:
            shown["mfu"] = values["mfu"]
        self.log.progress(self.state.step, shown, eta)

    def _run_evaluation(self) -> dict[str, float]:
        model = self.setup.model
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.runtime.autocast():
            metrics = self.setup.evaluate(model, self.runtime)
        model.train(was_training)
        where = {"step": self.state.step}
        if self.setup.epoch_of is not None:
            where["epoch"] = self.state.epoch
        self.log.record("eval", {**where, **metrics})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self.log.message("eval " + " ".join(f"{k} {v}" for k, v in where.items()) + ": " + shown)
        stalled = self.stall.check(self.state.step, metrics) if self.stall else None
        if stalled and self.runtime.is_main:
            log.warning("%s", stalled["message"])
            self.log.record("stall", stalled)
        return metrics

    def _evaluate(self, final: bool = False) -> str | None:
        """Run validation, track the best value; why the run stops now ("early_stopping", "pruned"), or None."""
        metrics = self.last_eval = self._run_evaluation()
        self.log.plot()
        patience_spent = self._improved_or_patient(metrics, final)
        if self.on_eval is not None and self.on_eval(self.state.step, metrics):
            return "pruned"
        return "early_stopping" if patience_spent else None

    def _improved_or_patient(self, metrics: dict[str, float], final: bool) -> bool:
        """Track the best value (saving its checkpoint); True when early stopping says stop."""
        value = metrics[self._monitor(metrics)]
        best = self.state.best_value
        sign = 1 if self.tcfg.monitor_mode == "min" else -1
        if math.isfinite(value) and (best is None or sign * (best - value) > self.tcfg.min_delta):
            self.state.best_value, self.state.best_step, self.state.bad_evals = value, self.state.step, 0
            self.save(final=final)
            return False
        self.state.bad_evals += 1
        return self.tcfg.patience > 0 and self.state.bad_evals >= self.tcfg.patience

    def _monitor(self, metrics: dict[str, float]) -> str:
        """The monitored key; a bare name (`accuracy`, as lmkiln 0.1 fine-tuning reported it) means val_<name>."""
        monitor = self.tcfg.monitor
        if monitor not in metrics and f"val_{monitor}" in metrics:
            return f"val_{monitor}"
        if monitor not in metrics:
            raise LmkilnError(
                f"train.monitor {monitor!r} is not a validation metric here; available: {', '.join(metrics)}"
            )
        return monitor

    @contextlib.contextmanager
    def _interrupt_handlers(self) -> Iterator[None]:
        """First SIGINT/SIGTERM: finish the step, save, stop. A second SIGINT exits at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.signum is not None and signum == signal.SIGINT:
                os._exit(130)
            self.signum = signum
            self.log.message(
                f"{signal.Signals(signum).name} received: saving a checkpoint after this step "
                f"(Ctrl-C again to quit at once)"
            )

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
