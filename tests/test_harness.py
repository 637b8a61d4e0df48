"""lm-evaluation-harness adapter: the same scores as lm-eval's own `hf` model on the exported
directory of the run, and `lmkiln eval --harness` on local task YAMLs with local data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from finetune_helpers import make_base

pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "data" / "harness"


@pytest.fixture(scope="module")
def run_and_export(tmp_path_factory):
    from lmkiln.interop.hf_export import export_run

    root = tmp_path_factory.mktemp("harness")
    base = make_base(root / "base", block_size=64)
    export_run(base, root / "hf")
    return base, root / "hf"


def _requests(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_adapter_scores_equal_lm_evals_hf_model_on_the_exported_run(run_and_export):
    from lm_eval.models.huggingface import HFLM

    from lmkiln.eval.harness import LmkilnLM

    base, exported = run_and_export
    ours = LmkilnLM(str(base), batch_size=3)
    theirs = HFLM(pretrained=str(exported), batch_size=3, device="cpu", dtype="float32")
    pairs = [
        ("red cat means", " red cat"),
        ("blue ", "tree"),  # a trailing space moves to the continuation
        ("", "sun moon"),  # empty context: scored after the prefix token
        ("dog " * 40, "cat cat cat cat"),  # longer than the context: truncated on the left
    ]
    ll = _requests("loglikelihood", pairs)
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(ll), theirs.loglikelihood(ll)):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b
    texts = [("red green blue cat dog sun moon tree " * 8,), ("cat",)]  # the first needs 3 windows
    rolling = _requests("loglikelihood_rolling", texts)
    for a, b in zip(ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling)):
        assert abs(a - b) < 1e-3 * max(1.0, abs(b) / 100)
    gen = _requests(
        "generate_until",
        [("red cat means", {"until": ["\n", " sun"], "max_gen_toks": 6}), ("blue", {"max_gen_toks": 5})],
    )
    assert ours.generate_until(gen) == theirs.generate_until(gen)


def _local_tasks(directory: Path) -> Path:
    """The shipped task YAMLs with their data file made absolute (lm-eval reads data_files
    relative to the working directory)."""
    directory.mkdir()
    data = TASKS / "echo.jsonl"
    for task in TASKS.glob("*.yaml"):
        text = task.read_text(encoding="utf-8").replace(
            "test: tests/data/harness/echo.jsonl", f"test: {data}"
        )
        (directory / task.name).write_text(text, encoding="utf-8")
    return directory


def test_eval_harness_runs_local_multiple_choice_and_generation_tasks(run_and_export, tmp_path, capsys):
    from lmkiln.cli import main

    base, _ = run_and_export
    tasks = _local_tasks(tmp_path / "tasks")
    out = tmp_path / "harness.json"
    args = ["eval", str(base), "--harness", "echo_choice,echo_generate", "--include", str(tasks)]
    assert main([*args, "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert 0.0 <= results["echo_choice"]["acc,none"] <= 1.0
    assert "exact_match,none" in results["echo_generate"]
    assert "echo_choice" in capsys.readouterr().out  # lm-eval's table

    code = main(["eval", str(base), "--harness", "echo_choise", "--include", str(tasks)])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        f"error: unknown harness task 'echo_choise': not in lm-eval's registry or in {tasks} "
        "(did you mean echo_choice"
    )
