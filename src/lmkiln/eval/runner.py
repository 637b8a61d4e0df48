"""`lmkiln eval`: task metrics of a trained run on a task file, by batched greedy generation.

Prompts are rendered and encoded exactly as in fine-tuning (lmkiln.data.task_examples), grouped
by length, left-padded and generated together; each output ends at the run's EOS (for chat, the
template's end-of-turn token) or at max_new_tokens. Metrics by task:

    instruction, chat, qa   exact_match, f1 (SQuAD normalisation)
    translation             bleu, chrf (sacrebleu)
    summarization           rouge1, rouge2, rougeL (rouge-score)
    classification          accuracy, f1_macro (the run's head, or the generated label)
    perplexity              loss, perplexity, bits_per_byte over every text
    memorization            canary exposure and extraction rates (eval/memorization.py; no data)
and for generation tasks `eos_rate`: the share of outputs that ended with EOS.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lmkiln.config import Config, FinetuneConfig, build_config, flatten, parse_overrides, to_dict
from lmkiln.data import task_examples as ex
from lmkiln.data.formats import iter_rows, read_records
from lmkiln.data.preference import encode_pairs, preference_collate
from lmkiln.data.task_examples import ExampleEncoder
from lmkiln.data.templates import chat_template_of
from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.eval.text_metrics import bleu_chrf, exact_match_f1, rouge
from lmkiln.files import write_json_atomic
from lmkiln.model.beam import beam_search_ids, check_beams
from lmkiln.model.generate import Sampling, generate_ids
from lmkiln.runs import checkpoint as ckpt
from lmkiln.runs.load import find_checkpoint, load_classifier, load_run
from lmkiln.runs.rundir import saved_config
from lmkiln.train.evaluate import classification_scores, classify, lm_metrics, summed_lm_loss
from lmkiln.train.metrics import per_class_f1
from lmkiln.train.preference import sequence_logps

log = logging.getLogger("lmkiln")

GENERATION_METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], dict[str, float]]] = {
    "instruction": exact_match_f1,
    "chat": exact_match_f1,
    "qa": exact_match_f1,
    "translation": bleu_chrf,
    "summarization": rouge,
}
EVAL_TASKS = (*GENERATION_METRICS, "classification", "preference", "perplexity", "memorization")


@dataclass
class EvalResult:
    task: str
    examples: int
    metrics: dict[str, float]
    skipped: int = 0
    """Examples whose prompt did not fit the model's context."""
    seconds: float = 0.0
    samples: list[dict] = field(default_factory=list)
    """The first few prompts, predictions and references, for a look."""

    def table(self) -> str:
        lines = [f"{'metric':<16} {'value':>10}"]
        lines += [f"{name:<16} {value:>10.4f}" for name, value in self.metrics.items()]
        lines.append(f"{'examples':<16} {self.examples:>10d}")
        if self.skipped:
            lines.append(f"{'skipped':<16} {self.skipped:>10d}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate_batched(
    model: nn.Module,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    stop_id: int,
    pad_id: int,
    beams: int = 1,
    length_penalty: float = 1.0,
) -> tuple[list[list[int]], list[bool]]:
    """Greedy (or beam-search) continuations of every prompt and whether each ended at stop_id.

    Greedy batches prompts of similar lengths; beam search runs one prompt at a time, its beams
    as the batch (`lmkiln.model.beam`).
    """
    check_beams(beams)
    if beams > 1:
        found = [
            beam_search_ids(model, list(p), beams, max_new_tokens, stop_id, length_penalty) for p in prompts
        ]
        return [h.tokens for h in found], [h.ended for h in found]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ended = torch.zeros(len(rows), dtype=torch.bool)

        def on_tokens(tokens: torch.Tensor, active: torch.Tensor, ended=ended) -> None:
            ended.logical_or_(((tokens == stop_id) & ~active).cpu() & ~ended)

        new = generate_ids(
            model, [list(prompts[i]) for i in rows], sampling, stop_id, pad_id, on_tokens=on_tokens
        )
        for row, ids, end in zip(rows, new, ended.tolist()):
            outputs[row], stopped[row] = ids, end
    return outputs, stopped


def stop_token(task: str, tokenizer: Tokenizer) -> int:
    """Where generation ends: EOS, or for chat the template's end-of-turn token."""
    if task != "chat":
        return tokenizer.eos_id
    template = chat_template_of(tokenizer)
    token = template.end_of_turn({tokenizer.decode([i]) for i in tokenizer.special_ids})
    return tokenizer.token_id(token) if token else tokenizer.eos_id


