"""Peak resident memory of each candidate, each in a fresh process so that nothing is shared.

`python -m benchmarks.memory CANDIDATE SHAPE STEPS [OVERRIDES...]` trains CANDIDATE (lmkiln,
transformers or plain_pytorch) for STEPS steps and prints one JSON line:

- peak_rss_mb: the process's peak resident set (VmHWM of /proc/self/status) — interpreter, torch,
  the candidate's imports (transformers' for the Trainer), model, optimizer, activations. Not
  getrusage's ru_maxrss: Linux carries that across fork and exec, so a worker started by the
  (large) benchmark process would report its parent's peak;
- imports_rss_mb: resident memory after the imports, before the model is built;
- training_mb: peak minus imports, what training itself added.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's own peak resident memory (reset by exec, unlike ru_maxrss)."""
    peak = _status_mb("VmHWM")
    return peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(candidate: str, shape_name: str, steps: int, overrides: list[str]) -> dict:
    import torch

    from benchmarks import peers
    from benchmarks.common import SHAPES, synthetic_tokens

    if candidate == "transformers":  # what a Trainer user imports (transformers loads lazily)
        from transformers import GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: F401
    else:
        import lmkiln.tasks.pretrain  # noqa: F401
    shape = SHAPES[shape_name]
    tokens = synthetic_tokens(shape.vocab_size)
    imports = current_rss_mb()
    device = torch.device("cpu")
    if candidate == "lmkiln":
        peers.lmkiln_run(shape, steps, tokens, device, overrides)
    elif candidate == "transformers":
        peers.hf_trainer_run(shape, steps, tokens, device)
    else:
        peers.plain_run(shape, steps, tokens, device)
    peak = peak_rss_mb()
    return {
        "peak_rss_mb": round(peak, 1),
        "imports_rss_mb": round(imports, 1),
        "training_mb": round(peak - imports, 1),
    }


def measure(candidate: str, shape_name: str, steps: int, overrides: list[str] = (), threads: int = 0) -> dict:
    """Run the worker in a subprocess and return its JSON line."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", candidate, shape_name, str(steps), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {candidate} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    import logging

    logging.disable(logging.WARNING)
    candidate, shape_name, steps, *overrides = sys.argv[1:]
    print(json.dumps(worker(candidate, shape_name, int(steps), overrides)), flush=True)


if __name__ == "__main__":
    main()
