"""Config: layering, dotted overrides, type coercion, and the error messages users see."""

from __future__ import annotations

import pytest
import yaml
from conftest import run_cli

from lmkiln.config import (
    MODEL_PRESETS,
    Config,
    all_keys,
    field_docs,
    from_dict,
    load_config,
    parse_overrides,
    recipe_names,
    recipe_summary,
    to_dict,
)
from lmkiln.errors import LmkilnError


def test_defaults_and_dotted_overrides_in_both_spellings():
    cfg = load_config(
        overrides=["--optim.lr", "3e-4", "model.n_layer=6", "--train.compile", "--optim.betas=[0.9,0.99]"]
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.n_layer == 6
    assert cfg.train.compile is True
    assert cfg.optim.betas == (0.9, 0.99)


def test_recipe_then_file_then_command_line(tmp_path):
    file = tmp_path / "x.yaml"
    file.write_text("optim:\n  lr: 0.5\ntrain:\n  max_steps: 7\n")
    cfg = load_config(recipe="default", config_file=str(file), overrides=["--train.max_steps", "9"])
    assert cfg.name == "default"
    assert cfg.optim.lr == 0.5
    assert cfg.train.max_steps == 9


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(LmkilnError, match=r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"):
        load_config(overrides=["--optim.lrr", "1"])
    with pytest.raises(LmkilnError, match=r"'modle.n_layer'.*did you mean 'model.n_layer'"):
        load_config(overrides=["modle.n_layer=2"])


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("model:\n  n_layers: 3\n")
    with pytest.raises(LmkilnError, match=r"'model.n_layers' \(.*bad.yaml\).*'model.n_layer'"):
        load_config(config_file=str(file))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layer=four", r"'model.n_layer'.*expected int, got 'four'"),
        ("optim.lr=fast", r"'optim.lr'.*expected float, got 'fast'"),
        ("train.compile=maybe", r"'train.compile'.*expected bool, got 'maybe'"),
        ("optim.name=adamww", r"'optim.name'.*'adamww' is not one of .*did you mean 'adamw'"),
        ("optim.betas=[0.9]", r"'optim.betas'.*expected tuple\[float, float\]"),
    ],
)
def test_wrong_type_names_key_value_and_expected_type(override, message):
    with pytest.raises(LmkilnError, match=message):
        load_config(overrides=[override])


def test_cross_field_validation():
    with pytest.raises(LmkilnError, match="seq_len .* longer than the model's maximum context"):
        load_config(overrides=["train.seq_len=512", "model.block_size=256"])
    with pytest.raises(LmkilnError, match="batch_size .* multiple of .*micro_batch_size"):
        load_config(overrides=["train.batch_size=10", "train.micro_batch_size=4"])
    with pytest.raises(LmkilnError, match="divisible by model.n_kv_head"):
        load_config(overrides=["model.n_head=4", "model.n_kv_head=3"])


def test_preset_sits_under_explicit_values():
    cfg = load_config(overrides=["model.preset=gpt2-124m", "model.n_layer=2"])
    assert cfg.model.d_model == 768 and cfg.model.norm == "layer"
    assert cfg.model.n_layer == 2
    # a preset named on the command line replaces the recipe's model shape ...
    tiny = load_config(recipe="default", overrides=["model.preset=tiny"])
    assert (tiny.model.n_layer, tiny.model.d_model) == (2, 64)
    assert tiny.model.dropout == load_config(recipe="default").model.dropout  # ... but not unrelated fields
    with pytest.raises(LmkilnError, match="unknown model preset 'gpt5'"):
        load_config(overrides=["model.preset=gpt5"])


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_loads_validates_and_describes_itself(name):
    cfg = load_config(recipe=name)
    assert cfg.name == name
    assert recipe_summary(name)


def test_unknown_recipe_suggests_one():
    with pytest.raises(LmkilnError, match="unknown recipe 'defualt'.*'default'"):
        load_config(recipe="defualt")


def test_resolved_config_round_trips_through_a_dict():
    cfg = load_config(recipe="default", overrides=["optim.betas=[0.8,0.9]"])
    assert from_dict(to_dict(cfg), "saved") == cfg


def test_every_field_has_a_docstring():
    import dataclasses

    sections = [Config] + [
        type(getattr(Config(), f.name))
        for f in dataclasses.fields(Config)
        if dataclasses.is_dataclass(getattr(Config(), f.name))
    ]
    for section in sections:
        docs = field_docs(section)
        missing = [
            f.name
            for f in dataclasses.fields(section)
            if f.name not in docs and not dataclasses.is_dataclass(getattr(section(), f.name))
        ]
        assert not missing, f"{section.__name__} fields without a docstring: {missing}"


