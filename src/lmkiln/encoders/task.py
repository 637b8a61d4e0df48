"""The `encoder` task: fine-tune a Hugging Face encoder for semantic search or classification.

    lmkiln train --recipe encoder-retrieval --encoder.base DIR --encoder.data pairs.jsonl

JSONL rows → tokenized once → epoch batches (every example once per epoch, resumable) → the
one training loop with `ContrastiveLoss` or the shared `ClassificationLoss` → the best (or last) weights
saved in Hugging Face format to RUN_DIR/model, reusable by `lmkiln embed`, transformers and
sentence-transformers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkiln.config import Config, ResolvedConfig, resolve
from lmkiln.data.loader import IGNORE_INDEX, epoch_stream
from lmkiln.data.shards import held_out
from lmkiln.encoders.data import label_names, pad_rows, read_jsonl, require_text, tokenize
from lmkiln.encoders.model import load_encoder, save_encoder
from lmkiln.encoders.retrieval import ContrastiveLoss, evaluate_pairs
from lmkiln.errors import LmkilnError
from lmkiln.runs.rundir import open_run_dir
from lmkiln.train.distributed import parallelize
from lmkiln.train.evaluate import Evaluator, classification_evaluator
from lmkiln.train.loop import FitResult, TrainLoop, TrainSetup
from lmkiln.train.objectives import ClassificationLoss
from lmkiln.train.optim import build_optimizer
from lmkiln.train.runtime import Runtime

log = logging.getLogger("lmkiln")


@dataclass
class Examples:
    texts: dict[str, list[str]]
    """Column name → texts: query/positive (retrieval) or text (classification)."""
    labels: list[int]
    """Class index per example (classification); empty for retrieval."""

    def __len__(self) -> int:
        return len(next(iter(self.texts.values())))


def read_examples(cfg: Config) -> tuple[Examples, Examples, list[str]]:
    """(training examples, validation examples, class names) from encoder.data / val_data."""
    e = cfg.encoder
    if not e.data:
        raise LmkilnError("the encoder task needs --encoder.data FILE.jsonl")
    retrieval = e.objective == "retrieval"
    fields = (e.query_field, e.positive_field) if retrieval else (e.text_field, e.label_field)
    rows = read_jsonl(e.data, fields)
    if e.val_data:
        train_rows, val_rows = rows, read_jsonl(e.val_data, fields)
    else:
        name = Path(e.data).name
        held = held_out((f"{name}:{r['_line']}" for r in rows), cfg.data.seed, e.val_fraction)
        train_rows = [r for r, h in zip(rows, held) if not h]
        val_rows = [r for r, h in zip(rows, held) if h]
    if not train_rows:
        raise LmkilnError(f"{e.data}: no training examples left after holding out validation ones")
    names = [] if retrieval else label_names([r[e.label_field] for r in train_rows])
    return (
        _columns(train_rows, e.data, fields, names),
        _columns(val_rows, e.val_data or e.data, fields, names),
        names,
    )


def _columns(rows: list[dict], path: str, fields: tuple[str, str], names: list[str]) -> Examples:
    if not names:  # retrieval: both fields are texts
        return Examples({f: [require_text(r, f, path) for r in rows] for f in fields}, [])
    text_field, label_field = fields
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for row in rows:
        label = str(row[label_field])
        if label not in index:
            raise LmkilnError(
                f"{path}:{row['_line']}: label {label!r} never occurs in the training data "
                f"(training labels: {', '.join(names[:10])})"
            )
        labels.append(index[label])
    return Examples({text_field: [require_text(r, text_field, path) for r in rows]}, labels)


# --------------------------------------------------------------------------------------------
# Batches


def pair_collate(queries: list[list[int]], positives: list[list[int]], pad_id: int):
    """Indices → a contrastive batch; the loop's padding slots (-1) get valid=False."""

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        filled = [i if i >= 0 else 0 for i in indices]  # a stand-in row that the loss ignores
        q_ids, q_mask = pad_rows([queries[i] for i in filled], pad_id)
        p_ids, p_mask = pad_rows([positives[i] for i in filled], pad_id)
        valid = torch.tensor([i >= 0 for i in indices])
        return {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask, "valid": valid}

    return collate


