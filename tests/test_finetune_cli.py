"""`lmkiln finetune` and `lmkiln eval` as a user meets them: bad input as one line, and the whole path."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli, write
from finetune_helpers import PARTNER, make_base, reverse_rows, word_lists, write_jsonl
from test_cli import assert_user_error

FAST = ["log.progress=off", "train.max_steps=2", "finetune.eval_samples=0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("ft") / "base")


def test_bad_task_files_name_file_and_line(tmp_path, base):
    rows = reverse_rows(3)
    del rows[1]["output"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert_user_error(
        run_cli("finetune", "--base", str(base), "--data", str(data), *FAST),
        "d.jsonl:2: missing field 'output'",
    )
    rows = reverse_rows(3)
    rows[2]["output"] = " "
    data = write_jsonl(tmp_path / "e.jsonl", rows)
    assert_user_error(
        run_cli("finetune", "--base", str(base), "--data", str(data), *FAST), "e.jsonl:3: empty target"
    )
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}],
    )
    assert_user_error(
        run_cli("finetune", "--base", str(base), "--data", str(chat), "--format", "chat", *FAST),
        "chat.jsonl:1: role sequence user → user cannot be rendered",
    )
    labels = write_jsonl(
        tmp_path / "l.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "maybe"}]
    )
    assert_user_error(
        run_cli(
            "finetune",
            "--base",
            str(base),
            "--data",
            str(labels),
            "--format",
            "classification",
            "finetune.labels=[pos,neg]",
            *FAST,
        ),
        "l.jsonl:2: label 'maybe' is not in the declared label set (pos, neg)",
    )


def test_a_base_without_tokenizer_is_refused(tmp_path, base):
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    shutil.rmtree(broken / "tokenizer")
    data = write_jsonl(tmp_path / "d.jsonl", reverse_rows(4))
    assert_user_error(
        run_cli("finetune", "--base", str(broken), "--data", str(data), *FAST), "has no tokenizer"
    )
    assert_user_error(run_cli("finetune", "--data", str(data), *FAST), "needs a base model: --base")


def test_finetune_print_config_uses_the_format_recipe():
    printed = run_cli(
        "finetune", "--base", "b", "--data", "d.jsonl", "--format", "qa", "--print-config", check=True
    )
    assert "task: finetune" in printed.stdout and "format: qa" in printed.stdout
    assert "name: sft-qa" in printed.stdout


def mapping_corpus(n: int) -> str:
    """Word lists followed by their partner words: the skill the base model learns in pretraining."""
    return "\n\n".join(
        f"{' '.join(w)} means {' '.join(PARTNER[x] for x in w)}." for w in word_lists(n, seed=1)
    )


def mapping_rows(n: int, seed: int) -> list[dict]:
    return [
        {
            "instruction": "Swap each word for its partner.",
            "input": " ".join(w),
            "output": " ".join(PARTNER[x] for x in w),
        }
        for w in word_lists(n, seed)
    ]


@pytest.mark.slow
def test_pretrain_finetune_eval_end_to_end(tmp_path):
    """A tiny base learns the word-partner mapping in pretraining ("red cat means green dog.");
    fine-tuning teaches a new prompt format that ends at EOS. Exact match goes from 0 to ≥ 0.8."""
    corpus = write(tmp_path / "corpus.txt", mapping_corpus(800))
    base = tmp_path / "base"
    run_cli(
        "train",
        f"data.corpus={corpus}",
        "tokenizer.vocab_size=300",
        "model.n_layer=2",
        "model.n_head=4",
        "model.n_kv_head=2",
        "model.d_model=64",
        "model.block_size=128",
        "model.dropout=0",
        "train.seq_len=64",
        "train.batch_size=16",
        "train.max_steps=500",
        "train.eval_every=250",
        "train.save_every=500",
        "schedule.warmup_steps=10",
        "optim.lr=3e-3",
        "log.progress=off",
        "log.plot=false",
        "train.sample_tokens=0",
        f"train.run_dir={base}",
        check=True,
    )
    data = write_jsonl(tmp_path / "task.jsonl", mapping_rows(2000, seed=2))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", mapping_rows(100, seed=3))
    prompt = "finetune.prompt={{ input }} ="
    before = run_cli("eval", str(base), "--data", str(heldout), "--task", "instruction", prompt, check=True)
    assert "exact_match" in before.stdout
    run = tmp_path / "sft"
    tuned = run_cli(
        "finetune",
        "--base",
        str(base),
        "--data",
        str(data),
        "--method",
        "full",
        prompt,
        "train.max_epochs=6",
        "optim.lr=3e-3",
        "schedule.warmup_steps=5",
        f"train.run_dir={run}",
        "log.progress=off",
        check=True,
    )
    assert "generation check after" in tuned.stdout and "lmkiln eval" in tuned.stdout
    after = run_cli(
        "eval", str(run), "--data", str(heldout), "--task", "instruction", "--batch-size", "32", check=True
    )
    first = json.loads((base / "eval-instruction.json").read_text())["metrics"]
    last = json.loads((run / "eval-instruction.json").read_text())["metrics"]
    assert first["exact_match"] <= 0.05, first
    assert last["exact_match"] >= 0.8, (last, after.stdout)
    assert last["eos_rate"] >= 0.95, last
    figures = json.loads((run / "finetune_eval.json").read_text())
    assert figures["trainable_parameters"] == figures["total_parameters"]
    assert figures["after"]["metrics"]["exact_match"] > figures["before"]["metrics"]["exact_match"]