def test_literal_choices_match_the_registries():
    import typing

    from lmkiln.train.optim import OPTIMIZERS, SCHEDULES

    keys = all_keys()
    assert set(typing.get_args(keys["optim.name"])) == set(OPTIMIZERS)
    assert set(typing.get_args(keys["schedule.name"])) == set(SCHEDULES)


def test_supervised_literal_choices_match_the_registries():
    import typing

    from lmkiln.model.mlp import ACTIVATIONS
    from lmkiln.tasks import TASK_RUNNERS
    from lmkiln.train.objectives import LOSS_KINDS, SUPERVISED_LOSSES

    keys = all_keys()
    assert set(typing.get_args(keys["loss.name"])) == set(SUPERVISED_LOSSES) == set(LOSS_KINDS)
    assert set(typing.get_args(keys["mlp.activation"])) == set(ACTIVATIONS)
    assert set(typing.get_args(keys["task"])) == set(TASK_RUNNERS)


def test_presets_are_valid_configs():
    for name in MODEL_PRESETS:
        load_config(overrides=[f"model.preset={name}", "train.seq_len=64"])


def test_override_syntax_errors():
    assert parse_overrides(["--a.b", "1", "c.d=2", "--e.f=3", "--flag"]) == {
        "a.b": "1",
        "c.d": "2",
        "e.f": "3",
        "flag": "true",
    }
    with pytest.raises(LmkilnError, match="unexpected argument 'oops'"):
        parse_overrides(["oops"])


def test_finetune_choices_match_the_registries():
    import typing

    from lmkiln.data.formats import FORMATS
    from lmkiln.eval.runner import EVAL_TASKS
    from lmkiln.model.classifier import POOLING

    keys = all_keys()
    assert (
        set(typing.get_args(keys["finetune.format"]))
        == set(FORMATS)
        == set(EVAL_TASKS) - {"perplexity", "memorization"}
    )
    assert set(typing.get_args(keys["finetune.pooling"])) == set(POOLING)


def test_a_command_shows_and_saves_only_the_sections_its_task_reads():
    from lmkiln.config import TASK_SECTIONS, to_yaml

    for recipe, task in (("default", "pretrain"), ("digits-mlp", "supervised"), ("sft-chat", "finetune")):
        shown = yaml.safe_load(to_yaml(load_config(recipe=recipe), derived=False))
        assert {k for k, v in shown.items() if isinstance(v, dict)} == set(TASK_SECTIONS[task]), recipe


def test_a_key_of_another_tasks_section_names_the_task_that_owns_it():
    with pytest.raises(
        LmkilnError,
        match=r"^config key 'table.path' \(command line\) belongs to task 'supervised', not 'pretrain'$",
    ):
        load_config(overrides=["table.path=my.csv"])
    with pytest.raises(LmkilnError, match="belongs to task 'pretrain', not 'supervised'"):
        load_config(recipe="digits-mlp", overrides=["model.n_layer=2"])
    proc = run_cli("train", "--print-config", "encoder.base=x")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "belongs to task 'encoder', not 'pretrain'" in proc.stderr


def test_a_config_file_with_every_section_loads_when_the_foreign_ones_hold_defaults(tmp_path):
    from lmkiln.config import to_dict

    every = to_dict(load_config(), every_section=True)  # what lmkiln 0.1 saved for every run
    file = tmp_path / "old.yaml"
    file.write_text(yaml.safe_dump(every))
    assert load_config(config_file=str(file)) == load_config()
    every["mlp"]["hidden"] = [7]  # a foreign setting that says something is still refused
    file.write_text(yaml.safe_dump(every))
    with pytest.raises(
        LmkilnError, match=r"config key 'mlp.hidden' \(.*old.yaml\) belongs to task 'supervised'"
    ):
        load_config(config_file=str(file))


def test_batch_plan_splits_an_unset_micro_batch_over_the_processes():
    from lmkiln.config import batch_plan, resolve

    plan = batch_plan(load_config().train, world_size=2)
    assert (plan.micro_batch_size, plan.accumulation) == (8, 1)
    assert batch_plan(load_config(overrides=["train.micro_batch_size=4"]).train, 2).accumulation == 2
    with pytest.raises(LmkilnError, match=r"multiple of train.micro_batch_size \(8\) × processes \(4\)"):
        batch_plan(load_config(overrides=["train.micro_batch_size=8"]).train, 4)
    cfg = load_config()
    run = resolve(cfg, 1, vocab_size=300, derived={"train.seq_len": 64})
    assert (run.cfg.model.vocab_size, run.cfg.train.seq_len) == (300, 64)
    assert (cfg.model.vocab_size, cfg.train.seq_len) == (0, 256)  # the user's config is untouched