def label_collate(texts: list[list[int]], labels: list[int], pad_id: int):
    """Indices → a classification batch; padding slots get label IGNORE_INDEX."""

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        filled = [i if i >= 0 else 0 for i in indices]
        ids, mask = pad_rows([texts[i] for i in filled], pad_id)
        target = torch.tensor([labels[i] if i >= 0 else IGNORE_INDEX for i in indices])
        return {"input_ids": ids, "attention_mask": mask, "labels": target}

    return collate


def collate_for(examples: Examples, cfg: Config, tokenizer: Any, pad_id: int):
    """Tokenize the examples once; the returned function builds a batch from indices."""
    e = cfg.encoder
    if e.objective == "retrieval":
        queries = tokenize(tokenizer, examples.texts[e.query_field], e.max_length)
        positives = tokenize(tokenizer, examples.texts[e.positive_field], e.max_length)
        return pair_collate(queries, positives, pad_id)
    return label_collate(
        tokenize(tokenizer, examples.texts[e.text_field], e.max_length), examples.labels, pad_id
    )


def _mask_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(sum(v.sum() for k, v in batch.items() if k.endswith("mask")))


# --------------------------------------------------------------------------------------------
# Evaluation


def retrieval_evaluator(
    val: Examples, run: ResolvedConfig, tokenizer: Any, objective: ContrastiveLoss, collate
) -> Evaluator:
    """val_loss (contrastive), val_recall@1/5/10 and val_mrr over the validation pairs."""
    e, micro = run.cfg.encoder, run.batch.micro_batch_size
    queries, positives = val.texts[e.query_field], val.texts[e.positive_field]

    def evaluate(model: nn.Module, runtime: Runtime) -> dict[str, float]:
        total, count = 0.0, 0
        for start in range(0, len(val), micro):
            batch = collate(list(range(start, min(start + micro, len(val)))))
            batch = {k: v.to(runtime.device) for k, v in batch.items()}
            total += objective(model, batch).item()
            count += int(objective.count(batch))
        found = evaluate_pairs(
            model,
            tokenizer,
            queries,
            positives,
            max_length=e.max_length,
            batch_size=micro,
            device=runtime.device,
        )
        return {"val_loss": total / max(count, 1), **{f"val_{k}": v for k, v in found.items()}}

    return evaluate


def _val_batches(val: Examples, micro: int, collate) -> list[dict[str, torch.Tensor]]:
    return [collate(list(range(start, min(start + micro, len(val))))) for start in range(0, len(val), micro)]


# --------------------------------------------------------------------------------------------
# The task


@dataclass
class EncoderResult:
    run_dir: Path
    model_dir: Path
    fit: FitResult
    cfg: Config
    saved_step: int

    def summary(self) -> str:
        from lmkiln.train.observe import format_duration

        state, e = self.fit.state, self.cfg.encoder
        lines = [
            f"fine-tuned {e.base} for {e.objective}: {state.step} steps in "
            f"{format_duration(state.train_seconds)}; stopped by {self.fit.stop_reason}"
        ]
        keys = (
            ("val_recall@1", "val_recall@5", "val_mrr")
            if e.objective == "retrieval"
            else ("val_accuracy", "val_f1_macro")
        )
        before, after = self.fit.first_eval, self.fit.last_eval
        shown = [
            f"{k[4:]} {before[k]:.3f} → {after[k]:.3f}" if k in before else f"{k[4:]} {after[k]:.3f}"
            for k in keys
            if k in after
        ]
        if shown:
            lines.append("validation: " + ", ".join(shown))
        lines.append(f"model (Hugging Face format, weights of step {self.saved_step}): {self.model_dir}")
        lines.append("next:")
        lines.append(f"  lmkiln embed {self.run_dir} --data texts.jsonl --out embeddings.npy")
        if e.objective == "retrieval":
            lines.append(f"  lmkiln eval-retrieval {self.run_dir} --pairs pairs.jsonl")
        return "\n".join(lines)


