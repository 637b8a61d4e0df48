"""Fine-tuning: a base model + a task file → a `TrainSetup` for THE training loop → a tuned run.

    load_base ─ tokenizer (+ template tokens) ─ records ─ token examples (masking, EOS, length policy)
              ─ model (+ head) ─ method (full / freeze / LoRA) ─ padded or packed epoch batches
              ─ TrainLoop.fit ─ adapter + merged export ─ generation check (task metric, EOS share)

The run directory looks like a pretraining run (config.yaml, tokenizer/, checkpoints/), so
`lmkiln generate`, `lmkiln eval` and the exporters load it with `lmkiln.infer.load.load_run`,
which folds LoRA adapters into the weights.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmkiln.config import Config, FinetuneConfig, ModelConfig, to_dict, to_yaml
from lmkiln.data.loader import epoch_stream
from lmkiln.data.tokenizer import CHATML_TEMPLATE, IM_END, IM_START, Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.finetune import examples as ex
from lmkiln.finetune.formats import Record, read_records
from lmkiln.finetune.methods import (
    MethodSetup,
    apply_method,
    exclude_from_weight_decay,
    merge_lora_tensors,
    resize_vocab,
    save_adapter,
)
from lmkiln.finetune.templates import chat_template_of
from lmkiln.model.kernels import swap_linears
from lmkiln.model.transformer import Transformer
from lmkiln.train import checkpoint as ckpt
from lmkiln.train.distributed import parallelize
from lmkiln.train.loop import FitResult, TrainLoop, TrainSetup, model_tensors
from lmkiln.train.objectives import LanguageModelLoss
from lmkiln.train.optim import build_optimizer
from lmkiln.train.run import prepare_run_dir, run_dir_of
from lmkiln.train.runtime import Runtime
from lmkiln.train.state import TrainState

log = logging.getLogger("lmkiln")

CHECK_FILE = "finetune_eval.json"


# --------------------------------------------------------------------------------------------
# The base model and its tokenizer


@dataclass
class Base:
    model: Transformer
    tokenizer: Tokenizer
    model_cfg: ModelConfig
    source: str
    """What was loaded (a checkpoint directory), for the resume fingerprint and the summary."""


def _is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "checkpoints").exists()


def load_base(path: str | Path, max_context: int | None = None) -> Base:
    """An lmkiln run directory (or checkpoint), or a local Hugging Face model directory.

    max_context caps the context of an imported model (a Llama 3 config allows 131,072 positions).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise LmkilnError(
            f"base model not found: {path} (give an lmkiln run directory or a local Hugging Face model "
            f"directory; lmkiln never downloads models)"
        )
    if _is_hf_directory(path):
        from lmkiln.interop.hf_import import load_hf_model

        imported = load_hf_model(path, max_context=max_context)
        return Base(imported.model, imported.tokenizer, imported.config, str(path.resolve()))
    from lmkiln.infer.load import find_checkpoint, load_run

    run_dir, checkpoint = find_checkpoint(path)
    if not (run_dir / "tokenizer" / "tokenizer.json").is_file():
        raise LmkilnError(
            f"base model directory {run_dir} has no tokenizer (tokenizer/tokenizer.json); a base needs the "
            f"tokenizer it was trained with"
        )
    loaded = load_run(path)
    return Base(loaded.model, loaded.tokenizer, copy.deepcopy(loaded.cfg.model), str(checkpoint.resolve()))


