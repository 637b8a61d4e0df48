"""Tables → MLP from the command line: the digits recipes, the example scripts, CSV/Parquet tables of
every target kind, and each bad input as one line naming the column and row."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli, write
from test_cli import assert_user_error

from lmkiln.config import load_config
from lmkiln.errors import LmkilnError

QUIET = ["log.progress=off", "log.plot=false"]


def table_cfg(tmp_path, path, *extra):
    return load_config(
        overrides=[
            "task=supervised",
            f"table.path={path}",
            "table.val_fraction=0.2",
            "table.test_fraction=0.2",
            "optim.name=adam",
            "optim.lr=0.03",
            "optim.weight_decay=0",
            "schedule.name=constant",
            "schedule.warmup_steps=0",
            "train.batch_size=16",
            "train.max_epochs=40",
            f"train.run_dir={tmp_path / 'run'}",
            "mlp.hidden=[16]",
            *QUIET,
            *extra,
        ]
    )


def make_rows(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    return a, b


# --------------------------------------------------------------------------------------------
# The digits: recipe from the CLI, and the two example scripts


def test_digits_recipe_reports_test_accuracy_per_class_f1_and_a_confusion_png(tmp_path):
    pytest.importorskip("sklearn")
    run = tmp_path / "run"
    proc = run_cli(
        "train", "--recipe", "digits-mlp", "train.max_epochs=25", f"train.run_dir={run}", *QUIET, check=True
    )
    accuracy = float(re.search(r"test \(359 held-out rows\): accuracy (\d\.\d+)", proc.stdout).group(1))
    assert accuracy >= 0.93, proc.stdout  # 25 epochs of plain SGD; the full recipe reaches ~0.97
    f1 = re.search(r"per-class F1: (.*)", proc.stdout).group(1).split(" | ")
    assert [pair.split()[0] for pair in f1] == [str(i) for i in range(10)]
    assert (run / "plots" / "confusion_matrix.png").stat().st_size > 5000
    saved = json.loads((run / "test_metrics.json").read_text())
    assert saved["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert "model: MLP 64→128→10 (relu), 9,610 parameters" in proc.stderr
    assert "--train.max_epochs 50   # continue training" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("recipe, floor", [("digits-mlp", 0.95), ("digits-softmax", 0.94)])
def test_digits_recipes_train_until_convergence(tmp_path, recipe, floor):
    pytest.importorskip("sklearn")
    proc = run_cli("train", "--recipe", recipe, f"train.run_dir={tmp_path / 'run'}", *QUIET, check=True)
    assert "stopped by early_stopping" in proc.stdout
    accuracy = float(re.search(r"held-out rows\): accuracy (\d\.\d+)", proc.stdout).group(1))
    assert accuracy >= floor, proc.stdout


@pytest.mark.parametrize("script, floor", [("mlp_digits.py", 0.95), ("softmax_digits.py", 0.94)])
def test_example_scripts_reach_their_accuracy(tmp_path, script, floor):
    pytest.importorskip("sklearn")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    accuracy = float(re.search(r"test accuracy (\d\.\d+) after 50 epochs", proc.stdout).group(1))
    assert accuracy >= floor, proc.stdout
    assert (tmp_path / "runs").is_dir()  # the loop's run directory: checkpoints, metrics, plots


# --------------------------------------------------------------------------------------------
# Tables of every kind


def test_csv_text_labels_classification(tmp_path):
    from lmkiln.tasks.supervised import train_table

    a, b = make_rows()
    names = np.where(a + b > 0.5, "high", np.where(a + b < -0.5, "low", "mid"))
    lines = ["a,b,noise,kind"] + [f"{x:.4f},{y:.4f},1,{n}" for x, y, n in zip(a, b, names)]
    path = write(tmp_path / "t.csv", "\n".join(lines) + "\n")
    result = train_table(table_cfg(tmp_path, path, "table.label=kind", "table.features=a,b"))
    assert result.table.class_names == ["high", "low", "mid"]
    assert result.table.feature_names == ["a", "b"]
    assert result.test.metrics["accuracy"] >= 0.9, result.test.metrics
    assert result.confusion_png.is_file()
    assert "per-class F1: high" in result.summary()


def test_parquet_regression_and_multilabel(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from lmkiln.tasks.supervised import train_table

    a, b = make_rows(300, seed=1)
    table = {"a": a, "b": b, "y": 2 * a - b, "p": (a > 0).astype(int), "q": (b > 0).astype(int)}
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table(table), path)
    regression = train_table(
        table_cfg(tmp_path / "r", path, "loss.name=mse", "table.label=y", "table.features=a,b")
    )
    variance = float(np.var(table["y"]))
    assert regression.test.metrics["mse"] < 0.05 * variance, regression.test.metrics
    multilabel = train_table(
        table_cfg(tmp_path / "m", path, "loss.name=bce", "table.label=p,q", "table.features=a,b")
    )
    assert multilabel.test.metrics["f1_micro"] >= 0.9, multilabel.test.metrics
    assert multilabel.test.confusion is None and multilabel.confusion_png is None


def test_table_checks_in_process(tmp_path):
    from lmkiln.data.tables import load_table

    cfg = load_config(overrides=["task=supervised", f"table.path={tmp_path / 'missing.csv'}"]).table
    with pytest.raises(LmkilnError, match="table not found"):
        load_table(cfg, "classification")
    path = write(tmp_path / "t.csv", "a,b,label\n1,2,0\n3,x,1\n")
    cfg.path = str(path)
    with pytest.raises(LmkilnError, match=r"t.csv:3: feature column 'b' holds 'x', not a number"):
        load_table(cfg, "classification")
    write(path, "a,b,label\n1,2,0\n3,4,2.5\n")
    with pytest.raises(LmkilnError, match=r"t.csv:3: label '2.5' in column 'label' is not a class id"):
        load_table(cfg, "classification")
    write(path, "a,b,label\n1,2,0\n3,4\n")
    with pytest.raises(LmkilnError, match=r"t.csv:3: 2 fields, but the header has 3 columns"):
        load_table(cfg, "classification")
    write(path, "a,b,label\n1,2,0\n3,4,2\n")
    cfg.label = ["label", "a"]
    with pytest.raises(LmkilnError, match="classification takes one label column"):
        load_table(cfg, "classification")
    with pytest.raises(LmkilnError, match=r"t.csv:3: label column 'label' holds 2; multi-label targets"):
        load_table(cfg, "multilabel")


# --------------------------------------------------------------------------------------------
# Bad input through the CLI: exit code 2, one line, the column and the row


def test_bad_tables_are_one_line_naming_column_and_row(tmp_path):
    path = write(tmp_path / "data.csv", "a,b,y\n0.5,1.0,0\n0.1,,1\n0.3,0.2,5\n")
    base = ["train", "task=supervised", f"table.path={path}", f"train.run_dir={tmp_path / 'r'}", *QUIET]
    assert_user_error(
        run_cli(*base, "table.label=target"), "no label column 'target' (columns: a, b, y)", "table.label"
    )
    assert_user_error(
        run_cli(*base, "table.label=y", "table.features=a", "mlp.outputs=3"),
        "data.csv:4: label 5 in column 'y' is outside [0, 3) (mlp.outputs=3)",
    )
    assert_user_error(
        run_cli(*base, "table.label=y", "table.features=a", "mlp.inputs=2"),
        "mlp.inputs is 2 but",
        "has 1 feature columns (a)",
    )
    assert_user_error(
        run_cli(*base, "table.label=y"),
        "data.csv:3: feature column 'b' is missing (NaN/missing values are not allowed",
    )


def test_mlp_config_builds_the_classic_layers():
    from torch import nn

    from lmkiln.model.mlp import build_mlp

    cfg = load_config(
        overrides=["task=supervised", "mlp.hidden=[8,4]", "mlp.dropout=0.2", "mlp.activation=tanh"]
    ).mlp
    layers = [type(m) for m in build_mlp(cfg, 6, 3).layers]
    assert layers == [nn.Linear, nn.Tanh, nn.Dropout, nn.Linear, nn.Tanh, nn.Dropout, nn.Linear]
    linear = build_mlp(load_config(overrides=["task=supervised", "mlp.hidden=[]"]).mlp, 64, 10)
    assert [type(m) for m in linear.layers] == [nn.Linear] and linear.layers[0].weight.shape == (10, 64)
