"""The training loop: one loop for pretraining, fine-tuning, LoRA and classifiers.

Methods differ only in the `TrainSetup` they build (model, objective, batches, optimizer,
evaluation). The loop body reads top to bottom:

    set lr → next micro-batches → train_step → guard non-finite → optimizer step
           → maybe log → maybe evaluate (early stopping, best) → maybe checkpoint

A run killed at any point resumes from its newest complete checkpoint with identical results:
the checkpoint holds weights, optimizer, counters, the data position and every RNG state.
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
from typing import Any, Protocol

import torch
from torch import nn

from lmkiln.config import Config, to_dict
from lmkiln.errors import Interrupted, LmkilnError
from lmkiln.train import checkpoint as ckpt
from lmkiln.train import distributed
from lmkiln.train.objectives import Batch, Objective
from lmkiln.train.observe import RunLog, Throughput
from lmkiln.train.optim import set_learning_rate
from lmkiln.train.runtime import Runtime, measure_matmul_peak
from lmkiln.train.state import TrainState, capture_rng, load_optimizer_state, optimizer_state, restore_rng

log = logging.getLogger("lmkiln")


class BatchStream(Protocol):
    """Endless micro-batches whose position can be saved and restored."""

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


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
    evaluate: Callable[[nn.Module, Runtime], dict[str, float]] | None = None
    """Validation metrics of the model (called in eval mode, without grad)."""
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


@dataclass
class FitResult:
    state: TrainState
    last_eval: dict[str, float]
    checkpoint: Path | None
    stop_reason: str
    first_eval: dict[str, float] = field(default_factory=dict)
    """Validation metrics of the untrained model (empty when resumed)."""


class NonFiniteError(LmkilnError):
    """A step produced a non-finite loss or gradient norm and the policy says stop."""


# --------------------------------------------------------------------------------------------
# The step


@dataclass
class StepResult:
    loss: torch.Tensor
    """Mean loss over every target of the step (on the device; no host sync)."""
    grad_norm: torch.Tensor
    """Global gradient norm before clipping."""
    targets: torch.Tensor


def _sync_gradients(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP: skip the all-reduce on all but the last micro-batch; FSDP2: the same via its flag."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(
    model: nn.Module, objective: Objective, micro_batches: list[Batch], runtime: Runtime, grad_clip: float
) -> StepResult:
    """Forward/backward over the micro-batches, normalised by the targets of the whole step.

    Gradients are left in `.grad` (clipped); the caller decides whether to apply them.
    """
    targets = torch.stack([objective.count(b) for b in micro_batches]).sum().to(runtime.device, torch.float32)
    targets = runtime.all_reduce_sum(targets, "step target count")
    # DDP averages gradients over ranks, so each rank's share is scaled up by world_size.
    scale = runtime.world_size / targets.clamp(min=1)
    loss_sum = torch.zeros((), device=runtime.device)
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with _sync_gradients(model, last), runtime.autocast():
            micro_loss = objective(model, batch)
        (micro_loss * scale).backward()
        loss_sum += micro_loss.detach().float()
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    return StepResult(loss=loss_sum * scale / runtime.world_size, grad_norm=grad_norm, targets=targets)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


# --------------------------------------------------------------------------------------------
# Checkpoint state


def tied_aliases(model: nn.Module) -> set[str]:
    """Parameter names that are a second name of an earlier parameter (tied weights)."""
    seen: set[int] = set()
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def model_tensors(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict (or a gathered one) with tied weights stored once (safetensors refuses shared storage)."""
    aliases = tied_aliases(model)
    state = model.state_dict() if state is None else state
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = set(model_tensors(model))
    missing, unexpected = expected - set(tensors), set(tensors) - set(model.state_dict())
    if missing or unexpected:
        raise LmkilnError(
            f"{source}: weights do not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); was it saved from a different model shape?"
        )
    for name, tensor in tensors.items():
        if model.state_dict()[name].shape != tensor.shape:
            raise LmkilnError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(model.state_dict()[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)


class TrainLoop:
    """Runs the loop for one `TrainSetup`; use `fit()`."""

    def __init__(self, setup: TrainSetup, cfg: Config, runtime: Runtime, run_dir: Path | None) -> None:
        self.setup, self.cfg, self.runtime = setup, cfg, runtime
        self.tcfg = cfg.train
        self.run_dir = run_dir
        self.ckpt_root = run_dir / "checkpoints" if run_dir else None
        self.state = TrainState()
        self.train_model = setup.model if setup.train_model is None else setup.train_model
        self.micro = self.tcfg.micro_batch_size or self.tcfg.batch_size
        per_rank = self.tcfg.batch_size // runtime.world_size
        if self.tcfg.batch_size % runtime.world_size or per_rank % self.micro:
            raise LmkilnError(
                f"train.batch_size ({self.tcfg.batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro}) × processes ({runtime.world_size})"
            )
        self.accumulation = per_rank // self.micro
        self.last_eval: dict[str, float] = {}
        self.last_saved_step = -1
        self.signum: int | None = None
        self.sharded = runtime.distributed and distributed.is_sharded(setup.model)

    # -- state ---------------------------------------------------------------------------------
    def trainer_json(self, optimizer_meta: dict) -> dict:
        return {
            "format": ckpt.FORMAT,
            "state": self.state.to_dict(),
            "optimizer": optimizer_meta,
            "data": self.setup.train_batches.state_dict(),
            "fingerprint": self.setup.fingerprint,
            "config": to_dict(self.cfg),
            "last_eval": self.last_eval,
            "world_size": self.runtime.world_size,
            "sharded": self.sharded,
        }

    def save(self, final: bool = False) -> Path | None:
        """Write a checkpoint of the current step (a collective: every rank calls it)."""
        if self.ckpt_root is None or self.last_saved_step == self.state.step:
            return None
        runtime, model, optimizer = self.runtime, self.setup.model, self.setup.optimizer
        start = time.perf_counter()
        with ckpt.CheckpointWriter(
            self.ckpt_root, self.state.step, runtime.is_main, runtime.barrier
        ) as writer:
            rng_tensors, rng_meta = capture_rng()  # every rank keeps its own generators
            writer.tensors(f"rng_rank{runtime.rank}.safetensors", rng_tensors)
            writer.json(f"rng_rank{runtime.rank}.json", rng_meta)
            if self.sharded:
                with runtime.collective("sharded checkpoint save"):
                    groups = distributed.save_sharded(writer.tmp / "dcp", model, optimizer)
                    full = distributed.full_model_state(model) if final else None
                if runtime.is_main:
                    if full is not None:  # the last checkpoint also holds consolidated weights for export
                        writer.tensors("model.safetensors", model_tensors(model, full))
                    writer.json("trainer.json", self.trainer_json({"param_groups": groups}))
            elif runtime.is_main:
                writer.tensors("model.safetensors", model_tensors(model))
                opt_tensors, opt_meta = optimizer_state(optimizer)
                writer.tensors("optimizer.safetensors", opt_tensors)
                writer.json("trainer.json", self.trainer_json(opt_meta))
            path = writer.commit()
        if runtime.is_main:
            best = self.state.best_step
            keep = {self.ckpt_root / ckpt.checkpoint_name(best)} if best >= 0 else set()
            ckpt.prune_checkpoints(self.ckpt_root, self.tcfg.keep_last, keep)
            self.log.record(
                "checkpoint",
                {
                    "step": self.state.step,
                    "seconds": time.perf_counter() - start,
                    "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                    "path": str(path),
                },
            )
        self.last_saved_step = self.state.step
        return path

    def restore(self, path: Path, data: bool = True, force: bool = False) -> None:
        """Apply a verified checkpoint; with data=False the data position and RNG keep going (rollback)."""
        runtime = self.runtime
        saved = ckpt.read_checkpoint(path, rank=runtime.rank)
        trainer = saved.trainer
        self._check_drift(trainer.get("fingerprint", {}), force)
        if saved.sharded is not None:
            with runtime.collective("sharded checkpoint load"):
                distributed.load_sharded(
                    saved.sharded,
                    self.setup.model,
                    self.setup.optimizer,
                    trainer["optimizer"]["param_groups"],
                )
        elif self.sharded:
            raise LmkilnError(f"{path} was written without FSDP; resume it with --dist.strategy ddp")
        else:
            load_model_tensors(self.setup.model, saved.model, str(path / "model.safetensors"))
            load_optimizer_state(self.setup.optimizer, saved.optimizer, trainer["optimizer"])
        rollbacks = self.state.rollbacks
        self.state = TrainState.from_dict(trainer["state"])
        self.last_eval = trainer.get("last_eval", {})
        if data:
            self.setup.train_batches.load_state_dict(trainer["data"])
            if saved.rng or saved.rng_meta:
                restore_rng(saved.rng, saved.rng_meta)
            else:
                log.warning(
                    "no RNG state for rank %d in %s (world size changed); dropout randomness restarts",
                    runtime.rank,
                    path,
                )
        else:
            self.state.rollbacks = rollbacks + 1
        self.last_saved_step = self.state.step

    def _check_drift(self, old: dict, force: bool) -> None:
        new = self.setup.fingerprint
        changes = [
            f"{k}: {old.get(k)!r} → {new.get(k)!r}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]
        if not changes:
            return
        text = "; ".join(changes)
        if not force:
            raise LmkilnError(
                f"refusing to resume: the run would change ({text}); start a new run, or pass "
                f"--force to resume anyway"
            )
        log.warning("resuming with changed settings (--force): %s", text)

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
        setup, tcfg, runtime = self.setup, self.tcfg, self.runtime
        resume_start = time.perf_counter()
        if self.ckpt_root is not None and runtime.is_main:
            ckpt.remove_stale_partials(self.ckpt_root)
        resumed = self.resume_from(resume, force) if resume else None
        resume_seconds = time.perf_counter() - resume_start
        self.log = (
            RunLog(self.run_dir, self.cfg.log, setup.total_steps, self.state.step)
            if runtime.is_main
            else RunLog.disabled()
        )
        if resumed is not None:
            log.info("resumed from %s at step %d (%.1f s)", resumed, self.state.step, resume_seconds)
            self.log.record(
                "resume", {"step": self.state.step, "seconds": resume_seconds, "path": str(resumed)}
            )
        first_eval = self._evaluate_start() if self.state.step == 0 and setup.evaluate is not None else {}
        peak = measure_matmul_peak(runtime.device) if setup.flops_per_token else 0.0
        throughput = Throughput(setup.flops_per_token, peak)
        window_loss, window_steps = torch.zeros((), device=runtime.device), 0
        stop_reason = "max_steps"
        self.train_model.train()
        started = time.perf_counter()
        seconds_before = self.state.train_seconds
        try:
            with self._interrupt_handlers():
                while self.state.step < setup.total_steps:
                    step = self.state.step
                    lr = (
                        set_learning_rate(setup.optimizer, step, setup.total_steps, self.cfg.schedule)
                        * setup.optimizer.param_groups[0]["peak_lr"]
                    )
                    batches = [
                        _to_device(next(setup.train_batches), runtime.device)
                        for _ in range(self.accumulation)
                    ]
                    result = train_step(self.train_model, setup.objective, batches, runtime, tcfg.grad_clip)
                    if not self._guard(result, step):
                        continue
                    setup.optimizer.step()
                    setup.optimizer.zero_grad(set_to_none=True)
                    self.state.step += 1
                    tokens = sum(setup.tokens_in(b) for b in batches) * runtime.world_size
                    self.state.tokens_seen += tokens
                    throughput.add(tokens)
                    window_loss += result.loss
                    window_steps += 1
                    self.state.train_seconds = seconds_before + time.perf_counter() - started
                    epoch_before = self.state.epoch
                    if setup.epoch_of is not None:
                        self.state.epoch = setup.epoch_of()
                    last = self.state.step == setup.total_steps or self._epochs_done()
                    if self.state.step % tcfg.log_every == 0 or last:
                        self._log_step(window_loss, window_steps, lr, result, throughput)
                        window_loss, window_steps = torch.zeros((), device=runtime.device), 0
                    if setup.evaluate is not None and (self._eval_due(epoch_before) or last):
                        if self._evaluate(final=last):
                            stop_reason = "early_stopping"
                            last = True
                    if self.state.step % tcfg.save_every == 0 or last:
                        self.save(final=last)
                    if self.signum is not None:
                        path = self.save()
                        raise Interrupted(self.signum, self.state.step, path or self._latest_path())
                    if last:
                        if self._epochs_done():
                            stop_reason = "max_epochs"
                        break
        finally:
            self.log.plot(force=True)
            self.log.close()
        return FitResult(self.state, self.last_eval, self._latest_path(), stop_reason, first_eval)

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

    def _guard(self, result: StepResult, step: int) -> bool:
        """Apply the step only if loss and gradient norm are finite on every rank (one host sync)."""
        flags = torch.stack(
            [
                (~torch.isfinite(result.loss) | ~torch.isfinite(result.grad_norm)).float(),
                torch.tensor(float(self.signum is not None), device=result.loss.device),
            ]
        )
        flags = self.runtime.all_reduce_max(flags, "step health flags")
        bad, interrupted = flags.tolist()
        if interrupted and self.signum is None:
            self.signum = signal.SIGTERM  # another rank was signalled; stop together
        if not bad:
            self.state.nonfinite_streak = 0
            return True
        self.setup.optimizer.zero_grad(set_to_none=True)
        self.state.nonfinite_steps += 1
        self.state.nonfinite_streak += 1
        loss, norm = result.loss.item(), result.grad_norm.item()
        position = self.setup.train_batches.state_dict().get("position")
        where = f"step {step + 1} (loss {loss}, grad norm {norm}"
        where += (
            f", micro-batches {position - self.accumulation}..{position - 1} of the data stream)"
            if isinstance(position, int)
            else ")"
        )
        self.log.record(
            "nonfinite",
            {
                "step": step + 1,
                "loss": loss,
                "grad_norm": norm,
                "nonfinite_steps": self.state.nonfinite_steps,
            },
        )
        policy = self.tcfg.nonfinite
        if policy == "stop":
            raise NonFiniteError(
                f"non-finite loss or gradient at {where}; the update was not applied. "
                f"Lower optim.lr, check the data, or set train.nonfinite=skip"
            )
        if self.state.nonfinite_streak > self.tcfg.max_nonfinite:
            raise NonFiniteError(
                f"{self.state.nonfinite_streak} consecutive non-finite steps, the last at {where}; "
                f"giving up (train.max_nonfinite={self.tcfg.max_nonfinite})"
            )
        if policy == "rollback":
            path = ckpt.latest_checkpoint(self.ckpt_root) if self.ckpt_root else None
            if path is None:
                raise NonFiniteError(f"non-finite loss at {where} and no checkpoint to roll back to")
            counts = (self.state.nonfinite_steps, self.state.nonfinite_streak)
            self.restore(path, data=False, force=True)
            self.state.nonfinite_steps, self.state.nonfinite_streak = counts
            self.log.message(f"non-finite at {where}; rolled back to {path.name}")
        else:
            self.log.message(f"non-finite at {where}; step skipped")
        return False

    def _log_step(
        self,
        window_loss: torch.Tensor,
        window_steps: int,
        lr: float,
        result: StepResult,
        throughput: Throughput,
    ) -> None:
        loss = (
            self.runtime.all_reduce_sum(window_loss.clone(), "logged loss").item()
            / max(window_steps, 1)
            / self.runtime.world_size
        )
        values = {
            "step": self.state.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": result.grad_norm.item(),
            "tokens": self.state.tokens_seen,
            **throughput.report(),
            "elapsed_s": self.state.train_seconds,
            "nonfinite_steps": self.state.nonfinite_steps,
        }
        if self.state.epoch:
            values["epoch"] = self.state.epoch
        self.log.record("train", values)
        rate = self.state.step / max(self.state.train_seconds, 1e-9)
        eta = (self.setup.total_steps - self.state.step) / rate if rate else float("inf")
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
        self.log.message(
            "eval "
            + " ".join(f"{k} {v}" for k, v in where.items())
            + ": "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        )
        return metrics

    def _evaluate_start(self) -> dict[str, float]:
        """The untrained model's metrics: the starting point of every curve (not a candidate for best)."""
        return self._run_evaluation()

    def _evaluate(self, final: bool = False) -> bool:
        """Run validation, track the best value; True when early stopping says stop."""
        metrics = self.last_eval = self._run_evaluation()
        self.log.plot()
        monitor = self.tcfg.monitor
        if monitor not in metrics:
            raise LmkilnError(
                f"train.monitor {monitor!r} is not a validation metric here; available: {', '.join(metrics)}"
            )
        value = metrics[monitor]
        best = self.state.best_value
        sign = 1 if self.tcfg.monitor_mode == "min" else -1
        if math.isfinite(value) and (best is None or sign * (best - value) > self.tcfg.min_delta):
            self.state.best_value, self.state.best_step, self.state.bad_evals = value, self.state.step, 0
            self.save(final=final)
            return False
        self.state.bad_evals += 1
        return self.tcfg.patience > 0 and self.state.bad_evals >= self.tcfg.patience

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
