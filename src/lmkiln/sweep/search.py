"""`lmkiln sweep`: Optuna's TPE sampler over a search space of config keys, pruning trials on the
validation metric the training loop reports at each evaluation.

The study lives in DIR/study.db (SQLite), so a killed sweep resumes where it stopped: trials that
were running are marked failed and their parameters tried again. Each trial is an ordinary run
directory, DIR/trial-NNN. The space file maps config keys to ranges:

    optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    model.n_layer: {low: 2, high: 6}            # integers when both ends are integers
    model.mlp: {choices: [swiglu, gelu]}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmkiln.config import Config, all_keys, unknown_key_error
from lmkiln.errors import LmkilnError

log = logging.getLogger("lmkiln")
STUDY_NAME = "lmkiln-sweep"
PRUNERS = ("median", "halving", "none")


@dataclass(frozen=True)
class Dimension:
    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)


def read_space(path: str | Path) -> list[Dimension]:
    """The search space of a YAML file; unknown keys and empty ranges are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise LmkilnError(f"search space file not found: {path}")
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(tree, dict) or not tree:
        raise LmkilnError(
            f"{path}: expected a mapping of config keys to ranges, e.g. 'optim.lr: {{low: 1e-4, high: 1e-2, log: true}}'"
        )
    valid = list(all_keys())
    space = []
    for key, spec in tree.items():
        if key not in valid:
            raise unknown_key_error(key, valid, str(path))
        space.append(_dimension(key, spec, path))
    return space


def _dimension(key: str, spec: Any, path: Path) -> Dimension:
    where = f"{path}: {key}"
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise LmkilnError(f"{where}: give {{low: A, high: B}} (optionally log: true) or {{choices: [...]}}")
    unknown = set(spec) - {"low", "high", "log", "choices"}
    if unknown:
        raise LmkilnError(f"{where}: unknown field {sorted(unknown)[0]!r}; use low, high, log or choices")
    if "choices" in spec:
        if not spec["choices"]:
            raise LmkilnError(f"{where}: the choices are empty; list at least one value")
        return Dimension(key, choices=tuple(spec["choices"]))
    if "low" not in spec or "high" not in spec:
        raise LmkilnError(f"{where}: a range needs both low and high")
    low, high = spec["low"], spec["high"]
    try:
        low, high = (v if isinstance(v, int) and not isinstance(v, bool) else float(v) for v in (low, high))
    except (TypeError, ValueError):
        raise LmkilnError(f"{where}: low and high must be numbers, got {low!r} and {high!r}") from None
    if not low < high:
        raise LmkilnError(f"{where}: the range is empty (low {low} is not below high {high}); widen it")
    log_scale = bool(spec.get("log", False))
    if log_scale and low <= 0:
        raise LmkilnError(f"{where}: a log range must start above 0, got low {low}")
    return Dimension(key, low, high, log_scale, isinstance(low, int) and isinstance(high, int))


def _space_text(space: list[Dimension]) -> str:
    return yaml.safe_dump([d.__dict__ | {"choices": list(d.choices)} for d in space], sort_keys=True)


@dataclass
class SweepResult:
    directory: Path
    best_params: dict[str, Any]
    best_value: float
    table: str
    best_file: Path
    plot: Path | None


def _pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _open_study(directory: Path, space: list[Dimension], pruner: str, seed: int):
    try:
        import optuna
    except ImportError:
        raise LmkilnError("lmkiln sweep needs optuna: pip install 'lmkiln[sweep]'") from None
    directory.mkdir(parents=True, exist_ok=True)
    saved = directory / "space.yaml"
    text = _space_text(space)
    if saved.is_file() and saved.read_text(encoding="utf-8") != text:
        raise LmkilnError(
            f"sweep directory {directory} holds a study of a different search space ({saved}); "
            f"use another --dir or the same space file"
        )
    saved.write_text(text, encoding="utf-8")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=f"sqlite:///{directory / 'study.db'}",
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=_pruner(pruner),
        load_if_exists=True,
    )
    _retry_interrupted(study)
    return study


