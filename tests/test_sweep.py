"""`lmkiln sweep` (Optuna) and `lmkiln lr-find`: trials are ordinary runs, the study resumes,
the loop stops a pruned trial, and a bad search space is a one-line error."""

from __future__ import annotations

import math

import pytest
from conftest import run_cli, write
from test_cli import assert_user_error
from test_train import synthetic_corpus

from lmkiln.config import load_config
from lmkiln.errors import LmkilnError

optuna = pytest.importorskip("optuna")

from lmkiln.sweep.lr_find import lr_range_test  # noqa: E402
from lmkiln.sweep.search import STUDY_NAME, read_space, sweep  # noqa: E402

TINY = ["tokenizer.vocab_size=300", "model.preset=tiny", "train.seq_len=32", "train.batch_size=8",
        "train.sample_tokens=0", "log.progress=off", "log.plot=false", "train.eval_every=10",
        "train.eval_tokens=2048"]  # fmt: skip


def _factory(tmp_path, steps=20):
    corpus = synthetic_corpus(tmp_path / "corpus.txt")
    return lambda extra: load_config(
        overrides=[f"data.corpus={corpus}", *TINY, f"train.max_steps={steps}", *extra]
    )


def _space(
    tmp_path, text="optim.lr: {low: 1.0e-3, high: 1.0e-2, log: true}\nmodel.n_layer: {low: 1, high: 2}\n"
):
    return read_space(write(tmp_path / "space.yaml", text))


@pytest.mark.slow
def test_a_sweep_runs_trials_as_runs_and_resumes_where_it_stopped(tmp_path):
    make, space, directory = _factory(tmp_path), _space(tmp_path), tmp_path / "sweep"
    first = sweep(make, space, directory, trials=2, pruner="none")
    assert sorted(p.name for p in directory.glob("trial-*")) == ["trial-000", "trial-001"]
    for trial in directory.glob("trial-*"):
        assert (trial / "metrics.jsonl").is_file() and (trial / "config.yaml").is_file()
    # a killed sweep leaves a RUNNING trial: it is marked failed and its parameters tried again
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{directory / 'study.db'}")
    stale = study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),
                       "model.n_layer": optuna.distributions.IntDistribution(1, 2)})  # fmt: skip
    result = sweep(make, space, directory, trials=3, pruner="none")
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{directory / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1
    assert study.trials[-1].params == stale.params  # the interrupted trial's parameters, retried
    values = [t.value for t in study.trials if t.value is not None]
    assert result.best_value == min(values) <= first.best_value
    best = result.best_file.read_text()
    assert "optim:" in best and "lr:" in best and "model:" in best
    assert 1e-3 <= result.best_params["optim.lr"] <= 1e-2 and result.best_params["model.n_layer"] in (1, 2)
    assert result.table.splitlines()[0].split()[:3] == ["trial", "state", "val_loss"]


@pytest.mark.slow
def test_the_loop_stops_a_trial_the_pruner_gives_up_on(tmp_path):
    from lmkiln.tasks.pretrain import pretrain

    cfg = _factory(tmp_path, steps=40)([f"train.run_dir={tmp_path / 'run'}"])
    seen = []
    result = pretrain(
        cfg, on_eval=lambda step, metrics: seen.append((step, metrics["val_loss"])) or step >= 20
    )
    assert result.fit.stop_reason == "pruned" and result.fit.state.step == 20
    assert [s for s, _ in seen] == [10, 20]
    assert seen[-1][1] < seen[0][1]  # the trial was learning when it was stopped


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim.lrr: {low: 1, high: 2}", "optim.lr"),
        ("optim.lr: {low: 0.1, high: 0.01}", "the range is empty"),
        ("model.mlp: {choices: []}", "choices are empty"),
        ("optim.lr: {low: 0, high: 0.1, log: true}", "log range must start above 0"),
        ("optim.lr: {min: 0, max: 1}", "unknown field"),
    ],
)
def test_a_bad_search_space_is_one_error_that_says_what_to_change(tmp_path, text, message):
    with pytest.raises(LmkilnError, match=message):
        _space(tmp_path, text)


def test_a_sweep_directory_of_another_space_is_refused(tmp_path):
    directory = tmp_path / "sweep"
    directory.mkdir()
    (directory / "space.yaml").write_text("- key: other\n")
    with pytest.raises(LmkilnError, match="different search space"):
        sweep(_factory(tmp_path), _space(tmp_path), directory, trials=1)


@pytest.mark.slow
def test_lr_find_suggests_a_rate_where_the_loss_falls(tmp_path):
    cfg = _factory(tmp_path)([])
    result = lr_range_test(cfg, steps=60, start=1e-5, end=10.0)
    assert result.diverged_at is not None  # lr 10 is far too high for AdamW
    assert 1e-5 <= result.suggestion < result.diverged_at
    i = result.lrs.index(result.suggestion)
    assert result.losses[min(i + 5, len(result.losses) - 1)] < result.losses[0]  # it was still falling there
    assert all(math.isfinite(v) for v in result.losses[:-1])


def test_sweep_cli_bad_space_is_a_one_line_error(tmp_path):
    space = write(tmp_path / "space.yaml", "optim.lr: {low: 1, high: 1}\n")
    assert_user_error(run_cli("sweep", "--space", str(space), cwd=tmp_path), "space.yaml: optim.lr", "widen")
