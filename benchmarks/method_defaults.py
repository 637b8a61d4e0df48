"""Does every fine-tuning recipe learn with every method on its shipped defaults?

A tiny base is pretrained (through `lmkiln.tasks.pretrain`, like `lmkiln train`) on sentences that
pair word lists with their "partner" words ("red cat means green dog."). Each `sft-*` recipe then
gets a synthetic task in its own format that maps a word list to its partners (classification:
whether an animal is named), and is fine-tuned with full, freeze and lora, changing nothing but
the budget (epochs, examples, batch size): learning rate, warm-up and schedule are the recipe's,
as `lmkiln.config.resolve` adapts them to the method. Prints (and with --out writes) one JSON
object: per recipe and method the validation loss before and after, its relative drop, the task
metric and the share of generations that stop at EOS.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/method_defaults.py [--quick] [--out FILE]

--quick is the budget of tests/test_method_matrix.py; the default is a real one (1,000 rows,
3 epochs, the recipes' batch size, a wider base). The matrix test imports the builders below.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
PARTNER = dict(zip(WORDS, ["green", "red", "tree", "dog", "cat", "moon", "sun", "blue"]))
FORMATS = ["instruction", "chat", "translation", "summarization", "qa", "classification"]
METHODS = ["full", "freeze", "lora"]
METRIC = {"classification": "val_accuracy"}  # the task metric of the finetune evaluator


@dataclass(frozen=True)
class Budget:
    """What a matrix run may change: the size of the base, the data and the run; never the optimizer."""

    width: int
    pretrain_steps: int
    train_rows: int
    val_rows: int
    epochs: int
    batch_size: int
    eval_samples: int


QUICK = Budget(
    width=64, pretrain_steps=300, train_rows=240, val_rows=32, epochs=3, batch_size=8, eval_samples=16
)
REAL = Budget(
    width=96, pretrain_steps=600, train_rows=1000, val_rows=100, epochs=3, batch_size=16, eval_samples=32
)


def word_lists(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(2, 4))] for _ in range(n)]


def corpus_text(n: int = 800, seed: int = 1) -> str:
    return "\n\n".join(f"{' '.join(w)} means {' '.join(PARTNER[x] for x in w)}." for w in word_lists(n, seed))


def task_row(fmt: str, words: list[str]) -> dict:
    """One example of the partner task in the columns of `fmt`."""
    text, partners = " ".join(words), " ".join(PARTNER[w] for w in words)
    if fmt == "instruction":
        return {"instruction": "Swap each word for its partner.", "input": text, "output": partners}
    if fmt == "chat":
        return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": partners}]}
    if fmt == "translation":
        return {"source": text, "target": partners, "source_language": "Words", "target_language": "Partners"}
    if fmt == "summarization":
        return {"document": text, "summary": partners}
    if fmt == "qa":
        return {"question": f"What are the partners of {text}?", "answer": partners}
    return {"text": text, "label": "animal" if {"cat", "dog"} & set(words) else "other"}


def write_task(path: Path, fmt: str, n: int, seed: int) -> Path:
    path.write_text(
        "".join(json.dumps(task_row(fmt, w)) + "\n" for w in word_lists(n, seed)), encoding="utf-8"
    )
    return path


def pretrain_base(work: Path, budget: Budget) -> Path:
    """A tiny base that knows the partner relation (not the task formats), as `lmkiln train` makes one."""
    from lmkiln.config import load_config
    from lmkiln.tasks import run_task

    corpus = work / "corpus.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    run_dir = work / "base"
    cfg = load_config(
        overrides=[
            *(f"data.corpus={corpus}", "tokenizer.vocab_size=300", "model.n_layer=2", "model.n_head=4"),
            *(
                "model.n_kv_head=2",
                f"model.d_model={budget.width}",
                "model.block_size=128",
                "model.dropout=0",
            ),
            *("train.seq_len=64", "train.batch_size=16", f"train.max_steps={budget.pretrain_steps}"),
            *(f"train.eval_every={budget.pretrain_steps}", f"train.save_every={budget.pretrain_steps}"),
            *("schedule.warmup_steps=10", "optim.lr=3e-3", "log.progress=off", "log.plot=false"),
            *("train.sample_tokens=0", "train.device=cpu", f"train.run_dir={run_dir}"),
        ]
    )
    run_task(cfg, overwrite=True)
    return run_dir


def finetune_combo(
    work: Path, base: Path, fmt: str, method: str, budget: Budget, *overrides: str, name: str = ""
) -> dict:
    """Fine-tune recipe sft-FMT with `method` on its defaults (plus `overrides`); the run's figures."""
    from lmkiln.config import load_config
    from lmkiln.tasks.finetune import finetune

    data = write_task(work / f"{fmt}-train.jsonl", fmt, budget.train_rows, seed=2)
    val = write_task(work / f"{fmt}-val.jsonl", fmt, budget.val_rows, seed=3)
    cfg = load_config(
        recipe=f"sft-{fmt}",
        overrides=[
            *("task=finetune", f"finetune.base={base}", f"finetune.data={data}", f"finetune.val_data={val}"),
            *(f"finetune.method={method}", f"train.max_epochs={budget.epochs}", "train.device=cpu"),
            *(f"train.batch_size={budget.batch_size}", f"finetune.eval_samples={budget.eval_samples}"),
            *("finetune.max_new_tokens=16", "train.save_every=100000", "log.progress=off", "log.plot=false"),
            *("finetune.export_merged=false", f"train.run_dir={work / f'{fmt}-{name or method}'}"),
            *overrides,
        ],
    )
    started = time.perf_counter()
    result = finetune(cfg, overwrite=True)
    before, after = result.fit.first_eval["val_loss"], result.fit.last_eval["val_loss"]
    figures = {
        "lr": float(f"{result.cfg.optim.lr:.4g}"),
        "warmup_steps": result.cfg.schedule.warmup_steps,
        "steps": result.fit.state.step,
        "val_loss_before": round(before, 4),
        "val_loss_after": round(after, 4),
        "val_loss_drop": round((before - after) / before, 4),
        "seconds": round(time.perf_counter() - started, 1),
        "stalled": _stalled(result.run_dir),
        "notes": list(result.notes),
    }
    if fmt in METRIC:
        figures[METRIC[fmt]] = round(result.fit.last_eval[METRIC[fmt]], 4)
    for when in ("before", "after"):
        if when in result.check:
            metrics = result.check[when]["metrics"]
            figures[f"eos_rate_{when}"] = round(metrics.get("eos_rate", 0.0), 3)
            figures[f"metric_{when}"] = {k: round(v, 3) for k, v in metrics.items() if k != "eos_rate"}
    return figures


