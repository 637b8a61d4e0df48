"""`Trainer`: bring any `nn.Module` and (x, y) data to THE training loop.

    trainer = Trainer(model, (x_train, y_train), (x_val, y_val),
                      loss="cross_entropy", optimizer="sgd", lr=0.01, epochs=20, batch_size=32)
    result = trainer.fit()               # progress, evaluation, early stopping, checkpoints, plots
    trainer.evaluate((x_test, y_test))   # {"loss": ..., "accuracy": ..., "f1_macro": ...}

There is no second loop: the Trainer builds a `TrainSetup` (epoch batches of the examples, the
named loss, the optimizer, a whole-set validation) and runs `TrainLoop`, the loop that pretrains
language models, so resume, signals, non-finite guards, metrics.jsonl and plots come with it.

Without `config=`, the defaults are plain PyTorch's rather than the language-model recipes':
Adam (lr 1e-3, betas 0.9/0.999), no weight decay, no momentum, no gradient clipping, a constant
learning rate, 10 epochs of batches of 32, one evaluation per epoch. Everything else is a
config field, settable with `overrides={"optim.nesterov": True, ...}`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkiln.config import Config, OptimConfig, batch_plan, build_config, flatten, resolve, to_dict
from lmkiln.data.labelled import Examples, as_examples, as_features, collate, to_tensor
from lmkiln.data.loader import epoch_stream
from lmkiln.errors import LmkilnError
from lmkiln.runs.rundir import open_run_dir
from lmkiln.train.loop import FitResult, TrainLoop, TrainSetup
from lmkiln.train.metrics import (
    DEFAULT_METRICS,
    HIGHER_IS_BETTER,
    LOWER_IS_BETTER,
    METRIC_NAMES,
    confusion_matrix,
    per_class_f1,
    task_metrics,
)
from lmkiln.train.objectives import SupervisedLoss, loss_from_criterion
from lmkiln.train.optim import OPTIMIZERS, build_optimizer
from lmkiln.train.runtime import Runtime

log = logging.getLogger("lmkiln")

Data = Any
"""(x, y) arrays or tensors with one row per example, or a map-style Dataset of (x, y) pairs."""
Metric = Callable[[torch.Tensor, torch.Tensor], float]
"""A custom metric: fn(outputs (N, ...), targets (N, ...)) → float over the whole set."""

CLASSIC_DEFAULTS: dict[str, Any] = {
    "task": "supervised",
    "name": "trainer",
    "optim.name": "adam",
    "optim.lr": 1e-3,
    "optim.betas": [0.9, 0.999],
    "optim.weight_decay": 0.0,
    "optim.momentum": 0.0,
    "schedule.name": "constant",
    "schedule.warmup_steps": 0,
    "train.grad_clip": 0.0,
    "train.batch_size": 32,
    "train.max_epochs": 10,
    "train.eval_every_epochs": 1,
    "train.log_every": 50,
    "train.sample_tokens": 0,
}

# Trainer keyword → config key
_KEYWORDS = {
    "lr": "optim.lr",
    "schedule": "schedule.name",
    "weight_decay": "optim.weight_decay",
    "epochs": "train.max_epochs",
    "steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "monitor": "train.monitor",
    "monitor_mode": "train.monitor_mode",
    "patience": "train.patience",
    "min_delta": "train.min_delta",
    "run_dir": "train.run_dir",
    "name": "name",
    "device": "train.device",
    "seed": "train.seed",
}


def metric_mode(name: str) -> str | None:
    """'min' or 'max' for a known metric (with or without the val_ prefix), else None."""
    base = name.removeprefix("val_")
    if base in LOWER_IS_BETTER:
        return "min"
    if base in HIGHER_IS_BETTER:
        return "max"
    return None


@dataclass
class TrainResult:
    metrics: dict[str, float]
    """Validation metrics of the model as returned (the best checkpoint's, if it was restored)."""
    history: list[dict[str, Any]]
    """Every evaluation of the run: step, epoch and the val_ metrics (the first one is step 0)."""
    stop_reason: str
    """max_epochs, max_steps or early_stopping."""
    steps: int
    epochs: int
    """Completed passes over the training data."""
    steps_per_epoch: int
    best_step: int | None
    best_value: float | None
    seconds: float
    """Wall time of the training steps (evaluation included, start-up excluded)."""
    run_dir: Path | None
    checkpoint: Path | None
    """The checkpoint whose weights the model holds now."""
    restored_best: bool
    fit: FitResult = field(repr=False)

    @property
    def best_epoch(self) -> float | None:
        """Epochs trained when the monitored metric was best ("epochs to convergence")."""
        return None if self.best_step is None else self.best_step / self.steps_per_epoch


@dataclass
class Report:
    """A whole-set evaluation with the confusion matrix and per-class F1 (classification)."""

    metrics: dict[str, float]
    examples: int
    confusion: torch.Tensor | None = None
    """(C, C) counts, rows are true classes."""
    per_class_f1: list[float] | None = None
    class_names: list[str] = field(default_factory=list)

    def save_confusion_matrix(self, path: str | Path, title: str = "") -> Path:
        from lmkiln.train.plots import plot_confusion_matrix

        if self.confusion is None:
            raise LmkilnError("a confusion matrix exists for classification only")
        return plot_confusion_matrix(self.confusion, Path(path), self.class_names, title)


class Trainer:
    """Fit any `nn.Module` to (x, y) data with lmkiln's loop; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        train_data: Data,
        val_data: Data | None = None,
        *,
        loss: str | SupervisedLoss | nn.Module | None = None,
        optimizer: str | OptimConfig | torch.optim.Optimizer | None = None,
        lr: float | None = None,
        schedule: str | None = None,
        weight_decay: float | None = None,
        metrics: Sequence[str | Metric] | None = None,
        epochs: int | None = None,
        steps: int | None = None,
        batch_size: int | None = None,
        monitor: str | None = None,
        monitor_mode: str | None = None,
        patience: int | None = None,
        min_delta: float | None = None,
        run_dir: str | Path | None = None,
        name: str | None = None,
        device: str | None = None,
        seed: int | None = None,
        restore_best: bool = True,
        class_names: Sequence[str] | None = None,
        config: Config | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        """Arguments left at None come from `config` (or the plain-PyTorch defaults without one).

        loss: a name (cross_entropy, bce, mse, huber), a SupervisedLoss, or one of PyTorch's
        CrossEntropyLoss/BCEWithLogitsLoss/MSELoss/HuberLoss. optimizer: a name (sgd, adam,
        adamw, rmsprop, adagrad), an OptimConfig, or a ready torch optimizer (used as it is).
        schedule: the learning-rate schedule after warmup (constant, cosine, linear, wsd).
        epochs or steps: how long to train. monitor: the validation metric for early stopping
        and the best checkpoint ('val_loss', 'val_accuracy', ...); patience > 0 stops when it
        has not improved by more than min_delta for that many evaluations. restore_best: after
        fit, load the best checkpoint's weights into the model. seed: the batch order, and torch's
        RNG (dropout) when fit starts; the model's initial weights are yours. run_dir: where
        checkpoints, metrics.jsonl and plots go (default runs/<name>).
        """
        keywords = dict(
            lr=lr,
            schedule=schedule,
            weight_decay=weight_decay,
            epochs=epochs,
            steps=steps,
            batch_size=batch_size,
            monitor=monitor,
            monitor_mode=monitor_mode,
            patience=patience,
            min_delta=min_delta,
            run_dir=str(run_dir) if run_dir is not None else None,
            name=name,
            device=device,
            seed=seed,
        )
        self.optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        self._user_optimizer = self.optimizer is not None
        self.cfg = _resolve_config(config, keywords, loss, optimizer, metrics, overrides)
        self.loss = SupervisedLoss(**vars(self.cfg.loss))
        self.kind = self.loss.kind
        self.runtime = Runtime.start(self.cfg.train, self.cfg.dist)
        self.plan = batch_plan(self.cfg.train, self.runtime.world_size)
        self.model = model.to(self.runtime.device)
        self.train_data = as_examples(train_data, self.kind, "training data")
        self.val_data = as_examples(val_data, self.kind, "validation data") if val_data is not None else None
        self.output_shape = self._check_model()
        self.metric_names, self.custom_metrics = _resolve_metrics(metrics, self.kind)
        self._check_monitor()
        if self.optimizer is None:
            self.optimizer = build_optimizer(self.model, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group.setdefault("peak_lr", group["lr"])  # the schedule scales from each group's lr
        self.restore_best = restore_best
        self.class_names = list(class_names) if class_names else []

    # -- checks --------------------------------------------------------------------------------
    def _check_model(self) -> tuple[int, ...]:
        """One forward pass on two training examples: the model must take them and fit the targets."""
        x, y = self.train_data.take(list(range(min(2, len(self.train_data)))))
        try:
            with _eval_mode(self.model):
                out = self.model(x.to(self.runtime.device))
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LmkilnError(
                f"the model does not accept the training examples (each of shape {tuple(x.shape[1:])}, "
                f"{x.dtype}): {first}"
            ) from None
        if not isinstance(out, torch.Tensor):
            raise LmkilnError(f"the model must return a tensor of outputs, got {type(out).__name__}")
        if self.val_data is not None:
            val_x, _ = self.val_data.take([0])
            if val_x.shape[1:] != x.shape[1:]:
                raise LmkilnError(
                    f"validation examples have shape {tuple(val_x.shape[1:])}, training examples "
                    f"{tuple(x.shape[1:])}"
                )
        self._check_outputs(out, y)
        return tuple(out.shape[1:])

    def _check_outputs(self, out: torch.Tensor, y: torch.Tensor) -> None:
        if self.kind == "classification":
            if out.ndim != 2:
                raise LmkilnError(
                    f"the model returns outputs of shape {tuple(out.shape)}; cross-entropy needs "
                    f"(batch, classes) logits"
                )
            n_classes = out.shape[1]
            if self.loss.class_weights and len(self.loss.class_weights) != n_classes:
                raise LmkilnError(
                    f"loss.class_weights has {len(self.loss.class_weights)} values for a model with "
                    f"{n_classes} outputs"
                )
            for data in (self.train_data, self.val_data):
                if data is not None:
                    data.check_labels(n_classes)
        elif out[0].numel() != y[0].numel():
            what = "labels" if self.kind == "multilabel" else "target values"
            raise LmkilnError(
                f"the model returns {out[0].numel()} outputs per example but the data has "
                f"{y[0].numel()} {what} per example"
            )

    def _check_monitor(self) -> None:
        tcfg = self.cfg.train
        available = ["val_loss", *(f"val_{m}" for m in [*self.metric_names, *self.custom_metrics])]
        if self.val_data is None:
            if tcfg.patience > 0:
                raise LmkilnError("early stopping (patience > 0) needs validation data")
            return
        if tcfg.monitor not in available:
            raise LmkilnError(
                f"monitor {tcfg.monitor!r} is not a validation metric here; available: {', '.join(available)}"
            )
        mode = metric_mode(tcfg.monitor)
        if mode is not None and mode != tcfg.monitor_mode:
            raise LmkilnError(
                f"{tcfg.monitor} improves as it {'falls' if mode == 'min' else 'rises'}, but "
                f"monitor_mode is {tcfg.monitor_mode!r}; set monitor_mode={mode!r}"
            )

    # -- evaluation ----------------------------------------------------------------------------
    def _forward_all(self, examples: Examples, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(outputs, targets, mean loss) over every example, in order, without gradients."""
        chunk = 4 * self.plan.micro_batch_size
        device = self.runtime.device
        outputs, targets = [], []
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, len(examples), chunk):
            x, y = examples.take(list(range(start, min(start + chunk, len(examples)))))
            batch = {"x": x.to(device), "y": y.to(device)}
            out = model(batch["x"])
            loss_sum += self.loss.total(out, batch).double()
            count += self.loss.count(batch).double()
            outputs.append(out.float().cpu())
            targets.append(y)
        return torch.cat(outputs), torch.cat(targets), float(loss_sum / count.clamp(min=1e-12))

    def _metrics(self, examples: Examples, model: nn.Module) -> dict[str, float]:
        return self._scores(*self._forward_all(examples, model))

    def _scores(
        self, outputs: torch.Tensor, targets: torch.Tensor, loss: float, every: bool = False
    ) -> dict[str, float]:
        """The loss and the chosen metrics (every built-in one with every=True), custom ones last."""
        computed = task_metrics(self.kind, outputs, targets)
        names = METRIC_NAMES[self.kind] if every else self.metric_names
        values = {"loss": loss, **{name: computed[name] for name in names}}
        for name, fn in self.custom_metrics.items():
            values[name] = float(fn(outputs, targets))
        return values

    def _evaluator(self) -> Callable[[nn.Module, Runtime], dict[str, float]]:
        def evaluate(model: nn.Module, runtime: Runtime) -> dict[str, float]:
            # every process scores the whole validation set: exact, and cheap next to training
            return {f"val_{k}": v for k, v in self._metrics(self.val_data, model).items()}

        return evaluate

    def _as_data(self, data: Data) -> Examples:
        examples = as_examples(data, self.kind, "evaluation data")
        if self.kind == "classification":
            examples.check_labels(self.output_shape[0])
        return examples

    def evaluate(self, data: Data) -> dict[str, float]:
        """Loss and metrics over the whole of `data` (no val_ prefix)."""
        with _eval_mode(self.model):
            return self._metrics(self._as_data(data), self.model)

    def report(self, data: Data, class_names: Sequence[str] | None = None) -> Report:
        """Every metric, plus the confusion matrix and per-class F1 for classification."""
        examples = self._as_data(data)
        with _eval_mode(self.model):
            outputs, targets, loss = self._forward_all(examples, self.model)
        metrics = self._scores(outputs, targets, loss, every=True)
        if self.kind != "classification":
            return Report(metrics, len(examples))
        n_classes = outputs.shape[-1]
        predicted = outputs.argmax(dim=-1)
        names = list(class_names or self.class_names) or [str(i) for i in range(n_classes)]
        return Report(
            metrics,
            len(examples),
            confusion_matrix(predicted, targets, n_classes),
            per_class_f1(predicted, targets, n_classes),
            names,
        )

    def predict(self, x: Any, raw: bool = False) -> torch.Tensor:
        """Class ids (classification), 0/1 labels (multilabel) or values (regression) for inputs x.

        raw=True returns the model's outputs as they are (logits for classification).
        """
        inputs = as_features(to_tensor(x))
        chunk = 4 * self.plan.micro_batch_size
        with _eval_mode(self.model):
            outputs = torch.cat(
                [
                    self.model(inputs[start : start + chunk].to(self.runtime.device)).float().cpu()
                    for start in range(0, len(inputs), chunk)
                ]
            )
        if raw or self.kind == "regression":
            return outputs
        return outputs.argmax(dim=-1) if self.kind == "classification" else (outputs > 0).long()

    # -- training ------------------------------------------------------------------------------
    def fit(self, resume: str | None = None, force: bool = False, overwrite: bool = False) -> TrainResult:
        """Train; resume='auto' (or a checkpoint path) continues a run exactly where it stopped."""
        from lmkiln.train.distributed import is_sharded, parallelize

        cfg, runtime = self.cfg, self.runtime
        run = resolve(cfg, runtime.world_size, examples=len(self.train_data))
        run_dir = open_run_dir(
            cfg, is_main=runtime.is_main, barrier=runtime.barrier, resume=resume, overwrite=overwrite
        )
        torch.manual_seed(cfg.train.seed)  # dropout masks; a resumed run restores its own RNG
        train_model = parallelize(self.model, cfg, runtime)
        if is_sharded(self.model):  # FSDP2 replaced the parameters: the optimizer must see the shards
            if self._user_optimizer:
                raise LmkilnError(
                    "with dist.strategy=fsdp pass the optimizer by name or OptimConfig, not as an "
                    "object built on the unsharded parameters"
                )
            self.optimizer = build_optimizer(self.model, cfg.optim)
        batches = epoch_stream(
            len(self.train_data), run.batch, cfg.train.seed, runtime.rank, partial(collate, self.train_data)
        )
        setup = TrainSetup(
            model=self.model,
            train_model=train_model,
            objective=self.loss,
            train_batches=batches,
            optimizer=self.optimizer,
            total_steps=run.total_steps,
            evaluate=self._evaluator() if self.val_data is not None else None,
            fingerprint=self._fingerprint(run.batch.micro_batch_size),
            tokens_in=lambda batch: batch["examples"],
            epoch_of=lambda: batches.epoch,
            unit="examples",
        )
        loop = TrainLoop(setup, run, runtime, run_dir)
        fitted = loop.fit(resume=resume, force=force)
        state = fitted.state
        best = state.best_step if state.best_step >= 0 else None
        checkpoint, restored = fitted.checkpoint, False
        metrics = dict(fitted.last_eval)
        if self.restore_best and fitted.best_checkpoint() is not None:
            checkpoint = fitted.best_checkpoint()
            fitted.restore_best(self.model)
            restored = True
            with _eval_mode(self.model):
                metrics = {f"val_{k}": v for k, v in self._metrics(self.val_data, self.model).items()}
        return TrainResult(
            metrics=metrics,
            history=[h for h in loop.log.history if h.get("event") == "eval"],
            stop_reason=fitted.stop_reason,
            steps=state.step,
            epochs=state.epoch,
            steps_per_epoch=batches.indices.steps_per_epoch,
            best_step=best,
            best_value=state.best_value,
            seconds=state.train_seconds,
            run_dir=run_dir,
            checkpoint=checkpoint,
            restored_best=restored,
            fit=fitted,
        )

    def _fingerprint(self, micro: int) -> dict[str, Any]:
        """What must not change when a run resumes: batch shape, data size, loss and model shape."""
        shapes = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            shapes.update(f"{name}:{tuple(tensor.shape)};".encode())
        return {
            "train.batch_size": self.cfg.train.batch_size,
            "train.micro_batch_size": micro,
            "world_size": self.runtime.world_size,
            "examples": len(self.train_data),
            "loss": self.loss.name,
            "model": shapes.hexdigest()[:16],
        }


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the duration; the previous mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# Arguments → config


