"""`lmkiln train` with task=supervised: an MLP, or softmax(Wx + b), fit to a table.

    table (builtin:digits, .csv, .parquet) → checked features and labels → seeded
    train/validation/test split → standardize with the training rows' statistics → MLP
    → Trainer (THE training loop) → test report: metrics, per-class F1, confusion-matrix PNG

What is learnt follows the loss: cross_entropy reads one label column of classes (integers, or
text that is numbered in sorted order), bce reads several 0/1 label columns, mse/huber read
numeric target columns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkiln.config import Config
from lmkiln.data.tables import Table, load_table, split_table, standardize
from lmkiln.errors import LmkilnError
from lmkiln.files import write_json_atomic
from lmkiln.model.mlp import MLP, build_mlp
from lmkiln.train.objectives import LOSS_KINDS
from lmkiln.train.supervised import Report, Trainer, TrainResult

log = logging.getLogger("lmkiln")


@dataclass
class TabularResult:
    run_dir: Path
    fit: TrainResult
    test: Report | None
    table: Table
    model: MLP
    cfg: Config
    confusion_png: Path | None

    def summary(self) -> str:
        """What `lmkiln train` prints: how training went, the test figures and where the files are."""
        from lmkiln.train.observe import format_count, format_duration

        fit = self.fit
        examples = fit.fit.state.tokens_seen
        lines = [
            f"trained {fit.epochs} epochs ({fit.steps:,} steps, {format_count(examples)} examples) in "
            f"{format_duration(fit.seconds)} ({format_count(examples / max(fit.seconds, 1e-9))} examples/s); "
            f"stopped by {fit.stop_reason}"
        ]
        monitor = self.cfg.train.monitor
        if fit.best_step is not None:
            lines.append(
                f"best {monitor} {fit.best_value:.4f} at epoch {fit.best_epoch:g} (step {fit.best_step})"
                + ("; the model holds that checkpoint" if fit.restored_best else "")
            )
        if self.test is None:
            lines.append("no test rows (table.test_fraction=0)")
        else:
            shown = {k: v for k, v in self.test.metrics.items() if k != "loss"}
            if self.table.kind == "classification":
                shown = {k: shown[k] for k in ("accuracy", "f1_macro", "precision_macro", "recall_macro")}
            figures = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
            lines.append(f"test ({self.test.examples} held-out rows): {figures}")
        if self.test is not None and self.test.per_class_f1 is not None:
            pairs = [f"{name} {f1:.3f}" for name, f1 in zip(self.test.class_names, self.test.per_class_f1)]
            lines.append("per-class F1: " + " | ".join(pairs))
        if self.confusion_png is not None:
            lines.append(f"confusion matrix: {self.confusion_png}")
        lines.append(
            f"run directory: {self.run_dir} (config.yaml, table.json, test_metrics.json, checkpoints/, "
            f"metrics.jsonl, plots/)"
        )
        return "\n".join(lines)


def check_widths(cfg: Config, table: Table) -> None:
    """mlp.inputs and mlp.outputs, where set, must match the table."""
    features = table.x.shape[1]
    if cfg.mlp.inputs and cfg.mlp.inputs != features:
        names = ", ".join(table.feature_names[:3]) + (", …" if features > 3 else "")
        raise LmkilnError(
            f"mlp.inputs is {cfg.mlp.inputs} but {table.source} has {features} feature columns "
            f"({names}); set mlp.inputs=0 to take the table's width, or choose columns with table.features"
        )
    if cfg.mlp.outputs and table.kind != "classification" and cfg.mlp.outputs != table.n_outputs:
        raise LmkilnError(
            f"mlp.outputs is {cfg.mlp.outputs} but there are {table.n_outputs} target columns "
            f"{table.label_names}; set mlp.outputs=0"
        )


def _describe(cfg: Config, table: Table, sizes: dict[str, int], model: MLP, trainer: Trainer) -> None:
    what = (
        f"{len(table.class_names)} classes"
        if table.kind == "classification"
        else f"{table.n_outputs} {table.kind} target(s)"
    )
    log.info(
        "table: %s, %d rows × %d features, %s → %d train / %d validation / %d test rows%s",
        table.source,
        len(table.x),
        table.x.shape[1],
        what,
        sizes["train"],
        sizes["val"],
        sizes["test"],
        " (standardized)" if cfg.table.standardize else "",
    )
    widths = "→".join(str(w) for w in [model.inputs, *cfg.mlp.hidden, model.outputs])
    kind = f"MLP {widths} ({cfg.mlp.activation})" if cfg.mlp.hidden else f"linear softmax(Wx+b) {widths}"
    parameters = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %s parameters, loss %s", kind, f"{parameters:,}", cfg.loss.name)
    t, o = cfg.train, cfg.optim
    length = f"up to {t.max_epochs} epochs" if t.max_epochs else f"{t.max_steps} steps"
    stopping = f", early stopping on {t.monitor} (patience {t.patience})" if t.patience else ""
    log.info(
        "training: %s of batches of %d, %s lr %g, on %s%s",
        length,
        t.batch_size,
        o.name,
        o.lr,
        trainer.runtime.device,
        stopping,
    )


def train_table(
    cfg: Config, resume: str | None = None, force: bool = False, overwrite: bool = False
) -> TabularResult:
    kind = LOSS_KINDS[cfg.loss.name]
    table = load_table(cfg.table, kind, cfg.mlp.outputs if kind == "classification" else 0)
    check_widths(cfg, table)
    splits = split_table(table, cfg.table)
    mean, std = standardize(splits) if cfg.table.standardize else (None, None)
    torch.manual_seed(cfg.train.seed)  # the same seed gives the same initial weights
    model = build_mlp(cfg.mlp, table.x.shape[1], table.n_outputs)
    val = splits["val"]
    trainer = Trainer(
        model,
        (splits["train"].x, splits["train"].y),
        (val.x, val.y) if len(val.rows) else None,
        config=cfg,
        class_names=table.class_names,
    )
    sizes = {name: len(split.rows) for name, split in splits.items()}
    if trainer.runtime.is_main:
        _describe(cfg, table, sizes, model, trainer)
    fit = trainer.fit(resume=resume, force=force, overwrite=overwrite)
    test = trainer.report((splits["test"].x, splits["test"].y)) if sizes["test"] else None
    png = None
    run_dir = fit.run_dir
    if trainer.runtime.is_main:
        write_json_atomic(
            run_dir / "table.json",
            {
                "source": table.source,
                "kind": table.kind,
                "features": table.feature_names,
                "labels": table.label_names,
                "classes": table.class_names,
                "rows": sizes,
                "mean": None if mean is None else mean.tolist(),
                "std": None if std is None else std.tolist(),
            },
        )
        if test is not None:
            write_json_atomic(
                run_dir / "test_metrics.json",
                {"metrics": test.metrics, "examples": test.examples, "per_class_f1": test.per_class_f1},
            )
            if test.confusion is not None:
                title = f"{cfg.name}: test accuracy {test.metrics['accuracy']:.3f} ({test.examples} rows)"
                png = test.save_confusion_matrix(run_dir / "plots" / "confusion_matrix.png", title)
    return TabularResult(run_dir, fit, test, table, model, cfg, png)