def _stalled(run_dir: Path) -> bool:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return any(json.loads(line).get("event") == "stall" for line in lines)


def run_matrix(
    work: Path,
    budget: Budget,
    formats: list[str] = FORMATS,
    methods: list[str] = METHODS,
    recipe_lr_too: bool = False,
) -> dict:
    """Every format x method on the defaults; with recipe_lr_too, freeze and lora also with the
    recipe's learning rate set explicitly (what they got before the defaults became method-aware)."""
    from lmkiln.config import load_config

    started = time.perf_counter()
    base = pretrain_base(work, budget)
    results: dict = {"budget": budget.__dict__, "pretrain_seconds": round(time.perf_counter() - started, 1)}
    for fmt in formats:
        recipe_lr = load_config(recipe=f"sft-{fmt}").optim.lr
        for method in methods:
            runs = {method: ()}
            if recipe_lr_too and method != "full":
                runs[f"{method}@recipe-lr"] = (f"optim.lr={recipe_lr}",)
            for name, overrides in runs.items():
                figures = finetune_combo(work, base, fmt, method, budget, *overrides, name=name)
                results[f"sft-{fmt} {name}"] = figures
                print(f"sft-{fmt} {name}: {json.dumps(figures)}", flush=True)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the matrix test's budget")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--recipe-lr-too", action="store_true", help="also run freeze and lora on the recipe's learning rate"
    )
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lmkiln-defaults-"))
    work.mkdir(parents=True, exist_ok=True)
    budget = QUICK if args.quick else REAL
    results = run_matrix(work, budget, args.formats.split(","), args.methods.split(","), args.recipe_lr_too)
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