def _resolve_config(
    config: Config | None,
    keywords: dict[str, Any],
    loss: Any,
    optimizer: Any,
    metrics: Sequence[Any] | None,
    overrides: dict[str, Any] | None,
) -> Config:
    """Layers, lowest first: `config` (or the plain-PyTorch defaults), the keywords, `overrides`."""
    base = flatten(to_dict(config)) if config is not None else dict(CLASSIC_DEFAULTS)
    if keywords["epochs"] is not None and keywords["steps"] is not None:
        raise LmkilnError("give epochs or steps, not both")
    values = {_KEYWORDS[k]: v for k, v in keywords.items() if v is not None}
    values["task"] = "supervised"
    if keywords["steps"] is not None:
        values["train.max_epochs"] = 0  # step-based: the steps are the whole run
    monitor = keywords["monitor"]
    if monitor is not None:
        if not monitor.startswith("val_"):
            monitor = values["train.monitor"] = f"val_{monitor}"
        if keywords["monitor_mode"] is None:
            mode = metric_mode(monitor)
            if mode is None:
                raise LmkilnError(f"say which way {monitor} improves: monitor_mode='min' or 'max'")
            values["train.monitor_mode"] = mode
    values.update(_loss_values(loss))
    values.update(_optimizer_values(optimizer, keywords["lr"]))
    layers = [("Trainer defaults" if config is None else "config", base), ("Trainer arguments", values)]
    if overrides:
        layers.append(("overrides", dict(overrides)))
    return build_config(layers)