def _retry_interrupted(study) -> None:
    """Trials left RUNNING by a killed sweep: mark them failed and queue their parameters again."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params)
        log.info("trial %d was interrupted; trying its parameters again", trial.number)


def sweep(
    make_config: Callable[[list[str]], Config],
    space: list[Dimension],
    directory: str | Path,
    trials: int,
    parallel: int = 1,
    metric: str = "val_loss",
    pruner: str = "median",
) -> SweepResult:
    """Run until the study holds `trials` finished (complete or pruned) trials.

    make_config(overrides) builds a trial's config: the command's recipe, file and overrides,
    then the trial's values as further overrides (coerced and checked like the command line's).
    """
    from optuna.trial import TrialState

    from lmkiln.tasks.pretrain import pretrain

    base = make_config([])
    if base.task != "pretrain":
        raise LmkilnError(f"lmkiln sweep tunes task=pretrain runs, not task={base.task}")
    if pruner not in PRUNERS:
        raise LmkilnError(f"--pruner {pruner!r}: use one of {', '.join(PRUNERS)}")
    directory = Path(directory)
    study = _open_study(directory, space, pruner, base.train.seed)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    remaining = trials - len(study.get_trials(deepcopy=False, states=finished))

    def objective(trial) -> float:
        import optuna

        values = {d.key: d.suggest(trial) for d in space}
        run_dir = directory / f"trial-{trial.number:03d}"
        cfg = make_config(
            [*(f"{k}={v}" for k, v in values.items()), f"train.run_dir={run_dir}", "log.progress=off"]
        )

        def report(step: int, metrics: dict[str, float]) -> bool:
            if metric not in metrics:
                raise LmkilnError(f"--metric {metric} is not among the validation metrics {sorted(metrics)}")
            trial.report(metrics[metric], step)
            return trial.should_prune()

        result = pretrain(cfg, overwrite=True, on_eval=report)
        if result.fit.stop_reason == "pruned":
            raise optuna.TrialPruned()
        return result.fit.last_eval.get(metric, math.nan)

    if remaining > 0:
        study.optimize(objective, n_trials=remaining, n_jobs=parallel, catch=())
    return _summarize(study, space, directory, metric)


def _summarize(study, space: list[Dimension], directory: Path, metric: str) -> SweepResult:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        raise LmkilnError(
            f"no trial of {directory} completed (all pruned or failed); widen the space or use --pruner none"
        )
    best = study.best_trial
    header = ["trial", "state", metric, *(d.key for d in space)]
    rows = [header]
    for t in trials:
        value = (
            t.value
            if t.value is not None
            else (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else math.nan)
        )
        rows.append(
            [
                str(t.number),
                t.state.name.lower(),
                f"{value:.4f}",
                *(_short(t.params.get(d.key)) for d in space),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    (directory / "trials.txt").write_text(table + "\n", encoding="utf-8")
    delta: dict[str, Any] = {}
    for key, value in best.params.items():
        section, name = key.split(".", 1)
        delta.setdefault(section, {})[name] = value
    best_file = directory / "best.yaml"
    best_file.write_text(
        f"# best trial {best.number}: {metric} {best.value:.4f} (apply with --config {best_file})\n"
        + yaml.safe_dump(delta, sort_keys=True),
        encoding="utf-8",
    )
    return SweepResult(
        directory, dict(best.params), best.value, table, best_file, _plot(trials, directory, metric)
    )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plot(trials, directory: Path, metric: str) -> Path | None:
    """Each trial's curve of the metric by step (pruned ones dashed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from optuna.trial import TrialState

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for t in trials:
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        style = "--" if t.state == TrialState.PRUNED else "-"
        ax.plot(steps, [t.intermediate_values[s] for s in steps], style, label=f"trial {t.number}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title("sweep trials (dashed: pruned)")
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = directory / "trials.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
