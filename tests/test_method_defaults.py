"""Method-aware fine-tuning defaults: provenance of config values, the adapted learning rate and
warm-up with their notes, and the warning of a run whose validation loss does not move."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from lmkiln.config import Config, load_config, resolve
from lmkiln.config.layers import set_by_user, value_sources
from lmkiln.config.resolve import METHOD_LR_SCALE
from lmkiln.train.stall import StallWatch
from tests.finetune_helpers import ft_config, make_base, reverse_rows, write_jsonl

FT = ["task=finetune"]


def test_sources_name_the_layer_of_each_value_and_survive_copies(tmp_path):
    file = tmp_path / "mine.yaml"
    file.write_text("train:\n  max_epochs: 5\n")
    cfg = load_config(recipe="sft-qa", config_file=str(file), overrides=[*FT, "finetune.method=lora"])
    sources = value_sources(copy.deepcopy(cfg))
    assert sources["optim.lr"] == "recipe sft-qa"
    assert sources["train.max_epochs"] == str(file)
    assert sources["finetune.method"] == "command line"
    assert "optim.betas" not in sources  # left at the default
    assert not set_by_user(cfg, "optim.lr") and set_by_user(cfg, "train.max_epochs")
    assert value_sources(Config()) is None and set_by_user(Config(), "optim.lr")  # built in Python


@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
def test_recipe_learning_rate_follows_the_method_with_a_note(method):
    cfg = load_config(recipe="sft-qa", overrides=[*FT, f"finetune.method={method}"])
    run = resolve(cfg, examples=270)  # 17 steps an epoch, 3 epochs
    assert run.cfg.optim.lr == pytest.approx(1e-4 * METHOD_LR_SCALE[method])
    assert cfg.optim.lr == 1e-4  # the user's config is untouched
    lr_notes = [n for n in run.notes if n.startswith("lr ")]
    if method == "full":
        assert not lr_notes
    else:
        assert len(lr_notes) == 1 and "the recipe's 0.0001" in lr_notes[0] and "optim.lr" in lr_notes[0]
    assert METHOD_LR_SCALE["lora"] >= 3 * METHOD_LR_SCALE["freeze"] > METHOD_LR_SCALE["full"]


def test_lora_note_says_which_value_and_why():
    cfg = load_config(recipe="sft-instruction", overrides=[*FT, "finetune.method=lora"])
    (note,) = [n for n in resolve(cfg, examples=100).notes if n.startswith("lr")]
    assert note == "lr 0.001: LoRA default (10x the recipe's 0.0001); set optim.lr to override"


@pytest.mark.parametrize("where", ["command line", "config file"])
def test_a_learning_rate_the_user_set_is_kept(tmp_path, where):
    file = tmp_path / "mine.yaml"
    file.write_text("optim:\n  lr: 2.0e-4\n")
    extra = ["optim.lr=2e-4"] if where == "command line" else []
    cfg = load_config(
        recipe="sft-qa",
        config_file=str(file) if where == "config file" else None,
        overrides=[*FT, "finetune.method=lora", *extra],
    )
    run = resolve(cfg, examples=270)
    assert run.cfg.optim.lr == 2e-4
    assert not [n for n in run.notes if n.startswith("lr")]


def test_a_config_built_in_python_is_never_adapted():
    cfg = Config(task="finetune")
    cfg.finetune.method = "lora"
    run = resolve(cfg, examples=270)
    assert run.cfg.optim.lr == cfg.optim.lr and run.notes == ()


def test_resolving_a_resolved_config_does_not_scale_twice():
    cfg = load_config(recipe="sft-chat", overrides=[*FT, "finetune.method=lora"])
    once = resolve(cfg, examples=270)
    twice = resolve(once.cfg, examples=270)
    assert twice.cfg.optim.lr == once.cfg.optim.lr == pytest.approx(1e-3) and twice.notes == ()


def test_recipe_warmup_is_capped_to_a_share_of_a_short_run_unless_set():
    cfg = load_config(recipe="sft-qa", overrides=[*FT])
    run = resolve(cfg, examples=270)  # 3 x 17 = 51 steps: 20 warm-up steps would be 39% of them
    assert run.total_steps == 51 and run.cfg.schedule.warmup_steps == 5
    assert any(n.startswith("warm-up 5 steps") for n in run.notes)
    long_run = resolve(cfg, examples=20_000)  # 3,750 steps: the recipe's 20 stays
    assert long_run.cfg.schedule.warmup_steps == 20 and long_run.notes == ()
    mine = load_config(recipe="sft-qa", overrides=[*FT, "schedule.warmup_steps=20"])
    assert resolve(mine, examples=270).cfg.schedule.warmup_steps == 20


def test_stall_watch_fires_once_after_half_the_steps_when_the_loss_barely_moved():
    watch = StallWatch(total_steps=100, hint="raise optim.lr")
    assert watch.check(0, {"val_loss": 6.9}) is None  # the untrained model's
    assert watch.check(40, {"val_loss": 6.85}) is None  # before half the steps
    event = watch.check(50, {"val_loss": 6.8})
    assert event["step"] == 50 and event["drop"] == pytest.approx(0.1 / 6.9)
    assert event["message"] == (
        "validation loss 6.9 → 6.8 after 50% of the steps (less than 10% lower): raise optim.lr"
    )
    assert watch.check(60, {"val_loss": 6.8}) is None  # once


def test_stall_watch_is_quiet_when_the_loss_dropped_enough():
    watch = StallWatch(total_steps=10, hint="")
    watch.check(0, {"val_loss": 5.0})
    assert watch.check(5, {"val_loss": 4.4}) is None  # 12% lower
    assert watch.check(10, {"val_loss": 5.0}) is None  # checked once, at the first eval after half
    resumed = StallWatch(total_steps=10, hint="")
    assert resumed.check(4, {"val_loss": 2.0}) is None and resumed.check(6, {"val_loss": 2.0}) is None


def test_a_stalled_finetune_run_warns_and_logs_the_event(tmp_path, caplog):
    base = make_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", reverse_rows(40))
    cfg = ft_config(base, data, tmp_path / "run", "optim.lr=1e-9", "finetune.method=lora")
    from lmkiln.tasks.finetune import finetune

    with caplog.at_level(logging.WARNING, logger="lmkiln"):
        finetune(cfg)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stalls = [e for e in events if e["event"] == "stall"]
    assert len(stalls) == 1 and stalls[0]["step"] == 3 and stalls[0]["drop"] < 0.1
    assert "may be too low for LoRA" in stalls[0]["message"]
    assert [r.getMessage() for r in caplog.records if "validation loss" in r.getMessage()] == [
        stalls[0]["message"]
    ]
