"""Reading run directories: their config, metrics history and final figures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmkiln.errors import LmkilnError


@dataclass
class RunRecord:
    directory: Path
    config: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)
    """The `train` events of metrics.jsonl, in order (loss, lr, tokens_per_s, mfu, ...)."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    """plan.json (`lmkiln plan --save`), the prediction to set next to the measurement."""

    @property
    def final(self) -> dict[str, Any]:
        """Last train figures and last evaluation, merged."""
        out: dict[str, Any] = {}
        if self.train:
            last = self.train[-1]
            out.update(
                {
                    k: last[k]
                    for k in ("step", "loss", "tokens_per_s", "elapsed_s", "peak_memory_mb")
                    if k in last
                }
            )
        if self.evals:
            out.update({k: v for k, v in self.evals[-1].items() if k.startswith("val_")})
        return out


def read_run(directory: str | Path) -> RunRecord:
    path = Path(directory)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise LmkilnError(
            f"{path} is not a run directory (no metrics.jsonl); give a directory `lmkiln train` wrote"
        )
    config_file = path / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    record = RunRecord(path, config or {})
    for line in metrics.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        if entry.get("event") == "train":
            record.train.append(entry)
        elif entry.get("event") == "eval":
            record.evals.append(entry)
    if (path / "plan.json").is_file():
        record.plan = json.loads((path / "plan.json").read_text(encoding="utf-8"))
    return record


def list_runs(root: str | Path) -> list[RunRecord]:
    """Every run directory under `root` (itself included), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise LmkilnError(f"runs directory not found: {root}")
    return [read_run(m.parent) for m in sorted(root.rglob("metrics.jsonl"))]


def runs_table(records: list[RunRecord], root: Path) -> str:
    """A plain-text table: run, steps, train loss, validation loss, perplexity, tok/s, time."""
    header = ("run", "steps", "loss", "val_loss", "val_ppl", "tok/s", "time_s")
    rows = [header]
    for record in records:
        final = record.final
        name = str(record.directory.relative_to(root)) if record.directory != root else record.directory.name
        rows.append(
            (
                name,
                str(final.get("step", "")),
                *(f"{final[k]:.4g}" if k in final else "-" for k in ("loss", "val_loss", "val_ppl")),
                f"{final['tokens_per_s']:.0f}" if "tokens_per_s" in final else "-",
                f"{final['elapsed_s']:.1f}" if "elapsed_s" in final else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
