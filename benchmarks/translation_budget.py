"""Translation from scratch in a fixed wall-clock budget: lmkiln's recipe vs a plain `transformers` loop.

    python -m benchmarks.translation_budget --budget 420 --json out.json

The corpus is real and offline: Debian's gettext catalogs, the German `.mo` files of the system's
locale directory (read with Python's `gettext`), give ~50,000 English→German message pairs. Pairs
are cleaned (one line, 2..150 characters, source ≠ target), deduplicated by source, shuffled with
a fixed seed; the test split (held out from both candidates, and from lmkiln's tokenizer) is
scored with sacrebleu BLEU and chrF.

- lmkiln: `lmkiln finetune --recipe translation-scratch --train.max_time BUDGET` through the library
  (`finetune`): a fresh 5M-parameter Llama-style model, a BPE trained on the training pairs,
  padded length-grouped batches; decoded greedily and with beam search (width 4).
- peer: the loop a user writes around `transformers`: GPT2LMHeadModel of the same size
  (4 layers, width 256, vocabulary 8000 from a `tokenizers` BPE trained on the same pairs), 32
  pairs per step padded to the longest with an attention mask, loss on the target side, AdamW at
  1e-3, stopped at the same budget; decoded with `generate` (greedy and num_beams=4).

Both budgets count training only; start-up (reading, tokenizer training) is reported apart.
"""

from __future__ import annotations

import argparse
import gettext
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import lmkiln  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

from benchmarks.common import machine  # noqa: E402

LOCALE = Path("/usr/share/locale/de/LC_MESSAGES")
SEP, EOS, PAD = "<|sep|>", "<|endoftext|>", "<|pad|>"


def gettext_pairs(directory: Path = LOCALE) -> list[tuple[str, str]]:
    """(English, German) message pairs of every readable catalog, cleaned and unique by source."""
    pairs: dict[str, str] = {}
    for path in sorted(directory.glob("*.mo")):
        try:
            with path.open("rb") as handle:
                catalog = gettext.GNUTranslations(handle)._catalog
        except (OSError, UnicodeDecodeError):
            continue
        for key, value in catalog.items():
            if isinstance(key, tuple) or not isinstance(value, str):
                continue  # plural forms
            source = key.split("\x04", 1)[-1].strip()  # drop a msgctxt
            target = value.strip()
            if "\n" in source or "\n" in target or source == target:
                continue
            if 2 <= len(source) <= 150 and 2 <= len(target) <= 150:
                pairs.setdefault(source, target)
    return sorted(pairs.items())


def split(pairs: list[tuple[str, str]], test: int, seed: int = 0):
    order = list(pairs)
    random.Random(seed).shuffle(order)
    return order[test:], order[:test]


# --------------------------------------------------------------------------------------------
# lmkiln


