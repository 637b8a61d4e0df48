"""Several processes on CPU (gloo) launched by torchrun: DDP, FSDP2, DCP, elastic restart, timeouts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file
from test_train import synthetic_corpus

from lmkiln.config import from_dict
from lmkiln.model.transformer import Transformer
from lmkiln.runs import checkpoint as ckpt
from lmkiln.runs.dcp import consolidate

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ENV = {"OMP_NUM_THREADS": "1"}


def args(tmp: Path, run: str, *extra: str) -> list[str]:
    corpus = synthetic_corpus(tmp / "corpus.txt")
    return [
        f"data.corpus={corpus}",
        "tokenizer.vocab_size=300",
        "model.preset=tiny",
        "model.dropout=0",
        "train.seq_len=32",
        "train.batch_size=8",
        "train.max_steps=12",
        "train.save_every=4",
        "train.eval_every=6",
        "train.log_every=1",
        "log.progress=off",
        "log.plot=false",
        "train.sample_tokens=0",
        "schedule.warmup_steps=2",
        f"train.run_dir={tmp / run}",
        *extra,
    ]


def torchrun(*argv: str, restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        f"--max-restarts={restarts}",
        *argv,
    ]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run / "checkpoints") / "model.safetensors"))


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run, and the same global batch as DDP and FSDP2 on two processes."""
    tmp = tmp_path_factory.mktemp("dist")
    cache = {"LMKILN_CACHE": str(tmp / "cache"), **ENV}
    single = run_cli("train", *args(tmp, "single"), env=cache, check=True)
    ddp = run_cli(
        "train", "--nproc", "2", *args(tmp, "ddp", "train.micro_batch_size=4"), env=cache, check=True
    )
    fsdp = run_cli(
        "train",
        "--nproc",
        "2",
        *args(tmp, "fsdp", "train.micro_batch_size=4", "dist.strategy=fsdp"),
        env=cache,
        check=True,
    )
    return tmp, cache, single, ddp, fsdp


def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(runs):
    tmp, _, single, ddp, _ = runs
    assert "2 processes" in ddp.stderr and "torch.distributed.run" in ddp.stderr
    assert_close(weights(tmp / "ddp"), weights(tmp / "single"), atol=1e-5)
    # only rank 0 writes: one metrics line per logged step, one set of checkpoints
    lines = [json.loads(x) for x in (tmp / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["event"] == "train"] == list(range(1, 13))


def test_fsdp2_matches_ddp_and_its_shards_load_at_world_size_one(runs):
    tmp = runs[0]
    final = ckpt.latest_checkpoint(tmp / "fsdp" / "checkpoints")
    manifest = ckpt.verify_checkpoint(final)
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng_rank1.safetensors"} <= set(
        manifest["files"]
    )
    assert_close(weights(tmp / "fsdp"), weights(tmp / "ddp"), atol=1e-5)
    # DCP written by two ranks, read back in one process: the same full state as the consolidated file
    saved = ckpt.read_checkpoint(final)
    model = Transformer(from_dict(saved.trainer["config"], "saved").model)
    full = consolidate(saved.sharded, model)
    assert all(torch.equal(full[k], saved.model[k]) for k in saved.model)


def test_fsdp_run_resumes_at_a_different_world_size_only_when_forced(runs):
    tmp, cache, *_ = runs
    base = args(tmp, "fsdp", "train.micro_batch_size=4", "dist.strategy=fsdp", "train.max_steps=16")
    refused = run_cli("train", *base, "--resume", "auto", env=cache)
    assert refused.returncode == 2 and "world_size: 2 → 1" in refused.stderr
    resumed = run_cli("train", *base, "--resume", "auto", "--force", env=cache, check=True)
    assert "resumed from" in resumed.stderr and "trained 16 steps" in resumed.stdout


def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_ends_exactly(runs):
    tmp, cache, *_ = runs
    run = tmp / "elastic"
    env = {**os.environ, **cache, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        torchrun("-m", "lmkiln", "train", *args(tmp, "elastic", "train.micro_batch_size=4"), restarts=1),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = None
    deadline = time.time() + 240
    while killed is None and time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and any('"step": 6' in line for line in metrics.read_text().splitlines()):
            children = subprocess.run(
                ["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True
            ).stdout.split()
            killed = int(children[-1])
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    out, err = proc.communicate(timeout=300)
    assert killed is not None, err
    assert proc.returncode == 0, err
    assert "resuming from the newest complete checkpoint" in err
    assert_close(weights(run), weights(tmp / "ddp"), atol=0)  # bit-identical to the uninterrupted run


def test_a_hung_collective_fails_with_an_error_naming_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **ENV}
    start = time.perf_counter()
    proc = subprocess.run(
        torchrun(str(ROOT / "tests" / "dist_driver.py"), "hang", "5"),
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0
    assert "collective 'test gradient sum' failed on rank 0 of 2" in proc.stdout + proc.stderr
    assert time.perf_counter() - start < 120


def test_a_nonfinite_step_on_one_rank_is_skipped_by_every_rank(runs):
    tmp, cache, *_ = runs
    env = {**os.environ, **cache, "PYTHONPATH": str(ROOT / "src")}
    out = tmp / "nan"
    proc = subprocess.run(
        torchrun(
            str(ROOT / "tests" / "dist_driver.py"),
            "nan",
            str(out),
            "--",
            *args(tmp, "nanrun", "train.micro_batch_size=4", "train.nonfinite=skip"),
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    assert ranks[0]["hash"] == ranks[1]["hash"]  # replicas stayed identical
    assert ranks[0]["nonfinite"] == ranks[1]["nonfinite"] == 1 and ranks[0]["step"] == 12


def test_the_default_recipe_runs_on_two_processes_as_shipped(tmp_path):
    """`lmkiln train --nproc 2` with the default recipe: an unset train.micro_batch_size splits the
    global batch (16) over the processes (8 each) instead of refusing to start."""
    run = tmp_path / "default"
    proc = run_cli(
        "train",
        "--nproc",
        "2",
        "train.max_steps=2",
        "train.sample_tokens=0",
        "log.plot=false",
        "data.corpus=builtin:pydoc",  # the shipped batch settings; the smaller corpus prepares faster
        f"train.run_dir={run}",
        env=ENV,
        check=True,
    )
    assert "2 steps × 16 sequences × 128 tokens" in proc.stderr and "2 processes" in proc.stderr
    saved = json.loads((run / "checkpoints" / "step_000002" / "trainer.json").read_text())
    assert saved["fingerprint"]["train.micro_batch_size"] == 8 and saved["world_size"] == 2
    assert saved["config"]["train"]["micro_batch_size"] == 0  # the user's setting, not a rewrite