def evaluate_generation(
    model: nn.Module,
    tokenizer: Tokenizer,
    records: Sequence,
    cfg: FinetuneConfig,
    max_new_tokens: int,
    batch_size: int,
    task: str | None = None,
    label_set: Sequence[str] = (),
    beams: int = 1,
    length_penalty: float = 1.0,
) -> EvalResult:
    """Generate for each record's prompt (greedy, or beam search of width `beams`) and score it."""
    task = task or cfg.format
    started = time.perf_counter()
    block = model.cfg.block_size
    chat = chat_template_of(tokenizer) if cfg.format == "chat" else None
    encoder = ExampleEncoder(tokenizer, cfg, block, chat)
    prompts, kept = [], []
    for record in records:
        # room for max_new_tokens if the long input can be shortened that far, else what fits
        ids = encoder.prompt_ids(record, block - max_new_tokens) or encoder.prompt_ids(record, block - 1)
        if ids is not None:
            prompts.append(ids)
            kept.append(record)
    if not prompts:
        raise LmkilnError(f"no prompt fits the model's context of {block} tokens")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    stop = stop_token(task, tokenizer)
    outputs, stopped = generate_batched(
        model, prompts, max_new_tokens, batch_size, stop, pad, beams, length_penalty
    )
    predictions = [tokenizer.decode(ids, skip_special=True).strip() for ids in outputs]
    references = [_references(r) for r in kept]
    if task == "classification":
        metrics = _label_metrics(predictions, [r[0] for r in references], label_set)
    else:
        metrics = GENERATION_METRICS[task](predictions, references)
    metrics["eos_rate"] = sum(stopped) / len(stopped)
    samples = [
        {"location": r.location, "prediction": p, "references": refs, "stopped_at_eos": s}
        for r, p, refs, s in list(zip(kept, predictions, references, stopped))[:5]
    ]
    return EvalResult(
        task, len(kept), metrics, len(records) - len(kept), time.perf_counter() - started, samples
    )


def _references(record) -> list[str]:
    if record.messages:
        return [record.messages[-1]["content"].strip()]
    return [t.strip() for t in record.targets]


def _label_metrics(
    predictions: Sequence[str], labels: Sequence[str], label_set: Sequence[str]
) -> dict[str, float]:
    """Accuracy and macro F1 of generated labels; an output outside the label set is always wrong."""
    names = list(label_set) or sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    predicted = torch.tensor([index.get(p, len(names)) for p in predictions])
    target = torch.tensor([index.get(t, len(names)) for t in labels])
    f1 = per_class_f1(predicted, target, len(names) + 1)[: len(names)]
    return {"accuracy": float((predicted == target).double().mean()), "f1_macro": sum(f1) / len(f1)}


# --------------------------------------------------------------------------------------------
# Classification heads and perplexity


def evaluate_classifier(
    path: str | Path, cfg: Config, data: str, batch_size: int, device: str = "cpu"
) -> EvalResult:
    """accuracy, f1_macro and loss of a classification run's head on a task file."""
    started = time.perf_counter()
    model, tokenizer, saved = load_classifier(path, device)
    labels = saved.finetune.labels
    ft = replace(cfg.finetune, format="classification", labels=labels)
    records = read_records(data, ft)
    encoder = ExampleEncoder(tokenizer, ft, model.cfg.block_size, labels=labels)
    examples, report = encoder.encode_all(records, "evaluation")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    collate = ex.classification_collate(examples, pad)
    batches = [
        collate(list(range(i, min(i + batch_size, len(examples)))))
        for i in range(0, len(examples), batch_size)
    ]
    scores = classification_scores(*classify(model, batches, torch.device(device)), len(labels), prefix="")
    metrics = {"accuracy": scores["accuracy"], "f1_macro": scores["f1_macro"], "loss": scores["loss"]}
    return EvalResult("classification", len(examples), metrics, report.dropped, time.perf_counter() - started)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str]) -> dict[str, float]:
    """Mean next-token loss over every text (each after an EOS, as documents follow one in pretraining)."""
    window = model.cfg.block_size
    batches, n_bytes = [], 0
    for text in texts:
        tokens = torch.tensor([tokenizer.eos_id, *tokenizer.encode(text)])
        n_bytes += len(text.encode("utf-8"))
        for start in range(0, len(tokens) - 1, window):
            chunk = tokens[start : start + window + 1]
            batches.append({"input_ids": chunk[None, :-1], "labels": chunk[None, 1:]})
    loss_sum, count = summed_lm_loss(model, batches) if batches else (0.0, 0.0)
    return {**lm_metrics(loss_sum, count, n_bytes, prefix=""), "tokens": float(count)}


# --------------------------------------------------------------------------------------------
# The command