def train_encoder(
    cfg: Config,
    resume: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    runtime: Runtime | None = None,
) -> EncoderResult:
    """Fine-tune cfg.encoder.base on cfg.encoder.data and save it to RUN_DIR/model (see the module docstring)."""
    e = cfg.encoder
    if not e.base:
        raise LmkilnError("the encoder task needs --encoder.base DIR (a local Hugging Face encoder)")
    if e.temperature <= 0 or e.max_length <= 0 or not 0 <= e.val_fraction < 1:
        raise LmkilnError(
            "encoder.temperature and encoder.max_length must be positive and encoder.val_fraction "
            f"in [0, 1); got {e.temperature}, {e.max_length}, {e.val_fraction}"
        )
    runtime = runtime or Runtime.start(cfg.train, cfg.dist)
    train, val, names = read_examples(cfg)
    run = resolve(cfg, runtime.world_size, examples=len(train))
    retrieval = e.objective == "retrieval"
    torch.manual_seed(cfg.train.seed)  # the classification head's initial weights
    loaded = load_encoder(e.base, pooling=e.pooling, n_labels=len(names), dropout=e.classifier_dropout)
    model, tokenizer = loaded.model.to(runtime.device), loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    objective: Any = ContrastiveLoss(e.temperature, e.symmetric) if retrieval else ClassificationLoss()

    def make(examples: Examples):
        return collate_for(examples, cfg, tokenizer, pad_id)

    micro = run.batch.micro_batch_size
    batches = epoch_stream(len(train), run.batch, cfg.train.seed, runtime.rank, make(train))
    evaluate = None
    if len(val) and retrieval:
        evaluate = retrieval_evaluator(val, run, tokenizer, objective, make(val))
    elif len(val):
        evaluate = classification_evaluator(_val_batches(val, micro, make(val)), len(names))
    run_dir = open_run_dir(
        cfg, is_main=runtime.is_main, barrier=runtime.barrier, resume=resume, overwrite=overwrite
    )
    log.info(
        "encoder: %s (%s pooling), %d training / %d validation examples, %d steps",
        e.base,
        model.pooling,
        len(train),
        len(val),
        run.total_steps,
    )
    setup = TrainSetup(
        model=model,
        # Encoders carry parameters the loss never touches (BERT's pooler); DDP must not wait for them.
        train_model=parallelize(model, cfg, runtime, find_unused_parameters=True),
        objective=objective,
        train_batches=batches,
        optimizer=build_optimizer(model, cfg.optim),
        total_steps=run.total_steps,
        evaluate=evaluate,
        fingerprint={
            "train.batch_size": cfg.train.batch_size,
            "train.micro_batch_size": micro,
            "world_size": runtime.world_size,
            "encoder.base": str(Path(e.base).expanduser().resolve()),
            "encoder.objective": e.objective,
            "encoder.max_length": e.max_length,
            "examples": len(train),
            "labels": names,
        },
        tokens_in=_mask_tokens,
        epoch_of=lambda: batches.epoch,
    )
    fit = TrainLoop(setup, run, runtime, run_dir).fit(resume=resume, force=force)
    model_dir = run_dir / "model"
    saved_step = fit.state.step
    if runtime.is_main:
        saved_step = fit.restore_best(model)
        meta = {"objective": e.objective, "max_length": e.max_length, "labels": names, "base": e.base}
        save_encoder(model, tokenizer, model_dir, meta)
    runtime.barrier()
    return EncoderResult(run_dir, model_dir, fit, cfg, saved_step)
