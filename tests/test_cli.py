"""The command line as a user meets it: the main path end to end, and every bad input as one line."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, write
from test_train import synthetic_corpus

FAST = [
    "tokenizer.vocab_size=300",
    "model.preset=tiny",
    "train.seq_len=32",
    "train.batch_size=8",
    "log.progress=off",
    "train.sample_tokens=0",
]


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.slow
def test_prepare_train_generate_end_to_end(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus.txt", lines=600)
    args = [f"data.corpus={corpus}", *FAST]
    prep = run_cli("data", "prepare", *args, cwd=tmp_path, check=True)
    assert "train /" in prep.stdout and "shards:" in prep.stdout
    run = tmp_path / "runs" / "demo"
    train = run_cli(
        "train",
        *args,
        "name=demo",
        "train.max_steps=200",
        "train.eval_every=50",
        "train.save_every=100",
        "train.log_every=25",
        "train.sample_tokens=20",
        cwd=tmp_path,
        check=True,
    )
    assert "validation loss" in train.stdout and "lmkiln generate" in train.stdout
    assert "training loss" in train.stdout and "(last 50 steps)" in train.stdout
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [e["val_loss"] for e in evals if e["event"] == "eval"]
    assert val[-1] < val[0] - 1.0, val  # a stated margin: more than one nat below the first evaluation
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    assert (run / "plots" / "loss.png").stat().st_size > 1000
    assert len(list((run / "checkpoints").glob("step_*"))) >= 1
    gen = run_cli(
        "generate",
        str(run),
        "--prompt",
        "alpha beta",
        "--max-new-tokens",
        "12",
        "--seed",
        "1",
        "--temperature",
        "0",
        cwd=tmp_path,
        check=True,
    )
    assert gen.stdout.startswith("alpha beta") and len(gen.stdout.split()) > 3
    again = run_cli(
        "generate",
        str(run),
        "--prompt",
        "alpha beta",
        "--max-new-tokens",
        "12",
        "--seed",
        "1",
        "--temperature",
        "0",
        cwd=tmp_path,
        check=True,
    )
    assert again.stdout == gen.stdout  # greedy decoding is deterministic


def test_recipes_and_print_config(tmp_path):
    listing = run_cli("recipes", check=True)
    assert "default" in listing.stdout and "nanogpt-shakespeare-char" in listing.stdout
    printed = run_cli("train", "--print-config", "--optim.lr", "3e-4", "model.n_layer=3", check=True)
    assert "lr: 0.0003" in printed.stdout and "n_layer: 3" in printed.stdout


def test_config_mistakes_are_one_line(tmp_path):
    assert_user_error(run_cli("train", "--optim.lrr", "1"), "unknown config key 'optim.lrr'", "'optim.lr'")
    assert_user_error(run_cli("train", "model.n_layer=four"), "'model.n_layer'", "expected int", "'four'")
    assert_user_error(run_cli("train", "train.seq_len=1024"), "longer than the model's maximum context")
    assert_user_error(run_cli("train", "train.batch_size=6", "train.micro_batch_size=4"), "multiple of")


def test_data_mistakes_are_one_line(tmp_path):
    assert_user_error(
        run_cli("data", "prepare", f"data.corpus={tmp_path / 'missing.txt'}"), "corpus not found"
    )
    bad = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    assert_user_error(run_cli("data", "prepare", f"data.corpus={bad}"), "bad.jsonl:2: not valid JSON")
    latin = write(tmp_path / "latin.txt", b"ok\ncaf\xe9\n")
    assert_user_error(
        run_cli("data", "prepare", f"data.corpus={latin}"), "latin.txt:2: not valid UTF-8", "byte offset 6"
    )
    empty = write(tmp_path / "empty.txt", "\n\n")
    assert_user_error(run_cli("data", "prepare", f"data.corpus={empty}"), "is empty")
    small = write(tmp_path / "small.txt", "just a few words here")
    assert_user_error(
        run_cli("data", "prepare", f"data.corpus={small}", "tokenizer.vocab_size=100"),
        "smaller than the byte alphabet",
    )
    # ... and training on a corpus shorter than one window says how many tokens exist and are needed
    assert_user_error(
        run_cli(
            "train",
            f"data.corpus={small}",
            "tokenizer.kind=char",
            "data.val_fraction=0",
            f"train.run_dir={tmp_path / 'r'}",
        ),
        "training split has",
        "needs train.seq_len + 1 = 129",
    )


def test_prepared_shard_set_checks_its_tokenizer(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus.txt")
    prep = run_cli("data", "prepare", f"data.corpus={corpus}", *FAST, cwd=tmp_path, check=True)
    shard_dir = prep.stdout.split("shards: ")[-1].strip()
    other = run_cli(
        "tokenizer",
        "train",
        f"data.corpus={corpus}",
        "tokenizer.kind=char",
        "--out",
        str(tmp_path / "chartok"),
        check=True,
    )
    assert "tokenizer.json" in other.stdout
    assert_user_error(
        run_cli(
            "train",
            f"data.corpus={shard_dir}",
            "tokenizer.kind=file",
            f"tokenizer.path={tmp_path / 'chartok'}",
            *FAST[1:],
            f"train.run_dir={tmp_path / 'r'}",
        ),
        "tokenizer does not match the shards",
    )


@pytest.mark.slow
def test_run_directory_guards(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus.txt")
    args = [
        f"data.corpus={corpus}",
        *FAST,
        "train.max_steps=4",
        "train.eval_every=2",
        "train.save_every=2",
        f"train.run_dir={tmp_path / 'run'}",
    ]
    run_cli("train", *args, check=True)
    assert_user_error(
        run_cli("train", *args, "optim.lr=0.5"),
        "already exists with a different config",
        "optim.lr",
        "--resume auto",
        "--overwrite",
    )
    assert_user_error(
        run_cli("train", *args, "train.batch_size=4", "--resume", "auto"),
        "refusing to resume",
        "train.batch_size: 8 → 4",
        "--force",
    )
    run_cli("train", *args, "--overwrite", check=True)
    assert_user_error(run_cli("generate", str(tmp_path)), "has no complete checkpoint")
    blocker = write(tmp_path / "a-file", "not a directory")  # unwritable even for root
    assert_user_error(run_cli("train", *args[:-1], f"train.run_dir={blocker / 'run'}"), "cannot write")


def test_debug_shows_the_traceback():
    proc = run_cli("--debug", "train", "--optim.lrr", "1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
