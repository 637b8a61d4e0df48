"""Runs written by lmkiln 0.1 (before the restructure: C kernels, every config section saved) still
load, generate the same tokens, resume and export (fixture: tests/data/compat-0.1, see its README)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmkiln.config import load_config, to_dict
from lmkiln.interop.hf_export import export_run, verify_export
from lmkiln.model.generate import Sampling, generate_ids
from lmkiln.runs.load import load_run
from lmkiln.tasks.pretrain import pretrain

FIXTURE = Path(__file__).parent / "data" / "compat-0.1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def old_runs(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("compat") / "runs"
    shutil.copytree(FIXTURE, copy)
    return copy


@pytest.mark.parametrize("run", ["pretrain", "lora", "lora/merged"])
def test_an_old_run_loads_and_generates_what_it_generated_before(old_runs, run):
    expected = EXPECTED[run.split("/")[0]]
    loaded = load_run(old_runs / run)
    assert loaded.step == expected["step"]
    assert loaded.tokenizer.encode(expected["prompt"]) == expected["prompt_ids"]
    with torch.no_grad():
        logits = loaded.model(torch.tensor([expected["prompt_ids"]]))[0, -1]
    torch.testing.assert_close(logits, torch.tensor(expected["last_logits"]), atol=1e-5, rtol=0)
    greedy = Sampling(max_new_tokens=12, temperature=0.0)
    assert (
        generate_ids(loaded.model, [expected["prompt_ids"]], greedy, eos_id=None)[0] == expected["greedy_ids"]
    )
    sampled = Sampling(max_new_tokens=12, temperature=1.0, seed=0)
    assert (
        generate_ids(loaded.model, [expected["prompt_ids"]], sampled, eos_id=None)[0]
        == expected["sampled_ids"]
    )
    # the config saved with every section (0.1) reads back as the task's own sections
    assert "table" not in to_dict(loaded.cfg) and "finetune" not in to_dict(
        load_run(old_runs / "pretrain").cfg
    )


def test_an_old_run_resumes_and_trains_on(old_runs, tmp_path, caplog):
    run = old_runs / "pretrain"
    cfg = load_config(
        config_file=str(run / "config.yaml"),  # every section of 0.1 in it: the defaults are ignored
        overrides=[
            f"train.run_dir={run}",
            f"data.corpus={old_runs / 'corpus.txt'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.max_steps=6",
        ],
    )
    before = load_run(run).model.state_dict()["tok_embed.weight"].clone()
    # the corpus moved (its path and mtime are part of the shards' key): the only drift, so --force
    result = pretrain(cfg, resume="auto", force=True)
    drift = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert len(drift) == 1 and drift[0].count("→") == 1 and "(--force): data:" in drift[0]
    assert result.fit.state.step == 6 and (run / "checkpoints" / "step_000006").is_dir()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" and e["step"] == 4 for e in events)
    assert not torch.equal(load_run(run).model.state_dict()["tok_embed.weight"], before)


@pytest.mark.parametrize("run", ["pretrain", "lora"])
def test_an_old_run_exports_to_transformers(old_runs, tmp_path, run):
    pytest.importorskip("transformers")
    report = export_run(old_runs / run, tmp_path / "hf")
    loaded = load_run(old_runs / run)
    check = verify_export(loaded.model, loaded.tokenizer, report.out_dir)
    assert check.tokens_equal and check.max_abs_logits_diff < 1e-4, check


@pytest.mark.parametrize("run", ["pretrain", "lora"])
def test_an_old_run_exports_to_gguf(old_runs, tmp_path, run):
    pytest.importorskip("gguf")
    from lmkiln.interop.gguf_export import export_gguf_from
    from lmkiln.interop.gguf_verify import llama_cpp_available, verify_gguf

    report = export_gguf_from(old_runs / run, tmp_path / f"{run}.gguf")
    assert report.path.stat().st_size == report.bytes > 0 and report.architecture == "llama"
    if not llama_cpp_available():
        return
    loaded = load_run(old_runs / run)
    found = verify_gguf(loaded.model, loaded.tokenizer, report.path, "f32", threads=2)
    # the same token ids and logits in llama.cpp (greedy ties of a 4-step model are not asserted)
    assert found.tokens_equal and found.max_abs_logits_diff < 1e-3, found.lines()
