"""Task training throughput: variable-length examples, padded or packed, next to pretraining.

    python -m benchmarks.task_training --steps 12 --rounds 3 --json out.json

One model shape for everyone (GPT-2 style, 4 layers, width 256, vocabulary 8000, 5.3M parameters)
and 32 examples per step whose lengths follow English→German message pairs (gettext catalogs
when present, else a fitted log-normal; ~half of each example is prompt, trained on the rest).
Candidates alternate within every round (a burst of load slows one round, not one candidate):

- lmkiln-pretrain: `TrainLoop` on fixed windows of 128 tokens, batch 16: the MFU reference.
- lmkiln-padded: the fine-tuning path (`padded_collate` without a mask, length-grouped steps).
- lmkiln-padded-masked: the same with the pre-issue-15 batches (attention mask and position
  ids, random order), to show what the fix is worth.
- lmkiln-packed: rows of 128 tokens packed best-fit-decreasing, attention kept per example.
- transformers-loop: GPT2LMHeadModel in a plain loop, padded batches with an attention mask.
- transformers-trainer: the same model and batches through `transformers.Trainer`.

Tokens/s count real (non-pad) tokens. MFU = real tokens/s × training FLOPs per token / the
machine's best matmul FLOP/s (`benchmarks.common.matmul_peak`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import lmkiln  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

from benchmarks.common import Shape, machine, matmul_peak, median, spread, synthetic_tokens  # noqa: E402
from benchmarks.peers import LR, Timed, TimedStream, gpt2_config, lmkiln_config  # noqa: E402

SHAPE = Shape("task-5m", 4, 4, 256, 128, 32, 8000)
BATCH, ROW = 32, 128


def example_lengths(count: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, target) token counts: 4 characters a token over gettext pairs, else log-normal."""
    try:
        from benchmarks.translation_budget import gettext_pairs

        pairs = gettext_pairs()
    except Exception:
        pairs = []
    rng = random.Random(seed)
    if len(pairs) > 1000:
        picked = [rng.choice(pairs) for _ in range(count)]
        return [(max(1, len(s) // 4) + 12, max(1, len(t) // 4) + 1) for s, t in picked]
    sizes = np.random.default_rng(seed).lognormal(3.0, 0.6, size=(count, 2)).astype(int) + 1
    return [(int(a) + 12, int(b) + 1) for a, b in np.minimum(sizes, 55)]


def token_examples(lengths, vocab: int, seed: int = 0):
    from lmkiln.data.loader import IGNORE_INDEX
    from lmkiln.data.task_examples import TokenExample

    rng = np.random.default_rng(seed)
    out = []
    for prompt, target in lengths:
        ids = rng.integers(0, vocab, prompt + target).tolist()
        out.append(TokenExample(ids, [IGNORE_INDEX] * prompt + rng.integers(0, vocab, target).tolist()))
    return out


def masked_collate(examples, pad: int):
    """The batches fine-tuning made before issue 15: an attention mask and position ids."""
    from lmkiln.data.loader import pad_collate

    def collate(indices):
        rows = [{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in indices]
        return pad_collate(rows, pad, side="right")

    return collate


def lmkiln_task_run(mode: str, examples, steps: int) -> tuple[Timed, int]:
    """lmkiln's TrainLoop over padded or packed task batches; returns the timing and real tokens."""
    from lmkiln.config import resolve
    from lmkiln.data import task_examples as ex
    from lmkiln.data.loader import CollatedBatches, EpochBatches
    from lmkiln.tasks.pretrain import build_transformer
    from lmkiln.train.loop import TrainLoop, TrainSetup
    from lmkiln.train.objectives import LanguageModelLoss
    from lmkiln.train.optim import build_optimizer
    from lmkiln.train.runtime import Runtime

    cfg = lmkiln_config(SHAPE, steps, ["train.device=cpu", f"train.batch_size={BATCH}"])
    runtime = Runtime.start(cfg.train, cfg.dist)
    model = build_transformer(cfg.model, runtime.device, 0, False, cfg.train.cpu_matmul)
    lengths = [len(e.input_ids) for e in examples]
    if mode == "packed":
        rows = ex.pack_plan(lengths, ROW, 0)
        indices = EpochBatches(len(rows), BATCH // 2, BATCH // 2, 0)  # 16 rows of 128 ≈ 32 examples
        collate = ex.packed_collate(examples, rows, ROW, 0)
    elif mode == "padded":
        indices, collate = (
            EpochBatches(len(examples), BATCH, BATCH, 0, lengths=lengths),
            ex.padded_collate(examples, 0),
        )
    else:
        indices, collate = EpochBatches(len(examples), BATCH, BATCH, 0), masked_collate(examples, 0)
    timed = Timed(model=model)
    counted = []
    stream = CollatedBatches(indices, collate)

    class Counting:
        def __next__(self):
            batch = next(stream)
            counted.append(ex.real_tokens(batch))
            return batch

        def state_dict(self):
            return stream.state_dict()

        def load_state_dict(self, state):
            stream.load_state_dict(state)

    cfg_run = resolve(cfg, 1)
    if mode == "packed":
        cfg_run = resolve(cfg, 1, derived={"train.batch_size": BATCH // 2})
    setup = TrainSetup(
        model=model,
        objective=LanguageModelLoss(),
        train_batches=TimedStream(Counting(), timed, runtime.device),
        optimizer=build_optimizer(model, cfg.optim),
        total_steps=steps,
    )
    TrainLoop(setup, cfg_run, runtime, None).fit()
    timed.end = time.perf_counter()
    return timed, counted


def pretrain_run(steps: int) -> tuple[Timed, list[int]]:
    from benchmarks.peers import lmkiln_run

    shape = Shape("task-5m-pretrain", 4, 4, 256, ROW, BATCH // 2, 8000)
    timed = lmkiln_run(shape, steps, synthetic_tokens(8000), torch.device("cpu"))
    return timed, [ROW * (BATCH // 2)] * steps


def hf_batches(examples, steps: int, seed: int = 0):
    """Padded GPT-2 batches (attention mask, -100 on prompt and padding) of random examples."""
    rng = random.Random(seed)
    for _ in range(steps):
        rows = rng.sample(examples, BATCH)
        width = max(len(e.input_ids) for e in rows)
        ids, labels = torch.zeros((BATCH, width), dtype=torch.long), torch.full((BATCH, width), -100)
        mask = torch.zeros((BATCH, width), dtype=torch.long)
        for r, e in enumerate(rows):
            n = len(e.input_ids)
            ids[r, :n], mask[r, :n] = torch.tensor(e.input_ids), 1
            labels[r, 1:n] = torch.tensor(e.labels[:-1])  # GPT-2 shifts labels itself
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hf_loop_run(examples, steps: int) -> tuple[Timed, list[int]]:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(SHAPE))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    timed, counted = Timed(model=model), []
    for batch in hf_batches(examples, steps):
        timed.starts.append(time.perf_counter())
        counted.append(int(batch["attention_mask"].sum()))
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    timed.end = time.perf_counter()
    return timed, counted


def hf_trainer_run(examples, steps: int) -> tuple[Timed, list[int]]:
    import transformers
    from transformers import GPT2LMHeadModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    transformers.logging.set_verbosity_error()
    batches = list(hf_batches(examples, steps))
    timed = Timed()

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timed.starts.append(time.perf_counter())

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=1, max_steps=steps, learning_rate=LR,
            save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, logging_steps=steps,
        )  # fmt: skip
        trainer = Trainer(
            model=GPT2LMHeadModel(gpt2_config(SHAPE)), args=args, train_dataset=Batches(),
            data_collator=lambda items: items[0], callbacks=[Clock()],
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    timed.end = time.perf_counter()
    return timed, [int(b["attention_mask"].sum()) for b in batches]


def alternating_paths(examples, steps: int, warmup: int = 2) -> dict[str, float]:
    """Real tokens/s of each batch path on ONE model and optimizer, the paths alternating step by
    step (order flipped every step): the comparison that load on a shared machine moves least.

    pretrain-windows: 16 random windows of 128 tokens; masked-random: the pre-issue-15 batches;
    nomask-random: no mask, random order; nomask-grouped: no mask, length-grouped (lmkiln's path).
    """
    from lmkiln.config import load_config
    from lmkiln.data.loader import EpochBatches
    from lmkiln.data.task_examples import padded_collate
    from lmkiln.tasks.pretrain import build_transformer

    cfg = load_config(overrides=SHAPE.lmkiln_overrides())
    model = build_transformer(cfg.model, torch.device("cpu"), 0, False, cfg.train.cpu_matmul)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    lengths = [len(e.input_ids) for e in examples]
    random_order = EpochBatches(len(examples), BATCH, BATCH, 0)
    grouped_order = EpochBatches(len(examples), BATCH, BATCH, 0, lengths=lengths)
    fast, masked = padded_collate(examples, 0), masked_collate(examples, 0)
    generator = torch.Generator().manual_seed(0)

    def timed_step(batch: dict, keys: tuple[str, ...]) -> float:
        inputs = {k: batch[k] for k in keys}
        start = time.perf_counter()
        loss = model(batch["input_ids"], targets=batch["labels"], **inputs) / 1000
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    totals: dict[str, list[float]] = {}
    for step in range(steps):
        rand, grouped = next(random_order), next(grouped_order)
        window = torch.randint(0, SHAPE.vocab_size, (BATCH // 2, ROW + 1), generator=generator)
        paths = [
            (
                "pretrain-windows",
                {"input_ids": window[:, :-1], "labels": window[:, 1:]},
                (),
                ROW * BATCH // 2,
            ),
            (
                "masked-random",
                masked(rand),
                ("attention_mask", "position_ids"),
                sum(lengths[i] for i in rand),
            ),
            ("nomask-random", fast(rand), (), sum(lengths[i] for i in rand)),
            ("nomask-grouped", fast(grouped), (), sum(lengths[i] for i in grouped)),
        ]
        for name, batch, keys, tokens in paths[:: 1 if step % 2 else -1]:
            seconds = timed_step(batch, keys)
            if step >= warmup:
                total = totals.setdefault(name, [0.0, 0.0])
                total[0], total[1] = total[0] + seconds, total[1] + tokens
    return {name: tokens / seconds for name, (seconds, tokens) in totals.items()}


def peak_rss_mb(name: str, steps: int) -> float:
    """The high-water mark (VmHWM) of a fresh process that runs only `name`: interpreter, torch,
    the candidate's imports, model, optimizer, activations. Read by the child itself: a forked
    child's ru_maxrss still counts the parent's pages from before exec."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.task_training", "--memory-child", name, "--steps", str(steps)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(done.stdout.split()[-1]) / 1024


def vm_hwm_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="first steps dropped from each run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="candidates, comma-separated (default: all)")
    parser.add_argument("--json", default="")
    parser.add_argument(
        "--alternate", type=int, default=0, help="also N steps of the per-step alternation of batch paths"
    )
    parser.add_argument(
        "--memory", action="store_true", help="also each candidate's peak resident memory, alone in a process"
    )
    parser.add_argument("--memory-child", default="", help=argparse.SUPPRESS)  # one candidate, nothing else
    args = parser.parse_args(argv)
    from lmkiln.config import load_config
    from lmkiln.model.transformer import training_flops_per_token

    examples = token_examples(example_lengths(8000), SHAPE.vocab_size)
    mean_length = float(np.mean([len(e.input_ids) for e in examples]))
    model_cfg = load_config(overrides=SHAPE.lmkiln_overrides()).model
    flops = training_flops_per_token(model_cfg, int(mean_length))
    candidates = {
        "lmkiln-pretrain": lambda: pretrain_run(args.steps),
        "lmkiln-padded": lambda: lmkiln_task_run("padded", examples, args.steps),
        "lmkiln-padded-masked": lambda: lmkiln_task_run("masked", examples, args.steps),
        "lmkiln-packed": lambda: lmkiln_task_run("packed", examples, args.steps),
        "transformers-loop": lambda: hf_loop_run(examples, args.steps),
        "transformers-trainer": lambda: hf_trainer_run(examples, args.steps),
    }
    if args.memory_child:  # what `peak_rss_mb` measures: this candidate alone ("imports" runs nothing)
        if args.memory_child != "imports":
            candidates[args.memory_child]()
        print(vm_hwm_kb())
        return 0
    chosen = [c for c in candidates if not args.only or c in args.only.split(",")]
    chosen = [] if args.only == "none" else chosen
    peak = matmul_peak(torch.device("cpu"))
    rates: dict[str, list[float]] = {c: [] for c in chosen}
    for _ in range(args.rounds):
        for name in chosen:
            timed, tokens = candidates[name]()
            seconds = timed.step_seconds(args.warmup)
            rates[name].append(sum(tokens[args.warmup :][: len(seconds)]) / sum(seconds))
    report = {
        "machine": machine(), "shape": SHAPE.describe(), "batch_examples": BATCH,
        "mean_example_tokens": mean_length, "matmul_peak_gflops": peak / 1e9, "candidates": {},
    }  # fmt: skip
    pretrain_flops = training_flops_per_token(model_cfg, ROW)
    for name in chosen:
        rate = median(rates[name])
        per_token = pretrain_flops if name == "lmkiln-pretrain" else flops
        report["candidates"][name] = {
            "real_tokens_per_s": rate, "spread": spread(rates[name]), "mfu": rate * per_token / peak,
        }  # fmt: skip
    base = report["candidates"]
    if "lmkiln-padded" in base:
        for peer in ("lmkiln-pretrain", "transformers-loop", "transformers-trainer", "lmkiln-padded-masked"):
            if peer in base:
                ratio = base["lmkiln-padded"]["real_tokens_per_s"] / base[peer]["real_tokens_per_s"]
                report[f"padded_vs_{peer}"] = ratio
        if "lmkiln-pretrain" in base:
            report["padded_mfu_vs_pretrain_mfu"] = (
                base["lmkiln-padded"]["mfu"] / base["lmkiln-pretrain"]["mfu"]
            )
    if args.memory:
        report["peak_rss_mb"] = {name: peak_rss_mb(name, args.steps) for name in ["imports", *chosen]}
    if args.alternate:
        rates = alternating_paths(examples, args.alternate)
        pretrain_mfu = rates["pretrain-windows"] * pretrain_flops
        report["per_step_alternation"] = {
            "real_tokens_per_s": rates,
            "nomask_grouped_vs_masked_random": rates["nomask-grouped"] / rates["masked-random"],
            "mfu_vs_pretrain": {
                k: v * flops / pretrain_mfu for k, v in rates.items() if k != "pretrain-windows"
            },
        }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