class PhaseMarks(logging.Handler):
    """When lmkiln's log lines appear: data, tokenizer, "before" check, first evaluation."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.marks.append((time.perf_counter(), record.getMessage()[:60]))

    def seconds_after(self, started: float, prefix: str) -> float | None:
        return next((t - started for t, m in self.marks if m.startswith(prefix)), None)

    def phases(self, started: float) -> list[list]:
        """(seconds since the start, message) up to the first training step."""
        out = []
        for t, message in self.marks:
            out.append([round(t - started, 1), message])
            if message.startswith("first step"):
                break
        return out


def run_lmkiln(train, test, budget: float, work: Path, beams: int) -> dict:
    from lmkiln.config import load_config
    from lmkiln.data.formats import read_records
    from lmkiln.eval.runner import evaluate_generation
    from lmkiln.tasks.finetune import finetune

    data = work / "train.jsonl"
    rows = [{"source": s, "target": t} for s, t in train]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    test_file = work / "test.jsonl"
    test_rows = [{"source": s, "target": t} for s, t in test]
    test_file.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in test_rows), encoding="utf-8"
    )
    cfg = load_config(
        recipe="translation-scratch",
        overrides=[
            f"finetune.data={data}",
            f"train.run_dir={work / 'lmkiln'}",
            "finetune.source_language=English",
            "finetune.target_language=German",
            f"train.max_time={budget}s",
            "log.progress=lines",
            "log.plot=false",
        ],
    )
    from lmkiln.train.loop import TrainLoop

    marks = PhaseMarks()
    logging.getLogger("lmkiln").addHandler(marks)
    run_steps = TrainLoop._run

    def marked_run(loop: TrainLoop) -> str:  # the loop's steps start here, after its first evaluation
        marks.emit(logging.makeLogRecord({"msg": "first step"}))
        return run_steps(loop)

    TrainLoop._run = marked_run
    started = time.perf_counter()
    try:
        result = finetune(cfg)
    finally:
        TrainLoop._run = run_steps
        logging.getLogger("lmkiln").removeHandler(marks)
    wall = time.perf_counter() - started
    records = read_records(test_file, cfg.finetune)
    out = {
        "steps": result.fit.state.step,
        "train_seconds": result.fit.state.train_seconds,
        "wall_seconds": wall,
        "startup_seconds": wall - result.fit.state.train_seconds,
        "seconds_to_first_step": marks.seconds_after(started, "first step"),
        "phases_s": marks.phases(started),
        "stop_reason": result.fit.stop_reason,
        "val_loss": result.fit.last_eval.get("val_loss"),
    }
    model = result.model.eval()
    for name, width in (("greedy", 1), (f"beam{beams}", beams)):
        t = time.perf_counter()
        metrics = evaluate_generation(
            model, result.tokenizer, records, cfg.finetune, 96, 32, beams=width
        ).metrics
        out[name] = {**metrics, "seconds": time.perf_counter() - t}
    return out


# --------------------------------------------------------------------------------------------
# The peer: a plain loop around transformers' GPT2LMHeadModel


def peer_tokenizer(train, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[EOS, PAD, SEP], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((text for pair in train for text in pair), trainer=trainer)
    return tok


def run_peer(train, test, budget: float, beams: int, batch: int = 32, seed: int = 0) -> dict:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmkiln.eval.text_metrics import bleu_chrf

    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    tok = peer_tokenizer(train, 8000)
    eos, pad, sep = (tok.token_to_id(t) for t in (EOS, PAD, SEP))
    encoded = []
    for source, target in train:
        src, tgt = tok.encode(source).ids[:60], tok.encode(target).ids[:60]
        encoded.append((src + [sep], tgt + [eos]))
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=256, n_embd=256, n_layer=4, n_head=4,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = random.Random(seed)
    startup = time.perf_counter() - started
    steps, began = 0, time.perf_counter()
    model.train()
    while time.perf_counter() - began < budget:
        rows = rng.sample(encoded, batch)
        width = max(len(s) + len(t) for s, t in rows)
        ids = torch.full((batch, width), pad)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for r, (s, t) in enumerate(rows):
            ids[r, : len(s) + len(t)] = torch.tensor(s + t)
            labels[r, len(s) : len(s) + len(t)] = torch.tensor(t)
            mask[r, : len(s) + len(t)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    out = {"steps": steps, "train_seconds": time.perf_counter() - began, "startup_seconds": startup}
    model.eval()
    references = [[t] for _, t in test]
    for name, width in (("greedy", 1), (f"beam{beams}", beams)):
        t0 = time.perf_counter()
        predictions = []
        for source, _ in test:
            prompt = torch.tensor([tok.encode(source).ids[:60] + [sep]])
            with torch.no_grad():
                generated = model.generate(
                    prompt,
                    max_new_tokens=96,
                    num_beams=width,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
            predictions.append(
                tok.decode(generated[0, prompt.shape[1] :].tolist(), skip_special_tokens=True).strip()
            )
        out[name] = {**bleu_chrf(predictions, references), "seconds": time.perf_counter() - t0}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=420.0, help="training seconds per candidate")
    parser.add_argument("--test", type=int, default=500, help="held-out pairs scored with BLEU/chrF")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--only", default="lmkiln,peer", help="candidates, comma-separated")
    parser.add_argument("--json", default="", help="also write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    pairs = gettext_pairs()
    if len(pairs) < 1000:
        print(
            f"error: only {len(pairs)} message pairs under {LOCALE} (install German locales)", file=sys.stderr
        )
        return 2
    train, test = split(pairs, args.test)
    report = {"machine": machine(), "corpus": f"gettext {LOCALE}", "pairs": len(pairs), "train": len(train),
              "test": len(test), "budget_s": args.budget, "threads": torch.get_num_threads()}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lmkiln-translation-") as work:
        for name in args.only.split(","):
            if name == "lmkiln":
                report["lmkiln"] = run_lmkiln(train, test, args.budget, Path(work), args.beams)
            elif name == "peer":
                report["transformers_loop"] = run_peer(train, test, args.budget, args.beams)
            print(
                json.dumps({name: report.get("lmkiln" if name == "lmkiln" else "transformers_loop")}),
                flush=True,
            )
    report["load_average_end"] = list(__import__("os").getloadavg())
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
