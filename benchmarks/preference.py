"""Preference tuning on a synthetic task: does DPO (or ORPO) move a model to the chosen style?

A tiny random model is first fine-tuned (SFT) on prompts "red cat means" answered half the time
by repeating the words (" red cat") and half the time by reversing them (" cat red"), so it
knows both styles and prefers neither. Preference tuning then sees pairs whose chosen reply
repeats the words and whose rejected reply reverses them. Printed as JSON, for DPO (and ORPO) on
held-out prompts: preference accuracy before/after (chosen reply more likely, relative to the
reference for DPO) and the share of greedy replies in the chosen style (starting with the
prompt's first word) before/after.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/preference.py [WORK_DIR]
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmkiln.config import load_config, to_dict
from lmkiln.data.formats import Record
from lmkiln.data.task_examples import ExampleEncoder
from lmkiln.data.tokenizer import Tokenizer, train_bpe
from lmkiln.eval.runner import generate_batched
from lmkiln.model.transformer import Transformer
from lmkiln.runs.checkpoint import CheckpointData, write_checkpoint
from lmkiln.runs.load import load_run
from lmkiln.runs.tensors import model_tensors
from lmkiln.tasks.finetune import finetune
from lmkiln.train.state import TrainState

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
QUIET = ("log.progress=off", "log.plot=false", "train.sample_tokens=0", "finetune.eval_samples=0")


def word_lists(n: int, seed: int) -> list[list[str]]:
    """Word lists whose partner and reversed replies differ (so every pair has a preference)."""
    rng = random.Random(seed)
    found: list[list[str]] = []
    while len(found) < n:
        words = rng.sample(WORDS, 2)
        if words != words[::-1]:
            found.append(words)
    return found


def prompt(words: list[str]) -> str:
    return " ".join(words) + " means"


def chosen(words: list[str]) -> str:
    return " " + " ".join(words)


def rejected(words: list[str]) -> str:
    return " " + " ".join(reversed(words))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def random_base(directory: Path, seed: int = 0) -> Path:
    """A run directory holding a random tiny model and a BPE over the task's words."""
    texts = [prompt(w) + chosen(w) + rejected(w) for w in word_lists(300, seed)]
    tokenizer = train_bpe(iter(texts), 300)
    cfg = load_config(
        overrides=[
            "model.preset=tiny",
            "model.d_model=48",
            f"model.vocab_size={tokenizer.vocab_size}",
            "model.block_size=64",
            "train.seq_len=64",
        ]
    )
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    tokenizer.save(directory / "tokenizer")
    trainer = {"format": 1, "state": TrainState(step=1).to_dict(), "config": to_dict(cfg)}
    write_checkpoint(directory / "checkpoints", 1, CheckpointData(model_tensors(model), {}, {}, trainer))
    return directory


def sft_base(work: Path, examples: int = 400, steps: int = 500, seed: int = 0) -> Path:
    """The reference model: fine-tuned on both reply styles, half each (the SFT stage before DPO)."""
    rng = random.Random(seed + 1)
    rows = [
        {"instruction": prompt(w), "output": chosen(w) if rng.random() < 0.5 else rejected(w)}
        for w in word_lists(examples, seed + 2)
    ]
    data = write_jsonl(work / "sft.jsonl", rows)
    cfg = load_config(
        overrides=[
            "task=finetune",
            f"finetune.base={random_base(work / 'random', seed)}",
            f"finetune.data={data}",
            "finetune.prompt={{ instruction }}",
            f"train.run_dir={work / 'sft'}",
            *("train.batch_size=16", f"train.max_steps={steps}", "train.eval_every=1000"),
            *("schedule.warmup_steps=10", "optim.lr=3e-3", *QUIET),
        ]
    )
    return finetune(cfg, overwrite=True).run_dir


def preference_files(work: Path, train: int, heldout: int, seed: int = 0) -> tuple[Path, Path]:
    rows = [
        {"prompt": prompt(w), "chosen": chosen(w), "rejected": rejected(w)}
        for w in word_lists(train, seed + 3)
    ]
    val = [
        {"prompt": prompt(w), "chosen": chosen(w), "rejected": rejected(w)}
        for w in word_lists(heldout, seed + 4)
    ]
    return write_jsonl(work / "pairs.jsonl", rows), write_jsonl(work / "heldout.jsonl", val)


def chosen_style_rate(model: torch.nn.Module, tokenizer: Tokenizer, heldout: Path) -> float:
    """Share of held-out prompts whose greedy reply takes the chosen style: it starts by repeating
    the prompt's first word (the rejected style starts with its last word)."""
    rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    cfg = load_config(overrides=["task=finetune", "finetune.format=preference"]).finetune
    encoder = ExampleEncoder(tokenizer, cfg, 64)
    prompts = [encoder.prompt_ids(Record("", {"prompt": r["prompt"]}), 60) for r in rows]
    was_training = model.training
    model.eval()
    outputs, _ = generate_batched(model, prompts, 8, 32, tokenizer.eos_id, tokenizer.eos_id)
    model.train(was_training)
    replies = [tokenizer.decode(ids).split() for ids in outputs]
    return sum(reply[:1] == r["prompt"].split()[:1] for reply, r in zip(replies, rows)) / len(rows)


def preference_run(base: Path, pairs: Path, heldout: Path, run_dir: Path, *overrides: str):
    cfg = load_config(
        overrides=[
            "task=finetune",
            "finetune.format=preference",
            f"finetune.base={base}",
            f"finetune.data={pairs}",
            f"finetune.val_data={heldout}",
            f"train.run_dir={run_dir}",
            *("train.batch_size=16", "train.eval_every=20", "train.save_every=1000", "train.log_every=10"),
            *("train.monitor=val_accuracy", "train.monitor_mode=max", "schedule.warmup_steps=5", *QUIET),
            *overrides,
        ]
    )
    return finetune(cfg, overwrite=True)


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="lmkiln-pref-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = sft_base(work)
    sft_seconds = time.perf_counter() - started
    pairs, heldout = preference_files(work, 400, 100)
    results: dict = {"sft_seconds": round(sft_seconds, 1), "heldout_pairs": 100, "objectives": {}}
    steps = "train.max_steps=100"
    objectives = {
        "dpo_full": ("finetune.objective=dpo", "finetune.beta=0.1", "optim.lr=3e-4", steps),
        "dpo_lora": ("finetune.objective=dpo", "finetune.method=lora", "optim.lr=3e-3", steps),
        "orpo_full": ("finetune.objective=orpo", "finetune.beta=0.5", "optim.lr=1e-3", steps),
    }
    loaded = load_run(base)
    before_rate = chosen_style_rate(loaded.model, loaded.tokenizer, heldout)
    for name, flags in objectives.items():
        started = time.perf_counter()
        result = preference_run(base, pairs, heldout, work / name, *flags)
        wall = time.perf_counter() - started
        results["objectives"][name] = {
            "steps": result.fit.state.step,
            "wall_seconds": round(wall, 1),
            "heldout_accuracy_before": round(result.fit.first_eval["val_accuracy"], 3),
            "heldout_accuracy_after": round(result.fit.last_eval["val_accuracy"], 3),
            "loss_before": round(result.fit.first_eval["val_loss"], 4),
            "loss_after": round(result.fit.last_eval["val_loss"], 4),
            "chosen_style_before": round(before_rate, 3),
            "chosen_style_after": round(chosen_style_rate(result.model, result.tokenizer, heldout), 3),
        }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
