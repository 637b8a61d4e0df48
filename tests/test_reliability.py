"""Fault injection: crashes inside saves, corrupted files, config drift, NaNs, pickle payloads,
full disks, kills and signals. Every case must end in an exact resume or one clear error."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, write
from safetensors.torch import load_file
from test_train import synthetic_corpus, tiny_cfg, weights_hash

from lmkiln.data.shards import TokenShards
from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.runs import checkpoint as ckpt
from lmkiln.tasks.pretrain import pretrain
from lmkiln.train.nonfinite import NonFiniteError
from lmkiln.train.objectives import LanguageModelLoss

STEPS = 20


def cfg_for(tmp_path, *extra):
    return tiny_cfg(
        tmp_path,
        f"train.max_steps={STEPS}",
        "train.save_every=5",
        "train.eval_every=10",
        "model.dropout=0.1",
        *extra,
    )


@pytest.fixture(scope="module")
def reference_hash(tmp_path_factory):
    """Final weights of an uninterrupted run (dropout on, so RNG restore matters)."""
    os.environ["LMKILN_CACHE"] = str(tmp_path_factory.mktemp("refcache"))
    return weights_hash(pretrain(cfg_for(tmp_path_factory.mktemp("reference"))).model)


def run_dir(tmp_path):
    return tmp_path / "run"


def steps_on_disk(tmp_path):
    return [step for step, _ in ckpt.list_checkpoints(run_dir(tmp_path) / "checkpoints")]


# --------------------------------------------------------------------------------------------
# Crash inside a save


@pytest.mark.parametrize("phase", ["after_model", "after_optimizer", "before_manifest", "before_rename"])
def test_crash_inside_each_save_phase_resumes_from_the_last_complete_checkpoint(
    tmp_path, monkeypatch, phase, reference_hash
):
    seen = {"n": 0}

    def crash(reached):
        if reached == phase:
            seen["n"] += 1
            if seen["n"] == 3:  # the save of step 15
                raise SystemExit("power cut")

    monkeypatch.setattr(ckpt, "_reached", crash)
    with pytest.raises(SystemExit):
        pretrain(cfg_for(tmp_path))
    assert steps_on_disk(tmp_path) == [5, 10]
    partials = [p.name for p in (run_dir(tmp_path) / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert partials == ["step_000015.tmp"]  # what a killed process leaves behind
    monkeypatch.setattr(ckpt, "_reached", lambda reached: None)
    resumed = pretrain(cfg_for(tmp_path), resume="auto")
    assert weights_hash(resumed.model) == reference_hash
    assert not [p for p in (run_dir(tmp_path) / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_failed_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    real = ckpt._write_tensors
    calls = {"n": 0}

    def disk_full(path, tensors):
        calls["n"] += 1
        if calls["n"] == 5:  # the optimizer file of the second save
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors)

    monkeypatch.setattr(ckpt, "_write_tensors", disk_full)
    with pytest.raises(
        LmkilnError,
        match=r"saving checkpoint .*step_000010 failed \(No space left on device\); "
        r"the previous checkpoints are intact",
    ):
        pretrain(cfg_for(tmp_path))
    root = run_dir(tmp_path) / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_000005"]
    ckpt.verify_checkpoint(root / "step_000005")


# --------------------------------------------------------------------------------------------
# Corruption


CORRUPTIONS = {
    "empty": lambda data: b"",
    "one byte": lambda data: data[:1],
    "half": lambda data: data[: len(data) // 2],
    "last byte missing": lambda data: data[:-1],
    "bit flip": lambda data: (
        data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1 :]
    ),
}


def test_every_truncation_and_bit_flip_is_detected_before_loading(tmp_path):
    pretrain(cfg_for(tmp_path, "train.max_steps=10"))
    good = run_dir(tmp_path) / "checkpoints" / "step_000010"
    detected = injected = 0
    for file in sorted(p.name for p in good.iterdir()):
        for name, corrupt in CORRUPTIONS.items():
            bad = tmp_path / "bad" / f"{file}-{name}".replace(" ", "_") / "step_000010"
            shutil.copytree(good, bad)
            (bad / file).write_bytes(corrupt((good / file).read_bytes()))
            injected += 1
            with pytest.raises(ckpt.CorruptCheckpoint) as err:
                ckpt.read_checkpoint(bad)
            detected += 1
            assert file in str(err.value) or "manifest" in str(err.value)
    assert detected == injected == 5 * len(list(good.iterdir()))


def test_resume_auto_falls_back_to_the_previous_checkpoint_when_the_newest_is_corrupt(
    tmp_path, caplog, reference_hash
):
    pretrain(cfg_for(tmp_path, "train.max_steps=15", "schedule.name=constant"))
    newest = run_dir(tmp_path) / "checkpoints" / "step_000015" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:-1])
    with caplog.at_level("WARNING"):
        path = ckpt.latest_checkpoint(run_dir(tmp_path) / "checkpoints")
    assert path.name == "step_000010"
    assert "skipping corrupt checkpoint" in caplog.text and "optimizer.safetensors" in caplog.text


def test_manifest_paths_cannot_escape_the_checkpoint(tmp_path):
    pretrain(cfg_for(tmp_path, "train.max_steps=5"))
    path = run_dir(tmp_path) / "checkpoints" / "step_000005"
    manifest = json.loads((path / "manifest.json").read_text())
    outside = write(tmp_path / "secret.json", "{}")
    for name in ("../../secret.json", str(outside), "sub/../../x"):
        evil = dict(manifest, files={**manifest["files"], name: {"bytes": 2, "sha256": "0"}})
        (path / "manifest.json").write_text(json.dumps(evil))
        with pytest.raises(ckpt.CorruptCheckpoint, match="outside the checkpoint"):
            ckpt.verify_checkpoint(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "trainer.json").unlink()
    (path / "trainer.json").symlink_to(outside)
    with pytest.raises(ckpt.CorruptCheckpoint, match="symbolic links"):
        ckpt.verify_checkpoint(path)


class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_in_any_loadable_file_never_runs(tmp_path):
    pretrain(cfg_for(tmp_path, "train.max_steps=5"))
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(Payload(marker))
    checkpoint = run_dir(tmp_path) / "checkpoints" / "step_000005"
    for file in sorted(p.name for p in checkpoint.iterdir() if p.name != "manifest.json"):
        victim = tmp_path / "victims" / file / "step_000005"
        shutil.copytree(checkpoint, victim)
        (victim / file).write_bytes(payload)
        manifest = json.loads((victim / "manifest.json").read_text())  # a careful attacker fixes the hashes
        manifest["files"][file] = {"bytes": len(payload), "sha256": ckpt._sha256(victim / file)}
        (victim / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(LmkilnError):
            ckpt.read_checkpoint(victim)
    tokenizer_dir = run_dir(tmp_path) / "tokenizer"
    for file in ("tokenizer.json", "tokenizer_config.json"):
        victim = tmp_path / "tok-victims" / file
        shutil.copytree(tokenizer_dir, victim)
        (victim / file).write_bytes(payload)
        with pytest.raises(LmkilnError):
            Tokenizer.load(victim)
    shard_dir = next(p for p in (Path(os.environ["LMKILN_CACHE"]) / "shards").iterdir() if p.is_dir())
    victim = tmp_path / "shard-victim"
    shutil.copytree(shard_dir, victim)
    (victim / "manifest.json").write_bytes(payload)
    with pytest.raises(LmkilnError):
        TokenShards(victim)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Drift


@pytest.mark.parametrize(
    "change, shown",
    [
        ("train.batch_size=4", "train.batch_size: 8 → 4"),
        ("train.seq_len=16", "train.seq_len: 32 → 16"),
        ("train.micro_batch_size=4", "train.micro_batch_size: 8 → 4"),
        ("tokenizer.vocab_size=280", "tokenizer:"),
        ("data.val_fraction=0.2", "data:"),
        ("model.n_layer=1", "model.n_layer: 2 → 1"),
    ],
)
def test_resuming_with_changed_settings_is_refused_listing_old_and_new(tmp_path, change, shown):
    pretrain(cfg_for(tmp_path, "train.max_steps=5"))
    with pytest.raises(LmkilnError, match="refusing to resume") as err:
        pretrain(cfg_for(tmp_path, change), resume="auto")
    assert shown in str(err.value) and "--force" in str(err.value)


def test_force_downgrades_drift_to_a_warning(tmp_path, caplog):
    pretrain(cfg_for(tmp_path, "train.max_steps=5"))
    with caplog.at_level("WARNING"):
        result = pretrain(
            cfg_for(tmp_path, "train.batch_size=4", "train.max_steps=8"), resume="auto", force=True
        )
    assert result.fit.state.step == 8
    assert "resuming with changed settings" in caplog.text


def test_missing_resume_target_lists_the_available_checkpoints(tmp_path):
    pretrain(cfg_for(tmp_path, "train.max_steps=10"))
    with pytest.raises(LmkilnError, match=r"checkpoint not found: step_000999 .*step_000005, step_000010"):
        pretrain(cfg_for(tmp_path), resume="step_000999")
    assert pretrain(cfg_for(tmp_path), resume="step_000005").fit.state.step == STEPS


# --------------------------------------------------------------------------------------------
# Non-finite losses


def poison_from(monkeypatch, first_bad_call: int, last_bad_call: int = 10**9):
    """Make the training loss NaN on calls first..last; remember the model the loop trains."""
    original = LanguageModelLoss.__call__
    seen = {"n": 0, "model": None}

    def call(self, model, batch):
        loss = original(self, model, batch)
        if not model.training:  # evaluation calls the loss too
            return loss
        seen["n"] += 1
        seen["model"] = model
        return loss * float("nan") if first_bad_call <= seen["n"] <= last_bad_call else loss

    monkeypatch.setattr(LanguageModelLoss, "__call__", call)
    return seen


def test_nan_stops_with_the_step_named_and_the_update_not_applied(tmp_path, monkeypatch):
    seen = poison_from(monkeypatch, 7)
    with pytest.raises(
        NonFiniteError, match=r"non-finite loss or gradient at step 7 \(loss nan.*micro-batches 6\.\.6"
    ):
        pretrain(cfg_for(tmp_path, "train.save_every=1"))
    assert steps_on_disk(tmp_path)[-1] == 6  # no checkpoint after the bad step
    saved = load_file(str(run_dir(tmp_path) / "checkpoints" / "step_000006" / "model.safetensors"))
    live = seen["model"].state_dict()
    assert all(torch.equal(live[k], v) for k, v in saved.items())  # weights are those of step 6


def test_skip_policy_counts_nonfinite_steps_and_gives_up_after_a_streak(tmp_path, monkeypatch):
    poison_from(monkeypatch, 4, 5)
    result = pretrain(cfg_for(tmp_path, "train.nonfinite=skip"))
    assert result.fit.state.step == STEPS and result.fit.state.nonfinite_steps == 2
    lines = [json.loads(x) for x in (run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    bad = [x for x in lines if x["event"] == "nonfinite"]
    assert len(bad) == 2 and all(x["loss"] != x["loss"] for x in bad)  # logged as NaN, not hidden
    assert [x for x in lines if x["event"] == "train"][-1]["nonfinite_steps"] == 2

    poison_from(monkeypatch, 1)
    with pytest.raises(NonFiniteError, match="4 consecutive non-finite steps"):
        pretrain(cfg_for(tmp_path / "again", "train.nonfinite=skip", "train.max_nonfinite=3"))


def test_rollback_policy_reloads_the_last_checkpoint_and_continues(tmp_path, monkeypatch):
    poison_from(monkeypatch, 13, 13)
    result = pretrain(cfg_for(tmp_path, "train.nonfinite=rollback"))
    assert result.fit.state.step == STEPS and result.fit.state.rollbacks == 1
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


# --------------------------------------------------------------------------------------------
# Real processes: SIGKILL anywhere, SIGTERM


def cli_args(tmp_path: Path, run: str) -> list[str]:
    corpus = synthetic_corpus(tmp_path / "corpus.txt")
    return [
        f"data.corpus={corpus}",
        "tokenizer.vocab_size=300",
        "model.preset=tiny",
        "model.d_model=128",
        "model.dropout=0.1",
        "train.seq_len=64",
        "train.batch_size=16",
        "train.max_steps=60",
        "train.save_every=4",
        "train.eval_every=30",
        "train.log_every=1",
        "log.progress=off",
        "log.plot=false",
        "train.sample_tokens=0",
        f"train.run_dir={tmp_path / run}",
    ]


def spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lmkiln", "train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def logged_step(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x.endswith("}")]
    return max(steps, default=0)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run / "checkpoints") / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_bit_exact(tmp_path):
    reference = run_cli("train", *cli_args(tmp_path, "reference"), env={"OMP_NUM_THREADS": "1"}, check=True)
    assert reference.returncode == 0
    expected = final_weights(tmp_path / "reference")
    rng = random.Random(1234)
    exact = 0
    kills = [rng.randint(3, 55) for _ in range(3)]
    for trial, kill_at in enumerate(kills):
        run = tmp_path / f"killed{trial}"
        proc = spawn(cli_args(tmp_path, run.name))
        while logged_step(run) < kill_at and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.random() * 0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"run finished before the kill at step {kill_at}"
        resumed = run_cli(
            "train",
            *cli_args(tmp_path, run.name),
            "--resume",
            "auto",
            env={"OMP_NUM_THREADS": "1"},
            check=True,
        )
        assert "resumed from" in resumed.stderr or "starting from scratch" in resumed.stderr
        got = final_weights(run)
        exact += all(torch.equal(got[k], expected[k]) for k in expected)
    assert exact == len(kills), f"bit-exact after {exact}/{len(kills)} kills at steps {kills}"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes_exactly(tmp_path):
    run_cli("train", *cli_args(tmp_path, "reference"), env={"OMP_NUM_THREADS": "1"}, check=True)
    run = tmp_path / "preempted"
    proc = spawn(cli_args(tmp_path, run.name))
    while logged_step(run) < 10 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert (
        "Traceback" not in stderr and "interrupted by SIGTERM at step" in stderr and "--resume auto" in stderr
    )
    stopped = int(stderr.split("interrupted by SIGTERM at step ")[1].split(";")[0])
    assert ckpt.list_checkpoints(run / "checkpoints")[-1][0] == stopped  # saved where it stopped
    run_cli(
        "train", *cli_args(tmp_path, run.name), "--resume", "auto", env={"OMP_NUM_THREADS": "1"}, check=True
    )
    expected, got = final_weights(tmp_path / "reference"), final_weights(run)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_second_ctrl_c_exits_at_once(tmp_path, monkeypatch):
    from lmkiln.train.loop import TrainLoop

    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    loop = TrainLoop.__new__(TrainLoop)
    loop.signum = None

    class Quiet:
        def message(self, text):
            pass

    loop.log = Quiet()
    with loop._interrupt_handlers():
        os.kill(os.getpid(), signal.SIGINT)
        assert loop.signum == signal.SIGINT and exits == []
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [130]
