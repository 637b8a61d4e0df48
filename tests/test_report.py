"""Run reports: every run ends with a self-contained report.html that renders in a real browser
with charts that hold the run's data; `lmkiln report` compares runs; `lmkiln runs` lists them."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import run_cli
from test_cli import FAST, assert_user_error
from test_train import synthetic_corpus

RUN_ARGS = [*FAST, "train.max_steps=30", "train.eval_every=10", "train.log_every=5", "train.save_every=30"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    corpus = synthetic_corpus(root / "corpus.txt", lines=400)
    outputs = []
    for name, lr in (("a", "3e-3"), ("b", "1e-3")):
        proc = run_cli("train", f"data.corpus={corpus}", *RUN_ARGS, f"optim.lr={lr}",
                       f"train.run_dir={root / 'runs' / name}", cwd=root, check=True)  # fmt: skip
        outputs.append(proc.stdout)
    return root / "runs", outputs


def _metrics(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if e["event"] == "train"], [e for e in lines if e["event"] == "eval"]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_every_run_ends_with_a_report_that_renders_its_curves_offline(two_runs):
    runs, outputs = two_runs
    report = runs / "a" / "report.html"
    assert f"report: {report}" in outputs[0]
    train, evals = _metrics(runs / "a")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # the run learned (stated drop: 1 nat)
    text = report.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # no network, no CDN
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"), args=["--headless", "--no-sandbox"]
        )
        try:
            page = browser.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.as_uri())
            series = page.eval_on_selector_all(
                "svg.chart polyline.series",
                "els => els.map(e => [e.dataset.label, e.points.numberOfItems, e.getBBox().height])",
            )
        finally:
            browser.close()
    assert all(url.startswith("file:") for url in requests), requests
    by_label = {label: (points, height) for label, points, height in series}
    assert by_label["a loss"][0] == len(train) and by_label["a loss"][1] > 50  # drawn, not flat
    assert by_label["a val_loss"][0] == len(evals)
    assert by_label["a lr"][0] == len(train)
    assert "a tokens_per_s" in by_label


@pytest.mark.slow
def test_a_report_of_two_runs_shows_what_differs_and_samples(two_runs, tmp_path):
    runs, _ = two_runs
    out = tmp_path / "both.html"
    proc = run_cli(
        "report", str(runs / "a"), str(runs / "b"), "--out", str(out), "--samples", "1", check=True
    )
    assert str(out) in proc.stdout
    text = out.read_text()
    assert "Keys that differ" in text and "optim.lr" in text and "0.003" in text and "0.001" in text
    assert "train.run_dir" in text and "data.corpus" not in text.split("Keys that differ")[1]
    assert text.count("<h2>Samples</h2>") == 1 and text.count("<pre>") == 2


@pytest.mark.slow
def test_runs_lists_every_run_with_its_final_metrics(two_runs):
    runs, _ = two_runs
    table = run_cli("runs", str(runs), check=True).stdout.splitlines()
    assert table[0].split() == ["run", "steps", "loss", "val_loss", "val_ppl", "tok/s", "time_s"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert set(rows) == {"a", "b"}
    _, evals = _metrics(runs / "a")
    assert rows["a"][1] == "30" and float(rows["a"][3]) == pytest.approx(evals[-1]["val_loss"], rel=1e-3)


def test_report_and_runs_of_something_that_is_not_a_run_are_one_line_errors(tmp_path):
    assert_user_error(run_cli("report", str(tmp_path)), "is not a run directory", "metrics.jsonl")
    assert_user_error(run_cli("runs", str(tmp_path / "nowhere")), "runs directory not found")


@pytest.mark.slow
def test_the_report_sets_the_plan_next_to_what_the_run_measured(two_runs, tmp_path):
    runs, _ = two_runs
    train, _ = _metrics(runs / "a")
    assert all(record["peak_memory_mb"] > 1 for record in train)  # high-water mark less the start
    run = tmp_path / "a"
    shutil.copytree(runs / "a", run)
    corpus = runs.parent / "corpus.txt"
    run_cli("plan", f"data.corpus={corpus}", *RUN_ARGS, "--save", str(run / "plan.json"), cwd=runs.parent,
            check=True)  # fmt: skip
    plan = json.loads((run / "plan.json").read_text())
    out = tmp_path / "report.html"
    run_cli("report", str(run), "--out", str(out), check=True)
    section = out.read_text().split("plan vs measured")[1].split("</table>")[0]
    for predicted, measured in (
        (plan["tokens_per_s"], train[-1]["tokens_per_s"]),
        (plan["train_seconds"], train[-1]["elapsed_s"]),
        (plan["predicted_peak_bytes"] / 2**20, train[-1]["peak_memory_mb"]),
    ):
        assert f"{predicted:.0f}" in section or f"{predicted:.1f}" in section
        assert f"{measured:.0f}" in section or f"{measured:.1f}" in section
