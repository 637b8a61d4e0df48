"""Shared by the chat and serve tests: a tiny LoRA chat run that answers and stops, and a live server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import ROOT
from finetune_helpers import ft_config, make_base, word_lists, write_jsonl

from lmkiln.tasks import run_task

_RUNS: dict[str, Path] = {}


def chat_run(root: Path) -> Path:
    """A LoRA fine-tune (format chat) of a random tiny base that learned to answer "ok" and end its
    turn with <|im_end|>; context 256 tokens. Built once per test session (about 60 steps)."""
    if "chat" not in _RUNS:
        make_base(root / "base", block_size=256)
        rows = [
            {"messages": [{"role": "user", "content": " ".join(w)}, {"role": "assistant", "content": "ok"}]}
            for w in word_lists(64)
        ]
        write_jsonl(root / "chat.jsonl", rows)
        cfg = ft_config(
            root / "base",
            root / "chat.jsonl",
            root / "chat-run",
            "finetune.format=chat",
            "finetune.method=lora",
            "finetune.lora_r=16",
            "finetune.export_merged=false",
            "train.max_steps=60",
            "train.batch_size=16",
            "train.eval_every=1000",
            "train.save_every=1000",
            "optim.lr=4e-2",
        )
        run_task(cfg)
        _RUNS["chat"] = root / "chat-run"
    return _RUNS["chat"]


def lmkiln_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmkiln", *args]


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}


def start_server(*args: str, log: Path, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """`lmkiln serve ARGS --port 0` in a subprocess writing to `log`; returns it and its URL once it listens."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            lmkiln_command("serve", *args, "--port", "0"), env=cli_env(), stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r" at (http://\S+)", log.read_text())
        if found:
            return proc, found.group(1)
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("lmkiln serve did not start:\n" + log.read_text())


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def request(
    url: str, method: str = "GET", body: bytes | dict | None = None, key: str | None = None
) -> tuple[int, dict]:
    """(status, JSON body) of a plain HTTP request; error statuses are returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