def evaluate_run(
    path: str | Path,
    data: str,
    task: str,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    limit: int = 0,
    overrides: list[str] | None = None,
    device: str = "cpu",
    candidates: int = 2000,
    beams: int = 1,
    length_penalty: float = 1.0,
) -> EvalResult:
    """Load a run (LoRA merged), read `data` as the task's format and compute the task's metrics.
    Memorization needs no data: it reads the run's canaries and shards (`limit` = documents)."""
    if task not in EVAL_TASKS:
        raise LmkilnError(f"unknown task {task!r}; valid: {', '.join(EVAL_TASKS)}")
    if batch_size <= 0 or max_new_tokens <= 0:
        raise LmkilnError("--batch-size and --max-new-tokens must be positive")
    if beams < 1:
        raise LmkilnError(f"--beams must be at least 1, got {beams}")
    if task == "memorization":
        from lmkiln.eval.memorization import evaluate_memorization

        return evaluate_memorization(path, candidates, limit or 200, device)
    if not data:
        raise LmkilnError(f"--task {task} needs --data FILE (the task file to evaluate on)")
    _, checkpoint = find_checkpoint(path)
    saved = ckpt.read_checkpoint(checkpoint).trainer["config"]
    cfg = saved_config(saved, f"{checkpoint}/trainer.json")
    if overrides:  # the finetune section says how to read the task file, whatever task trained the run
        layers = [
            ("run", flatten(to_dict(cfg, every_section=True))),
            ("command line", parse_overrides(overrides)),
        ]
        cfg = build_config(layers, check_sections=False)
    is_classifier = (
        saved.get("task") == "finetune" and saved.get("finetune", {}).get("format") == "classification"
    )
    if task == "classification" and is_classifier:
        return evaluate_classifier(path, cfg, data, batch_size, device)
    if is_classifier:
        raise LmkilnError(
            f"{path} is a classification run (a classification head); evaluate it with --task classification"
        )
    loaded = load_run(path, device=device)
    if task == "perplexity":
        field_name = dict(p.split("=", 1) for p in cfg.finetune.fields if "=" in p).get("text", "text")
        texts = [_row_text(row, field_name, where) for where, row in iter_rows(data)]
        texts = texts[:limit] if limit else texts
        started = time.perf_counter()
        metrics = perplexity(loaded.model, loaded.tokenizer, texts)
        return EvalResult(task, len(texts), metrics, seconds=time.perf_counter() - started)
    ft = replace(cfg.finetune, format=task)
    if task == "preference" and saved.get("finetune", {}).get("format") != task:
        # Another format's prompt template (e.g. an SFT run's "{{ instruction }}") names other fields.
        given = any(o.lstrip("-").startswith("finetune.prompt") for o in overrides or [])
        ft = ft if given else replace(ft, prompt="")
    records = read_records(data, ft)
    records = records[:limit] if limit else records
    if task == "preference":
        return evaluate_preference(loaded.model, loaded.tokenizer, records, ft, batch_size)
    log.info("%s: %d examples from %s (%s)", task, len(records), data, to_dict(ft)["format"])
    return evaluate_generation(
        loaded.model,
        loaded.tokenizer,
        records,
        ft,
        max_new_tokens,
        batch_size,
        label_set=cfg.finetune.labels,
        beams=beams,
        length_penalty=length_penalty,
    )


@torch.no_grad()
def evaluate_preference(
    model: nn.Module, tokenizer: Tokenizer, records: Sequence, ft: FinetuneConfig, batch_size: int
) -> EvalResult:
    """How often the model gives the chosen reply a higher log-probability than the rejected one
    (ties count half), the mean margin and the mean log-probabilities: no reference model."""
    started = time.perf_counter()
    chat = chat_template_of(tokenizer) if records and records[0].messages else None
    encoder = ExampleEncoder(tokenizer, ft, ft.max_length or model.cfg.block_size, chat)
    pairs, report = encode_pairs(encoder, records, "evaluation")
    collate = preference_collate(
        pairs, tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    )
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate(list(range(start, min(start + batch_size, len(pairs)))))
        sums = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})[0].float().cpu()
        good, bad = sums.chunk(2)
        chosen.append(good)
        rejected.append(bad)
    good, bad = torch.cat(chosen), torch.cat(rejected)
    margin = good - bad
    metrics = {
        "accuracy": float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean()),
        "margin": float(margin.mean()),
        "logps_chosen": float(good.mean()),
        "logps_rejected": float(bad.mean()),
    }
    return EvalResult("preference", len(pairs), metrics, report.dropped, time.perf_counter() - started)


def _row_text(row: dict, field_name: str, where: str) -> str:
    value = row.get(field_name)
    if not isinstance(value, str) or not value:
        raise LmkilnError(
            f"{where}: missing field {field_name!r} (the text to score; rename with finetune.fields text=COLUMN)"
        )
    return value


def write_result(result: EvalResult, out: Path, extra: dict) -> Path:
    return write_json_atomic(out, {**extra, **asdict(result)})