def prepare_tokenizer(tokenizer: Tokenizer, cfg: FinetuneConfig) -> tuple[Tokenizer, list[int]]:
    """The fine-tuning tokenizer and the ids of tokens it adds (they need new embedding rows).

    Chat adds the ChatML markers when the tokenizer has no template of its own and lacks them,
    and its EOS becomes the template's end-of-turn token: generation and any tool reading the
    saved tokenizer then stop where an assistant turn ends.
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    wanted = list(cfg.add_tokens)
    template = tokenizer.chat_template
    if cfg.format == "chat" and not template:
        template = CHATML_TEMPLATE
        wanted = [IM_START, IM_END, *wanted]
    missing = [t for t in dict.fromkeys(wanted) if tokenizer.token_id(t) is None]
    hf = HFTokenizer.from_str(tokenizer.json)
    if missing:
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    eos = tokenizer.eos_token
    if cfg.format == "chat":
        probe = Tokenizer(
            hf, chat_template=template, eos_token=eos, pad_token=tokenizer.pad_token, fast=False
        )
        names = {probe.decode([i]) for i in probe.special_ids}
        eos = chat_template_of(probe).end_of_turn(names)
        if eos is None:
            raise LmkilnError(
                "the chat template closes assistant turns with no special token, so generation could not "
                "stop; use a template with an end-of-turn token (ChatML: <|im_end|>)"
            )
    tuned = Tokenizer(
        hf,
        chat_template=template,
        eos_token=eos,
        pad_token=tokenizer.pad_token,
        bos_token=tokenizer.bos_token,
        fast=tokenizer.fast_path != "tokenizers",
    )
    return tuned, [tuned.token_id(t) for t in missing]


# --------------------------------------------------------------------------------------------
# Data


def split_records(cfg: Config) -> tuple[list[Record], list[Record]]:
    ft = cfg.finetune
    train = read_records(ft.data, ft)
    if ft.val_data:
        return train, read_records(ft.val_data, ft)
    if not 0 <= ft.val_fraction < 1:
        raise LmkilnError(f"finetune.val_fraction must be in [0, 1), got {ft.val_fraction}")
    n_val = int(round(len(train) * ft.val_fraction))
    if n_val >= len(train):
        raise LmkilnError(
            f"{ft.data}: {len(train)} examples leave none for training after the validation split"
        )
    order = np.random.default_rng([cfg.train.seed, 11]).permutation(len(train))
    held = set(order[:n_val].tolist())
    return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]


def resolve_labels(cfg: FinetuneConfig, train: list[Record], val: list[Record]) -> list[str]:
    labels = list(cfg.labels) or sorted({r.targets[0] for r in train})
    for record in val:
        if record.targets[0] not in labels:
            raise LmkilnError(
                f"{record.location}: label {record.targets[0]!r} does not occur in the training data "
                f"({', '.join(labels)}); declare the label set with finetune.labels"
            )
    if len(labels) < 2:
        raise LmkilnError(f"classification needs at least two labels, found {labels}")
    return labels


def lm_evaluator(examples: list[ex.TokenExample], micro: int, pad_id: int):
    """Validation loss and perplexity of the target tokens (prompt tokens are not scored)."""
    collate = ex.padded_collate(examples, pad_id)
    objective = LanguageModelLoss()

    def evaluate(model: nn.Module, runtime: Runtime) -> dict[str, float]:
        loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
        count = torch.zeros((), device=runtime.device, dtype=torch.float64)
        for index, start in enumerate(range(0, len(examples), micro)):
            if index % runtime.world_size != runtime.rank:
                continue
            batch = collate(list(range(start, min(start + micro, len(examples)))))
            batch = {k: v.to(runtime.device) for k, v in batch.items()}
            loss_sum += objective(model, batch).double()
            count += objective.count(batch).double()
        runtime.all_reduce_sum(loss_sum)
        runtime.all_reduce_sum(count)
        loss = (loss_sum / count.clamp(min=1)).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    return evaluate


# --------------------------------------------------------------------------------------------
# Result


@dataclass
class FinetuneResult:
    run_dir: Path
    fit: FitResult
    model: nn.Module
    tokenizer: Tokenizer
    cfg: Config
    method: MethodSetup
    lengths: dict[str, ex.LengthReport]
    check: dict = field(default_factory=dict)
    """Generation check on validation prompts: {"before": metrics, "after": metrics}."""
    wall_seconds: float = 0.0

    def summary(self) -> str:
        from lmkiln.train.observe import format_count, format_duration

        ft, state = self.cfg.finetune, self.fit.state
        share = self.method.trainable / max(self.method.total, 1)
        lines = [
            f"fine-tuned {ft.format} ({ft.method}): {format_count(self.method.trainable)} trainable of "
            f"{format_count(self.method.total)} parameters ({share:.2%}); {state.step} steps, "
            f"{state.epoch} epoch{'' if state.epoch == 1 else 's'} in {format_duration(state.train_seconds)}",
            *(r.describe(split, self.cfg.train.seq_len, ft.overlong) for split, r in self.lengths.items()),
        ]
        before, after = self.fit.first_eval, self.fit.last_eval
        monitor = self.cfg.train.monitor
        if monitor in after:
            start = f"{before[monitor]:.4f} → " if monitor in before else ""
            lines.append(
                f"validation {monitor} {start}{after[monitor]:.4f}; stopped by {self.fit.stop_reason}"
            )
        for name in ("before", "after"):
            if name in self.check:
                shown = ", ".join(f"{k} {v:.3f}" for k, v in self.check[name]["metrics"].items())
                lines.append(f"generation check {name} ({self.check[name]['examples']} prompts): {shown}")
        extras = ", adapter/" if (self.run_dir / "adapter").is_dir() else ""
        extras += ", merged/" if (self.run_dir / "merged").is_dir() else ""
        lines.append(
            f"run directory: {self.run_dir} (config.yaml, tokenizer/, checkpoints/{extras}, {CHECK_FILE})"
        )
        data = ft.val_data or ft.data
        task = "classification" if ft.format == "classification" else ft.format
        lines.append(f"next:\n  lmkiln eval {self.run_dir} --data {data} --task {task}   # task metrics")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Building and running


def _check_config(cfg: Config) -> None:
    ft = cfg.finetune
    if not ft.base:
        raise LmkilnError("fine-tuning needs a base model: --base RUN_DIR (finetune.base)")
    if not ft.data:
        raise LmkilnError("fine-tuning needs training data: --data FILE (finetune.data)")
    if ft.packing and ft.format == "classification":
        raise LmkilnError("finetune.packing applies to generative formats, not classification")
    if ft.max_length < 0 or ft.eval_samples < 0 or ft.max_new_tokens <= 0:
        raise LmkilnError("finetune.max_length and finetune.eval_samples must be ≥ 0, max_new_tokens > 0")


def build_model(base: Base, cfg: Config, new_rows: list[int], labels: list[str], device: torch.device):
    """(model, backbone): the backbone on the device, grown for new tokens, maybe under a head."""
    backbone = base.model.to(device)
    backbone.cfg = cfg.model
    if new_rows:
        resize_vocab(backbone, max(cfg.model.vocab_size, max(new_rows) + 1), new_rows)
    swap_linears(backbone, cfg.train.cpu_matmul)  # before LoRA wraps the layers
    torch.manual_seed(cfg.train.seed)  # head and adapter initialisation
    if cfg.finetune.format == "classification":
        from lmkiln.finetune.classify import SequenceClassifier

        return SequenceClassifier(backbone, len(labels), cfg.finetune.pooling).to(device), backbone
    return backbone, backbone


def finetune(
    cfg: Config,
    resume: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    runtime: Runtime | None = None,
) -> FinetuneResult:
    started = time.perf_counter()
    _check_config(cfg)
    ft = cfg.finetune
    runtime = runtime or Runtime.start(cfg.train, cfg.dist)
    train_records, val_records = split_records(cfg)  # data mistakes show before a large base loads
    labels: list[str] = []
    if ft.format == "classification":
        labels = ft.labels = resolve_labels(ft, train_records, val_records)
    base = load_base(ft.base, max_context=ft.max_length or None)
    tokenizer, new_rows = prepare_tokenizer(base.tokenizer, ft)
    cfg.model = copy.deepcopy(base.model_cfg)
    max_length = ft.max_length or cfg.model.block_size
    if max_length > cfg.model.block_size:
        raise LmkilnError(
            f"finetune.max_length {max_length} exceeds the base model's context of {cfg.model.block_size}"
        )
    cfg.train.seq_len = max_length

    model, backbone = build_model(base, cfg, new_rows, labels, runtime.device)
    method = apply_method(model, backbone, ft, new_rows)
    chat = chat_template_of(tokenizer) if ft.format == "chat" else None
    encoder = ex.ExampleEncoder(tokenizer, ft, max_length, chat, labels)
    train_examples, train_report = encoder.encode_all(train_records, "train")
    val_examples, val_report = encoder.encode_all(val_records, "validation")
    if not train_examples:
        raise LmkilnError(
            f"every training example is longer than finetune.max_length={max_length} tokens "
            f"(overlong={ft.overlong}); raise max_length or use overlong=truncate"
        )
    log.info(
        "method %s: %d of %d parameters trainable (%.2f%%)",
        ft.method,
        method.trainable,
        method.total,
        100 * method.trainable / max(method.total, 1),
    )

    if runtime.is_main:
        run_dir = prepare_run_dir(cfg, resume=resume, overwrite=overwrite)
        tokenizer.save(run_dir / "tokenizer")
    runtime.barrier()
    if not runtime.is_main:
        run_dir = run_dir_of(cfg)

    check: dict = {}
    fresh = not resume or ckpt.latest_checkpoint(run_dir / "checkpoints") is None
    # Generation runs on the main process alone, which a sharded (FSDP) model cannot do.
    sharded = runtime.distributed and cfg.dist.strategy == "fsdp"
    checking = runtime.is_main and ft.eval_samples > 0 and ft.format != "classification" and val_records
    checking = checking and not sharded
    if checking and fresh:
        check["before"] = generation_check(model, tokenizer, val_records, ft)
    setup = _train_setup(cfg, runtime, model, tokenizer, train_examples, val_examples, labels, base, method)
    result = TrainLoop(setup, cfg, runtime, run_dir).fit(resume=resume, force=force)
    model.eval()
    if checking:
        check["after"] = generation_check(model, tokenizer, val_records, ft)
    if runtime.is_main:
        _write_outputs(run_dir, cfg, model, method, result, check, started)
    runtime.barrier()
    lengths = {"train": train_report, "validation": val_report}
    return FinetuneResult(
        run_dir, result, model, tokenizer, cfg, method, lengths, check, time.perf_counter() - started
    )


def _train_setup(
    cfg: Config,
    runtime: Runtime,
    model: nn.Module,
    tokenizer: Tokenizer,
    train: list[ex.TokenExample],
    val: list[ex.TokenExample],
    labels: list[str],
    base: Base,
    method: MethodSetup,
) -> TrainSetup:
    ft, tcfg = cfg.finetune, cfg.train
    micro = tcfg.micro_batch_size or tcfg.batch_size
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    if ft.format == "classification":
        from lmkiln.finetune.classify import ClassificationLoss, classification_evaluator

        size, collate = len(train), ex.classification_collate(train, pad)
        objective = ClassificationLoss()
        evaluate = classification_evaluator(val, len(labels), micro, pad) if val else None
    elif ft.packing:
        rows = ex.pack_plan([len(e.input_ids) for e in train], tcfg.seq_len, tcfg.seed)
        log.info("packing: %d examples into %d rows of %d tokens", len(train), len(rows), tcfg.seq_len)
        size, collate = len(rows), ex.packed_collate(train, rows, tcfg.seq_len, pad)
        objective, evaluate = LanguageModelLoss(), lm_evaluator(val, micro, pad) if val else None
    else:
        size, collate = len(train), ex.padded_collate(train, pad)
        objective, evaluate = LanguageModelLoss(), lm_evaluator(val, micro, pad) if val else None
    batches, total = epoch_stream(size, tcfg, runtime.rank, runtime.world_size, collate)
    fingerprint = {
        "base": base.source,
        "tokenizer": tokenizer.fingerprint[:16],
        "data": _file_identity(ft.data),
        "examples": size,
        "train.batch_size": tcfg.batch_size,
        "train.micro_batch_size": micro,
        "world_size": runtime.world_size,
        **{f"finetune.{k}": getattr(ft, k) for k in ("format", "method", "packing", "max_length", "lora_r")},
    }
    train_model = parallelize(model, cfg, runtime)  # before the optimizer: FSDP2 shards parameters
    optimizer = build_optimizer(model, cfg.optim)
    exclude_from_weight_decay(optimizer, method.row_masked)
    return TrainSetup(
        model=model,
        train_model=train_model,
        objective=objective,
        train_batches=batches,
        optimizer=optimizer,
        total_steps=total,
        evaluate=evaluate,
        fingerprint=fingerprint,
        tokens_in=ex.real_tokens,
        epoch_of=lambda: batches.epoch,
    )


def _file_identity(path: str) -> str:
    stat = Path(path).expanduser().stat()
    return f"{Path(path).name}:{stat.st_size}"


def generation_check(
    model: nn.Module, tokenizer: Tokenizer, records: list[Record], ft: FinetuneConfig
) -> dict:
    """Task metric and EOS share of greedy generations on the first validation prompts."""
    from lmkiln.eval.runner import evaluate_generation

    was_training = model.training
    model.eval()
    result = evaluate_generation(model, tokenizer, records[: ft.eval_samples], ft, ft.max_new_tokens, 16)
    model.train(was_training)
    log.info(
        "generation check (%d prompts): %s",
        result.examples,
        ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items()),
    )
    return {"examples": result.examples, "metrics": result.metrics, "samples": result.samples}


def _write_outputs(
    run_dir: Path,
    cfg: Config,
    model: nn.Module,
    method: MethodSetup,
    fit: FitResult,
    check: dict,
    started: float,
) -> None:
    """The adapter alone, the merged model (LoRA), and the figures of the run as JSON."""
    ft = cfg.finetune
    if ft.method == "lora":
        save_adapter(method, model, run_dir / "adapter", run_dir / "tokenizer")
        if ft.export_merged and ft.format != "classification":
            export_merged(run_dir, cfg, model, fit.state.step)
    figures = {
        "format": ft.format,
        "method": ft.method,
        "trainable_parameters": method.trainable,
        "total_parameters": method.total,
        "steps": fit.state.step,
        "epochs": fit.state.epoch,
        "train_seconds": fit.state.train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "first_eval": fit.first_eval,
        "last_eval": fit.last_eval,
        **check,
    }
    (run_dir / CHECK_FILE).write_text(
        json.dumps(figures, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def export_merged(run_dir: Path, cfg: Config, model: nn.Module, step: int) -> Path:
    """run_dir/merged: a standalone model directory with the adapters folded into the weights."""
    from lmkiln.finetune.methods import lora_scaling

    target = run_dir / "merged"
    tensors = merge_lora_tensors(model_tensors(model), lora_scaling(cfg.finetune))
    merged_cfg = copy.deepcopy(cfg)
    merged_cfg.finetune.method = "full"  # plain weights now; nothing left to merge
    trainer = {"format": ckpt.FORMAT, "state": asdict(TrainState(step=step)), "config": to_dict(merged_cfg)}
    ckpt.write_checkpoint(target / "checkpoints", step, ckpt.CheckpointData(tensors, {}, {}, trainer))
    ckpt.prune_checkpoints(target / "checkpoints", 1, set())
    Tokenizer.load(run_dir / "tokenizer").save(target / "tokenizer")
    (target / "config.yaml").write_text(to_yaml(merged_cfg), encoding="utf-8")
    return target
