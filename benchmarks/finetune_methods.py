"""Fine-tuning methods side by side on a synthetic task, through the `lmkiln` command line.

A tiny base (2 layers, width 64) is pretrained on sentences that pair word lists with their
"partner" words ("red cat means green dog."). Fine-tuning teaches a new prompt format
("red cat =" → "green dog" + EOS) with each method; `lmkiln eval` scores 200 held-out prompts.
Prints one JSON object: per method the trainable parameters, wall time, exact match before and
after, and the share of generations that stopped at EOS.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/finetune_methods.py [WORK_DIR]
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
PARTNER = dict(zip(WORDS, ["green", "red", "tree", "dog", "cat", "moon", "sun", "blue"]))
PROMPT = "finetune.prompt={{ input }} ="
METHODS = {  # LoRA trains far fewer weights and wants a larger learning rate
    "full": ["--method", "full", "optim.lr=3e-3"],
    "freeze": ["--method", "freeze", "finetune.freeze_embeddings=true", "optim.lr=3e-3"],
    "lora": ["--method", "lora", "finetune.lora_r=8", "finetune.lora_alpha=16", "optim.lr=1e-2"],
}


def word_lists(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(2, 4))] for _ in range(n)]


def rows(n: int, seed: int) -> str:
    return "".join(
        json.dumps(
            {
                "instruction": "Swap each word for its partner.",
                "input": " ".join(w),
                "output": " ".join(PARTNER[x] for x in w),
            }
        )
        + "\n"
        for w in word_lists(n, seed)
    )


def lmkiln(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "lmkiln", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"lmkiln {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="lmkiln-ft-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"{' '.join(w)} means {' '.join(PARTNER[x] for x in w)}." for w in word_lists(800, 1))
    )
    (work / "task.jsonl").write_text(rows(2000, 2))
    (work / "heldout.jsonl").write_text(rows(200, 3))
    base = work / "base"
    started = time.perf_counter()
    lmkiln(
        "train",
        f"data.corpus={corpus}",
        "tokenizer.vocab_size=300",
        *(
            "model.n_layer=2",
            "model.n_head=4",
            "model.n_kv_head=2",
            "model.d_model=64",
            "model.block_size=128",
        ),
        *("model.dropout=0", "train.seq_len=64", "train.batch_size=16", "train.max_steps=500"),
        *("train.eval_every=250", "train.save_every=500", "schedule.warmup_steps=10", "optim.lr=3e-3"),
        *("log.progress=off", "log.plot=false", "train.sample_tokens=0", f"train.run_dir={base}"),
    )
    pretrain_seconds = time.perf_counter() - started
    heldout = str(work / "heldout.jsonl")
    lmkiln(
        "eval",
        str(base),
        "--data",
        heldout,
        "--task",
        "instruction",
        PROMPT,
        "--out",
        str(work / "base.json"),
    )
    before = json.loads((work / "base.json").read_text())["metrics"]
    results = {"pretrain_seconds": round(pretrain_seconds, 1), "before": before, "methods": {}}
    for name, flags in METHODS.items():
        run = work / name
        started = time.perf_counter()
        lmkiln(
            "finetune",
            *("--base", str(base), "--data", str(work / "task.jsonl"), *flags, PROMPT),
            *("train.max_epochs=5", "schedule.warmup_steps=5", "finetune.eval_samples=0"),
            *(f"train.run_dir={run}", "log.progress=off", "log.plot=false", "--overwrite"),
        )
        wall = time.perf_counter() - started
        lmkiln(
            "eval", str(run), "--data", heldout, "--task", "instruction", "--out", str(run / "heldout.json")
        )
        after = json.loads((run / "heldout.json").read_text())["metrics"]
        figures = json.loads((run / "finetune_eval.json").read_text())
        results["methods"][name] = {
            "trainable_parameters": figures["trainable_parameters"],
            "total_parameters": figures["total_parameters"],
            "steps": figures["steps"],
            "train_seconds": round(figures["train_seconds"], 1),
            "wall_seconds": round(wall, 1),
            "exact_match_before": before["exact_match"],
            "exact_match_after": after["exact_match"],
            "f1_after": round(after["f1"], 3),
            "eos_rate_before": before["eos_rate"],
            "eos_rate_after": after["eos_rate"],
        }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
