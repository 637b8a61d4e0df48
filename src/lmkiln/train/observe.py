"""What a run shows and records: progress bar or log lines, metrics.jsonl, curve PNGs, TensorBoard.

Only the main process creates a `RunLog`; other ranks get `RunLog.disabled()`. Values are written
exactly as computed: a NaN loss is logged as NaN (JSON `NaN`), never smoothed away.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from lmkiln.config import LogConfig

log = logging.getLogger("lmkiln")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


class RunLog:
    def __init__(
        self,
        directory: Path | None,
        cfg: LogConfig,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
    ) -> None:
        self.enabled, self.cfg, self.total_steps = enabled, cfg, total_steps
        self.directory = directory
        self.history: list[dict[str, Any]] = []
        self.bar = None
        self.metrics_file = None
        self.tensorboard = None
        self._plotted_at, self._plot_seconds = 0.0, 0.0
        if not enabled:
            return
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self.metrics_file = open(directory / "metrics.jsonl", "a", encoding="utf-8")
            self.history = _read_history(directory / "metrics.jsonl")
            if cfg.tensorboard:
                self.tensorboard = _tensorboard_writer(directory / "tensorboard")
        mode = cfg.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr
            )

    @classmethod
    def disabled(cls) -> RunLog:
        return cls(None, LogConfig(progress="off", plot=False), 0, enabled=False)

    def record(self, event: str, values: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl (and TensorBoard)."""
        if not self.enabled:
            return
        entry = {"event": event, **values}
        self.history.append(entry)
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(entry) + "\n")
            self.metrics_file.flush()
        if self.tensorboard is not None:
            step = values.get("step", 0)
            for key, value in values.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{event}/{key}", value, step)

    def progress(self, step: int, values: dict[str, Any], eta_s: float) -> None:
        if not self.enabled or self.mode == "off":
            return
        text = " | ".join(_format_metric(k, v) for k, v in values.items())
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        else:
            print(
                f"step {step}/{self.total_steps} | {text} | eta {format_duration(eta_s)}",
                file=sys.stderr,
                flush=True,
            )

    def message(self, text: str) -> None:
        if not self.enabled or self.mode == "off":
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def plot(self, force: bool = False) -> Path | None:
        """Redraw the curves; between forced redraws, only once the run has spent 10x the last
        drawing's time elsewhere (frequent evaluations, e.g. every epoch of a small model, would
        otherwise spend most of the run in matplotlib)."""
        if not (self.enabled and self.cfg.plot and self.directory is not None):
            return None
        now = time.perf_counter()
        if not force and now - self._plotted_at < 10 * self._plot_seconds:
            return None
        path = plot_curves(self.history, self.directory / "plots" / "loss.png")
        self._plotted_at = time.perf_counter()
        self._plot_seconds = self._plotted_at - now
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def recent_train_loss(history: list[dict[str, Any]], last_step: int, span: int = 50) -> float | None:
    """The mean logged training loss over the last `span` steps (each log line already averages
    the steps since the one before); None when none was logged."""
    losses = [
        h["loss"]
        for h in history
        if h.get("event") == "train" and "loss" in h and last_step - span < h.get("step", -1) <= last_step
    ]
    return sum(losses) / len(losses) if losses else None


def _format_metric(key: str, value: Any) -> str:
    if key == "lr":
        return f"lr {value:.2e}"
    if key == "tokens_per_s":
        return f"{format_count(value)} tok/s"
    if key == "examples_per_s":
        return f"{format_count(value)} ex/s"
    if key == "mfu":
        return f"mfu {100 * value:.0f}%"
    if isinstance(value, float):
        return f"{key} {value:.4f}"
    return f"{key} {value}"


def _read_history(path: Path) -> list[dict[str, Any]]:
    """Earlier lines of a resumed run, so the curves cover the whole run."""
    if not path.is_file():
        return []
    history = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return history


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from lmkiln.errors import LmkilnError

        raise LmkilnError(
            "log.tensorboard needs the tensorboard package: pip install 'lmkiln[tensorboard]'"
        ) from None
    return SummaryWriter(str(directory))


def plot_curves(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training and validation loss, and the learning rate, against the step."""
    train = [h for h in history if h.get("event") == "train" and "loss" in h]
    evals = [h for h in history if h.get("event") == "eval" and "val_loss" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([h["step"] for h in train], [h["loss"] for h in train], label="train", lw=1)
        ax_lr.plot([h["step"] for h in train], [h["lr"] for h in train], color="tab:green")
    if evals:
        ax_loss.plot([h["step"] for h in evals], [h["val_loss"] for h in evals], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax_lr.grid(alpha=0.3)
    from lmkiln.train.plots import save_figure

    return save_figure(fig, path)


class Throughput:
    """Tokens/s and MFU over the steps since the last report (wall clock, one sync per report)."""

    def __init__(self, flops_per_token: float, peak_flops: float) -> None:
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def report(self) -> dict[str, float]:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0
        out = {"tokens_per_s": rate}
        if self.flops_per_token and self.peak_flops:
            out["mfu"] = rate * self.flops_per_token / self.peak_flops
        return out
