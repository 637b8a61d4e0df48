"""The bad-input matrix: every mistake a user can make gets one line, exit code 2, no traceback,
and leaves nothing half-written behind.

Each case is a command line (with {w} for the shared fixture directory, {ro} for a read-only
mount, {full} for a full one) and a fragment the one error line must contain. The commands run
in-process (`lmkiln.cli.main`), in a fresh working directory, so a case costs milliseconds
unless it has to build something first. Two guard tests keep the matrix complete: every
subcommand has a case, and every numeric config key has a declared range (which gets a case).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write
from test_train import synthetic_corpus, tiny_cfg

from lmkiln.cli import build_parser, main
from lmkiln.config import all_keys
from lmkiln.config.ranges import FIELD_RANGES, Range

TINY = (
    "data.corpus={w}/corpus.txt tokenizer.vocab_size=300 model.preset=tiny train.seq_len=32 "
    "train.batch_size=8 train.max_steps=4 train.eval_every=4 train.save_every=4 log.progress=off "
    "log.plot=false train.sample_tokens=0"
)

# (command line, fragment of the one error line; " ... " separates several fragments)
CASES: list[tuple[str, str]] = [
    # train: values that used to reach torch, loop forever or "succeed" on nothing
    ("train train.seq_len=0", "'train.seq_len' must be >= 1, got 0"),
    ("train train.seq_len=-5", "'train.seq_len' must be >= 1, got -5"),
    ("train optim.lr=-0.001", "'optim.lr' must be positive (> 0), got -0.001"),
    ("train model.dropout=2", "'model.dropout' must be in [0, 1], got 2.0"),
    ("train optim.betas=[1.5,0.9]", "'optim.betas' must be in [0, 1), got (1.5, 0.9) (item 1.5)"),
    ("train optim.lr=nan", "'optim.lr' must be positive (> 0), got nan"),
    ("train optim.lr=inf", "'optim.lr'"),
    ("train optim.lr=abc", "config key 'optim.lr' (command line): expected float, got 'abc'"),
    ("train train.max_steps=1.5", "'train.max_steps' (command line): expected int"),
    ("train --nproc 0", "argument --nproc: must be at least 1, got 0"),
    ("train --nproc two", "argument --nproc: expected int, got 'two'"),
    ("train optim.lrr=0.1", "unknown config key 'optim.lrr' (command line) — did you mean 'optim.lr'?"),
    ("train --config {w}/missing.yaml", "config file not found: {w}/missing.yaml"),
    ("train --config {w}/broken.yaml", "not valid YAML"),
    ("train --config {w}/list.yaml", "expected a mapping of config sections"),
    ("train --recipe nosuch", "unknown recipe 'nosuch'"),
    ("train task=nosuch", "'task' (command line): 'nosuch' is not one of"),
    ("train model.preset=huge", "unknown model preset 'huge'"),
    ("train train.seq_len=64 model.block_size=32", "train.seq_len (64) is longer than"),
    ("train model.d_model=66 model.n_head=4", "must be divisible by model.n_head"),
    ("train model.n_head=4 model.n_kv_head=3", "must be divisible by model.n_kv_head"),
    ("train train.batch_size=10 train.micro_batch_size=4", "must be a multiple of train.micro_batch_size"),
    ("train table.seed=1", "belongs to task 'supervised'"),
    ("train task=supervised table.val_fraction=0.5 table.test_fraction=0.6", "must be below 1"),
    ("train data.canaries=2 data.split=tail", "data.canaries needs data.split=document"),
    ("train stray", "unexpected argument 'stray'"),
    (f"train {TINY} data.corpus={{w}}/missing.txt", "{w}/missing.txt"),
    (f"train {TINY} data.corpus={{w}}/not-parquet.parquet", "not a readable parquet file"),
    (f"train {TINY} data.corpus={{w}}/quote.csv", "quote.csv:4: not valid CSV"),
    (f"train {TINY} train.run_dir={{w}}/afile", "{w}/afile exists and is not a directory"),
    (f"train {TINY} train.run_dir={{w}}/notarun", "is not empty and is not a lmkiln run directory"),
    (f"train {TINY} train.run_dir={{ro}}/run", "{ro}/run"),
    (f"train {TINY} data.cache_dir={{ro}}/cache", "Read-only file system"),
    (f"train {TINY} train.run_dir={{full}}/run", "No space left on device"),
    (f"train {TINY} train.run_dir={{w}}/run", "already exists"),
    (f"train {TINY} --resume {{w}}/run/checkpoints/step_000099", "step_000099"),
    # finetune
    ("finetune", "finetune.base"),
    ("finetune --base {w}/missing --data {w}/sft.jsonl", "{w}/missing"),
    ("finetune --base {w}/run --data {w}/missing.jsonl", "{w}/missing.jsonl"),
    ("finetune --base {w}/run --data {w}/sft.jsonl finetune.lora_r=0", "'finetune.lora_r' must be >= 1"),
    ("finetune --base {w}/run --data {w}/sft.jsonl --format nosuch", "argument --format: invalid choice"),
    ("finetune --base {w}/run --data {w}/sft.jsonl data.seed=1", "belongs to task 'pretrain'"),
    (
        "finetune --base {w}/run --data {w}/prefs.jsonl --format preference",
        "prefs.jsonl:2: missing field 'rejected'",
    ),
    (
        "finetune --base {w}/run --data {w}/sft.jsonl --objective dpo",
        "finetune.objective=dpo needs preference pairs",
    ),
    (
        "finetune --base {w}/run --data {w}/prefs.jsonl --format preference finetune.reference=adapters_disabled",
        "finetune.reference=adapters_disabled needs method=lora",
    ),
    (
        "finetune --base {w}/run --data {w}/prefs.jsonl --format preference finetune.beta=0",
        "'finetune.beta' must be positive",
    ),
    # data prepare
    ("data prepare data.shard_tokens=0", "'data.shard_tokens' must be >= 1000, got 0"),
    ("data prepare data.val_fraction=1", "'data.val_fraction' must be in [0, 1), got 1.0"),
    (f"data prepare {TINY} data.corpus={{w}}/missing.txt", "{w}/missing.txt"),
    (f"data prepare {TINY} data.corpus={{w}}/not-parquet.parquet", "not a readable parquet file"),
    (f"data prepare {TINY} data.corpus={{w}}/quote.csv", "not valid CSV (unexpected end of data)"),
    (f"data prepare {TINY} data.corpus={{w}}/bad.jsonl", "bad.jsonl:2"),
    (f"data prepare {TINY} data.cache_dir={{ro}}/cache", "Read-only file system"),
    (f"data prepare {TINY} data.cache_dir={{w}}/afile", "{w}/afile"),
    (
        f"data prepare {TINY} data.cache_dir={{full}}/cache",
        "{full}/cache/tokenizers/ ... No space left on device",
    ),
    ("data prepare extra", "unexpected argument 'extra'"),
    ("data nosuch", "invalid choice: 'nosuch'"),
    # data audit
    ("data audit", "give the corpus to audit"),
    ("data audit {w}/missing.txt", "{w}/missing.txt"),
    ("data audit {w}/corpus.txt --ngram 0", "argument --ngram: must be at least 1, got 0"),
    ("data audit {w}/corpus.txt --types email,nosuch", "nosuch"),
    ("data audit --eval {w}/sft.jsonl", "--eval needs the training corpus"),
    ("data audit {w}/corpus.txt --tokenizer {w}/missing", "{w}/missing"),
    ("data audit {w}/corpus.txt --no-dedup --out {ro}/audit.json", "Read-only file system"),
    # tokenizer train
    ("tokenizer train", "the following arguments are required: --out"),
    ("tokenizer train --out tok tokenizer.vocab_size=1", "'tokenizer.vocab_size' must be >= 2, got 1"),
    (f"tokenizer train --out {{w}}/afile {TINY}", "{w}/afile"),
    (f"tokenizer train --out {{ro}}/tok {TINY}", "Read-only file system"),
    (f"tokenizer train --out tok {TINY} data.corpus={{w}}/missing.txt", "{w}/missing.txt"),
    ("tokenizer train --out tok tokenizer.kind=file", "tokenizer.path"),
    # generate
    ("generate {w}/run --max-new-tokens -1", "argument --max-new-tokens: must be at least 1, got -1"),
    ("generate {w}/run --max-new-tokens 0", "argument --max-new-tokens: must be at least 1, got 0"),
    ("generate {w}/run --max-new-tokens abc", "argument --max-new-tokens: expected int, got 'abc'"),
    ("generate {w}/run --temperature -1", "argument --temperature: must be at least 0, got -1"),
    ("generate {w}/run --top-p 2", "argument --top-p: must be in (0, 1], got 2"),
    ("generate {w}/run --top-p 0", "argument --top-p: must be in (0, 1], got 0"),
    ("generate {w}/run --top-k -1", "argument --top-k: must be at least 0, got -1"),
    ("generate {w}/run --seed -1", "argument --seed: must be at least 0, got -1"),
    ("generate {w}/run --device cuda", "no CUDA device is available"),
    ("generate {w}/run --device gpu", "expected cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("generate {w}/missing", "run directory not found: {w}/missing"),
    ("generate {w}/afile", "{w}/afile"),
    ("generate {w}/empty", "{w}/empty has no complete checkpoint"),
    ("generate {w}/corrupt", "corrupt"),
    ("generate {w}/run extra", "unexpected arguments: extra"),
    ("generate", "the following arguments are required: run_dir"),
    # chat
    ("chat {w}/run --max-new-tokens 0", "argument --max-new-tokens: must be at least 1"),
    ("chat {w}/run --max-context -1", "argument --max-context: must be at least 0"),
    ("chat {w}/run --temperature -0.5", "argument --temperature: must be at least 0"),
    ("chat {w}/run --device cuda", "no CUDA device is available"),
    ("chat {w}/run --mode nosuch", "argument --mode: invalid choice"),
    ("chat {w}/missing", "is not a local directory"),
    ("chat {w}/empty", "neither an lmkiln run"),
    # serve
    ("serve {w}/run --port 70000", "argument --port: must be in [0, 65535], got 70000"),
    ("serve {w}/run --port -1", "argument --port: must be in [0, 65535], got -1"),
    ("serve {w}/run --max-batch 0", "argument --max-batch: must be at least 1"),
    ("serve {w}/run --max-queue 0", "argument --max-queue: must be at least 1"),
    ("serve {w}/run --max-tokens -1", "argument --max-tokens: must be at least 0"),
    ("serve {w}/run --max-body-bytes 0", "argument --max-body-bytes: must be at least 1"),
    ("serve {w}/run --host 0.0.0.0", "--api-key"),
    ("serve {w}/missing", "is not a local directory"),
    ("serve {w}/run extra", "unexpected arguments: extra"),
    # eval
    ("eval {w}/run --task perplexity --limit -3", "argument --limit: must be at least 0, got -3"),
    ("eval {w}/run --task perplexity --batch-size 0", "argument --batch-size: must be at least 1"),
    ("eval {w}/run --task memorization --candidates 0", "argument --candidates: must be at least 1"),
    ("eval {w}/run --task qa --max-new-tokens 0", "argument --max-new-tokens: must be at least 1"),
    ("eval {w}/run --task perplexity --device cuda", "no CUDA device is available"),
    ("eval {w}/run", "one of the arguments --harness --task is required"),
    ("eval {w}/run --task qa --harness echo_choice", "argument --harness: not allowed with argument --task"),
    ("eval {w}/run --task nosuch", "argument --task: invalid choice"),
    ("eval {w}/run --task qa --data {w}/missing.jsonl", "{w}/missing.jsonl"),
    ("eval {w}/missing --task perplexity --data {w}/sft.jsonl", "{w}/missing"),
    # export
    ("export {w}/run {w}/afile", "{w}/afile is a file, not a directory"),
    ("export {w}/run {w}/notarun", "{w}/notarun exists and is not empty"),
    ("export {w}/run {ro}/out", "Read-only file system"),
    ("export {w}/run {full}/out", "No space left on device"),
    ("export {w}/run out --dtype nosuch", "nosuch"),
    ("export {w}/run out --max-shard-size abc", "cannot read the size 'abc'"),
    ("export {w}/missing out", "{w}/missing"),
    ("export {w}/run out --to nosuch", "argument --to: invalid choice"),
    ("export {w}/run {w}/afile --to gguf", "{w}/afile exists; pass --force"),
    ("export {w}/run out extra", "unexpected arguments: extra"),
    # embed
    ("embed {w}/enc-pickle --data {w}/texts.jsonl --out e.npy", "never from pickles"),
    ("embed {w}/enc-corrupt --data {w}/texts.jsonl --out e.npy", "not a readable safetensors file"),
    ("embed {w}/enc-pickle --data {w}/texts.jsonl --out e.txt", "--out e.txt: write .npy or .safetensors"),
    ("embed {w}/enc-pickle --data {w}/texts.jsonl --out {w}", "write .npy or .safetensors"),
    ("embed {w}/enc-pickle --data {w}/texts.jsonl --out e.npy --batch-size 0", "--batch-size: must be"),
    ("embed {w}/enc-pickle --data {w}/texts.jsonl --out e.npy --max-length -1", "--max-length: must be"),
    ("embed {w}/enc-pickle --data {w}/missing.jsonl --out e.npy", "data file not found"),
    ("embed {w}/enc-pickle --data {w}/texts.jsonl --field body --out e.npy", "with --field NAME"),
    ("embed {w}/missing --data {w}/texts.jsonl --out e.npy", "is not a local directory"),
    ("embed {w}/empty --data {w}/texts.jsonl --out e.npy", "has no config.json"),
    ("embed {w}/enc-pickle --data {w}/texts.jsonl", "the following arguments are required: --out"),
    # eval-retrieval
    ("eval-retrieval {w}/enc-pickle --pairs {w}/pairs.jsonl --k 1,abc", "argument --k: comma-separated"),
    ("eval-retrieval {w}/enc-pickle --pairs {w}/pairs.jsonl --k 0,-1", "must be at least 1, got 0"),
    ("eval-retrieval {w}/enc-pickle --pairs {w}/pairs.jsonl --k ,", "give at least one cut-off"),
    ("eval-retrieval {w}/enc-pickle --pairs {w}/missing.jsonl", "data file not found"),
    ("eval-retrieval {w}/enc-pickle --pairs {w}/texts.jsonl", "with --query-field NAME"),
    ("eval-retrieval {w}/enc-pickle --pairs {w}/pairs.jsonl --positive-field doc", "--positive-field NAME"),
    ("eval-retrieval {w}/enc-pickle --pairs {w}/pairs.jsonl", "never from pickles"),
    ("eval-retrieval {w}/enc-corrupt --pairs {w}/pairs.jsonl", "not a readable safetensors file"),
    # plan, sweep, lr-find, report, runs
    ("plan --memory lots", "--memory 'lots': give a size such as 24GiB"),
    ("plan --time soon", "--time must be a positive duration such as 600, 90s, 10m or 1.5h, got 'soon'"),
    ("plan model.d_model=66 model.n_head=4", "must be divisible by model.n_head"),
    ("plan --recipe digits-mlp --memory 1GiB", "an MLP's plan takes neither (drop them)"),
    ("plan --recipe digits-mlp table.path={w}/missing.csv", "{w}/missing.csv"),
    ("plan task=encoder", "lmkiln plan covers task=pretrain, task=finetune and task=supervised"),
    ("sweep --space {w}/missing.yaml", "search space file not found: {w}/missing.yaml"),
    ("lr-find --steps 0", "argument --steps: must be at least 10, got 0"),
    ("sweep --space {w}/missing.yaml --trials 0", "argument --trials: must be at least 1, got 0"),
    ("lr-find --start 1 --end 0.1", "lr-find needs 0 < --start < --end"),
    ("report {w}/empty", "{w}/empty is not a run directory (no metrics.jsonl)"),
    ("runs {w}/missing", "runs directory not found: {w}/missing"),
    # listings and the top level
    ("recipes extra", "unexpected arguments: extra"),
    ("presets extra", "unexpected arguments: extra"),
    ("nosuch", "argument COMMAND: invalid choice: 'nosuch'"),
    ("train --recipe", "argument --recipe: expected one argument"),
]


def _bad_value(key: str, allowed: Range) -> str:
    """A value just outside the declared range, in the key's type."""
    hint = str(all_keys()[key])
    integer = "int" in hint
    if allowed.high is not None and allowed.low is not None and allowed.low_open:
        value = allowed.low  # the excluded lower end
    elif allowed.low is not None:
        value = allowed.low if allowed.low_open else allowed.low - 1
    else:
        value = allowed.high + 1
    text = str(int(value)) if integer else str(float(value))
    if "tuple" in hint:
        return f"[{text},{text}]"
    return f"[{text}]" if "list" in hint else text