def _loss_values(loss: Any) -> dict[str, Any]:
    if loss is None:
        return {}
    if isinstance(loss, str):
        return {"loss.name": loss}
    if isinstance(loss, nn.Module):
        loss = loss_from_criterion(loss)
    if isinstance(loss, SupervisedLoss):
        return {f"loss.{k}": v for k, v in vars(loss).items()}
    raise LmkilnError(
        f"loss must be a name, a SupervisedLoss or a PyTorch loss module, got {type(loss).__name__}"
    )


def _optimizer_values(optimizer: Any, lr: float | None) -> dict[str, Any]:
    if optimizer is None or isinstance(optimizer, str):
        return {"optim.name": optimizer} if optimizer else {}
    if isinstance(optimizer, OptimConfig):
        return {f"optim.{k}": v for k, v in to_dict(optimizer).items()}
    if isinstance(optimizer, torch.optim.Optimizer):
        if lr is not None:
            raise LmkilnError("lr= cannot change a ready optimizer; set the lr when you create it")
        values: dict[str, Any] = {"optim.lr": optimizer.param_groups[0]["lr"]}
        name = type(optimizer).__name__.lower()
        if name in OPTIMIZERS:
            values["optim.name"] = name  # recorded in config.yaml; the optimizer itself is used as is
        return values
    raise LmkilnError(
        f"optimizer must be a name, an OptimConfig or a torch optimizer, got {type(optimizer).__name__}"
    )


def _resolve_metrics(metrics: Sequence[Any] | None, kind: str) -> tuple[list[str], dict[str, Metric]]:
    if metrics is None:
        return list(DEFAULT_METRICS[kind]), {}
    names: list[str] = []
    custom: dict[str, Metric] = {}
    for metric in metrics:
        if isinstance(metric, str):
            name = metric.removeprefix("val_")
            if name not in METRIC_NAMES[kind]:
                raise LmkilnError(
                    f"unknown {kind} metric {metric!r}; valid: {', '.join(METRIC_NAMES[kind])} "
                    f"(the loss is always reported)"
                )
            names.append(name)
        elif callable(metric):
            name = getattr(metric, "__name__", "")
            if not name.isidentifier() or name in METRIC_NAMES[kind] or name == "loss":
                raise LmkilnError(f"a custom metric needs a distinct function name, got {name!r}")
            custom[name] = metric
        else:
            raise LmkilnError(f"a metric is a name or a function, got {type(metric).__name__}")
    return names, custom
