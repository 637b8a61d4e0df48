"""train.max_time: a wall-clock budget ends the run cleanly and the schedule decays to it."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import run_cli
from test_cli import assert_user_error
from test_supervised import QUIET, blobs
from torch import nn

from lmkiln.config import parse_duration
from lmkiln.errors import LmkilnError
from lmkiln.train.supervised import Trainer


class Slow(nn.Module):
    """A linear classifier whose forward takes a fixed time, so step times are predictable."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.linear, self.seconds = nn.Linear(4, 3), seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.linear(x)


def budget_trainer(tmp_path, seconds_per_step: float, budget: str) -> Trainer:
    x, y = blobs()
    torch.manual_seed(0)
    overrides = {
        **QUIET,
        "train.max_time": budget,
        "train.log_every": 1,
        "schedule.name": "cosine",
        "schedule.warmup_steps": 2,
        "schedule.min_lr_ratio": 0.0,
    }
    return Trainer(
        Slow(seconds_per_step), (x[:48], y[:48]), (x[48:], y[48:]), optimizer="adam", lr=0.05,
        steps=100_000, batch_size=8, run_dir=tmp_path / "run", overrides=overrides,
    )  # fmt: skip


def test_durations_parse_and_bad_ones_name_the_key():
    assert parse_duration("600") == 600 and parse_duration("90s") == 90
    assert parse_duration("10m") == 600 and parse_duration("1.5h") == 5400
    for bad in ("ten minutes", "-5", "0", "5d", ""):
        with pytest.raises(LmkilnError, match="'train.max_time' must be a positive duration.*10m"):
            parse_duration(bad)


def test_the_run_stops_at_the_budget_with_the_schedule_decayed(tmp_path):
    trainer = budget_trainer(tmp_path, 0.02, "1.2s")
    result = trainer.fit()
    assert result.stop_reason == "max_time"
    assert 0.8 <= result.seconds <= 2.5, result.seconds  # about a step of the deadline (slack for load)
    assert 20 <= result.steps < 100_000
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    # cosine to 0 fitted to the deadline: the peak (0.05) after warmup, close to 0 at the end
    assert max(lrs) == pytest.approx(0.05) and lrs[-1] < 0.005, lrs
    assert result.history[-1]["step"] == result.steps  # evaluated (and saved) at the end
    assert result.checkpoint is not None and result.checkpoint.name.endswith(f"{result.steps:06d}")
    first, last = result.history[0]["val_loss"], result.history[-1]["val_loss"]
    assert last < first - 0.3, (first, last)  # it trained in the budget


def test_a_budget_shorter_than_one_step_is_one_line(tmp_path):
    with pytest.raises(LmkilnError, match=r"train.max_time \(0.05s\) is shorter than one training step"):
        budget_trainer(tmp_path, 0.2, "0.05s").fit()


def test_cli_refuses_a_budget_that_is_not_a_duration(tmp_path):
    proc = run_cli("train", "--print-config", "--train.max_time", "soon", cwd=tmp_path)
    assert_user_error(proc, "train.max_time", "10m")