def _task_of(key: str) -> str:
    section = key.split(".")[0]
    return {"table": "supervised", "mlp": "supervised", "loss": "supervised"}.get(
        section, {"encoder": "encoder", "finetune": "finetune"}.get(section, "pretrain")
    )


RANGE_CASES = [
    (f"train task={_task_of(key)} {key}={_bad_value(key, allowed)}", f"config key '{key}' must be")
    for key, allowed in FIELD_RANGES.items()
]


def _mount(path: Path, options: str) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shared inputs: a corpus, bad files, a tiny trained run, encoder directories, and small
    tmpfs mounts (read-only; full) where mounting is allowed."""
    w = tmp_path_factory.mktemp("world")
    os.environ["LMKILN_CACHE"] = str(tmp_path_factory.mktemp("worldcache"))
    synthetic_corpus(w / "corpus.txt")
    write(w / "broken.yaml", "optim: [lr: 1\n")
    write(w / "list.yaml", "- 1\n- 2\n")
    write(w / "not-parquet.parquet", "this is text, not parquet\n")
    write(w / "quote.csv", 'text\nfine row\nanother\n"an unterminated quote, and more\nlast row\n')
    write(w / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    write(w / "afile", "just a file\n")
    write(w / "notarun" / "keep.txt", "someone's file\n")
    (w / "empty").mkdir()
    write(w / "sft.jsonl", '{"instruction": "say hi", "output": "hi"}\n' * 8)
    write(w / "texts.jsonl", '{"text": "one"}\n{"text": "two"}\n')
    write(
        w / "prefs.jsonl", '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n'
    )
    write(w / "pairs.jsonl", '{"query": "q", "positive": "p"}\n')
    for name in ("enc-pickle", "enc-corrupt"):
        write(w / name / "config.json", json.dumps({"model_type": "bert"}))
    write(w / "enc-pickle" / "pytorch_model.bin", b"\x80\x04not really a pickle")
    write(w / "enc-corrupt" / "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")

    from lmkiln.tasks.pretrain import pretrain

    cfg = tiny_cfg(w, "train.max_steps=4", "train.eval_every=4", "train.save_every=4", "log.plot=false")
    pretrain(cfg)
    shutil.copytree(w / "run", w / "corrupt")
    weights = next((w / "corrupt" / "checkpoints").iterdir()) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    mounts = {"ro": w / "ro", "full": w / "full"}
    mounted = _mount(mounts["ro"], "size=64k,ro") and _mount(mounts["full"], "size=64k")
    if mounted:
        filler = mounts["full"] / "filler"
        try:  # fill it: any later write fails with ENOSPC
            with open(filler, "wb") as fh:
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()
        except OSError:
            pass
    yield {"w": w, "mounted": mounted, **mounts}
    for path in mounts.values():
        subprocess.run(["umount", str(path)], capture_output=True)


def _snapshot(*roots: Path) -> set[str]:
    return {str(p) for root in roots for p in root.rglob("*") if "ro" not in p.relative_to(root).parts[:1]}


@pytest.mark.parametrize("line, fragment", CASES + RANGE_CASES, ids=[c[0][:70] for c in CASES + RANGE_CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    line, fragment, world, tmp_path, monkeypatch, capsys
):
    if ("{ro}" in line or "{full}" in line) and not world["mounted"]:
        pytest.skip("mounting a small tmpfs is not permitted here (needs root)")
    values = {"w": world["w"], "ro": world["ro"], "full": world["full"]}
    argv = [part.format(**values) for part in shlex.split(line)]
    fragment = fragment.format(**values)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(world["w"], tmp_path)

    code = main(argv)

    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for part in fragment.split(" ... "):  # several fragments, in any order
        assert part in errors[0], (part, errors[0])
    assert _snapshot(world["w"], tmp_path) == before, "the failed command left files behind"


def test_every_subcommand_has_a_case():
    """Add a CASES row when you add a subcommand."""
    parser = build_parser()

    def commands(p, prefix=""):
        for action in p._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, child in action.choices.items():
                    nested = list(commands(child, f"{prefix}{name} "))
                    yield from nested or [f"{prefix}{name}"]

    covered = {line for line, _ in CASES}
    missing = [
        c for c in commands(parser) if not any(line.startswith(c + " ") or line == c for line in covered)
    ]
    assert not missing, f"subcommands without a bad-input case: {missing}"


def test_every_numeric_flag_declares_a_range():
    """A flag with plain type=int/float accepts -1 or nan silently: use cli._number(kind, low, high)."""

    def flags(p, prefix="lmkiln"):
        for action in p._actions:
            if isinstance(action.choices, dict):
                for name, child in action.choices.items():
                    yield from flags(child, f"{prefix} {name}")
            elif action.type in (int, float):
                yield f"{prefix} {action.option_strings}"

    assert list(flags(build_parser())) == []


def test_every_numeric_config_key_declares_a_range():
    """Add a FIELD_RANGES row (lmkiln/config/ranges.py) when you add an int or float key."""
    numeric = [k for k, hint in all_keys().items() if "int" in str(hint) or "float" in str(hint)]
    assert numeric, "no numeric keys found"
    assert sorted(set(numeric) - set(FIELD_RANGES)) == []
    assert sorted(set(FIELD_RANGES) - set(numeric)) == []  # no stale rows


def test_matrix_is_at_least_100_cases():
    assert len(CASES) + len(RANGE_CASES) >= 100


# --------------------------------------------------------------------------------------------
# Faults that need more than one command line


def test_disk_full_during_a_checkpoint_save_says_so_and_keeps_the_previous_one(world, tmp_path, capsys):
    """A real ENOSPC inside safetensors' writer: one line, no step_N.tmp, the earlier checkpoint
    intact and the run directory kept (it holds a checkpoint to resume from)."""
    disk = tmp_path / "disk"
    if not _mount(disk, "size=2m"):  # the first checkpoint (1.5 MB) fits, the second does not
        pytest.skip("mounting a small tmpfs is not permitted here (needs root)")
    try:
        tiny = TINY.format(w=world["w"]).replace("train.save_every=4", "train.save_every=2")
        code = main(["train", *tiny.split(), f"train.run_dir={disk}/run", "train.keep_last=5"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        assert "saving checkpoint" in err and "step_000004 failed (No space left on device)" in err, err
        root = disk / "run" / "checkpoints"
        assert sorted(p.name for p in root.iterdir()) == ["step_000002"]
        from lmkiln.runs.checkpoint import verify_checkpoint

        verify_checkpoint(root / "step_000002")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_truncated_cached_shard_is_prepared_again_not_reported_cached(world, tmp_path, capsys):
    args = ["data", "prepare", *TINY.format(w=world["w"]).split(), f"data.cache_dir={tmp_path}"]
    assert main(args) == 0
    assert main(args) == 0
    assert "uint16, cached)" in capsys.readouterr().out
    shard = next((tmp_path / "shards").glob("*/train_*.bin"))
    shard.write_bytes(shard.read_bytes()[:10])
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "uint16, cached)" not in captured.out and "MB/s" in captured.out, captured.out
    assert "damaged" in captured.err
    assert shard.stat().st_size > 10


def test_a_refused_resume_leaves_config_yaml_as_it_was(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["w"] / "run", run)
    saved = (run / "config.yaml").read_text()
    tiny = TINY.format(w=world["w"]).split()
    code = main(["train", *tiny, f"train.run_dir={run}", "model.n_layer=3", "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert (run / "config.yaml").read_text() == saved


def test_a_closed_pipe_is_quiet(tmp_path):
    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        f"{shlex.quote(sys.executable)} -m lmkiln recipes | head -c 1",
        shell=True,
        capture_output=True,
        env=env,
    )
    assert done.stdout and done.stderr == b"", done.stderr


def test_debug_shows_the_traceback(world, capsys):
    with pytest.raises(Exception, match="optim.lr"):
        main(["--debug", "train", "optim.lr=-1"])
