"""Fine-tuning: a base model + a task file → a `TrainSetup` for THE training loop → a tuned run.

    load_base ─ tokenizer (+ template tokens) ─ records ─ token examples (masking, EOS, length policy)
              ─ resolved config ─ model (+ head) ─ method (full / freeze / LoRA) ─ padded or packed
              epoch batches ─ TrainLoop.fit ─ adapter + merged export ─ generation check (task metric,
              EOS share, through `lmkiln.eval`)

The run directory looks like a pretraining run (config.yaml, tokenizer/, checkpoints/), so
`lmkiln generate`, `lmkiln eval` and the exporters load it with `lmkiln.runs.load.load_run`,
which folds LoRA adapters into the weights. The base may be a Hugging Face directory
(`lmkiln.interop`), which is why this task is assembled here and not in `lmkiln.finetune`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmkiln.config import Config, FinetuneConfig, ModelConfig, ResolvedConfig, resolve, to_dict, to_yaml
from lmkiln.config.resolve import METHOD_NAMES
from lmkiln.data import task_examples as ex
from lmkiln.data.formats import Record
from lmkiln.data.loader import epoch_stream
from lmkiln.data.preference import PreferencePair, encode_pairs, preference_collate
from lmkiln.data.templates import chat_template_of
from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.files import write_json_atomic
from lmkiln.finetune.methods import MethodSetup, apply_method, exclude_from_weight_decay, save_adapter
from lmkiln.finetune.preference import precompute_reference, preference_loss, reference_kind
from lmkiln.finetune.prepare import (
    build_finetune_model,
    check_finetune_config,
    grown_model_config,
    prepare_tokenizer,
    resolve_labels,
    split_records,
    uses_chat,
)
from lmkiln.model.lora import lora_scaling, merge_lora_tensors
from lmkiln.model.transformer import Transformer
from lmkiln.runs import checkpoint as ckpt
from lmkiln.runs.load import find_checkpoint, load_run
from lmkiln.runs.rundir import open_run_dir
from lmkiln.runs.tensors import model_tensors
from lmkiln.train.distributed import parallelize
from lmkiln.train.evaluate import Evaluator, classification_evaluator, lm_evaluator
from lmkiln.train.loop import FitResult, TrainLoop, TrainSetup
from lmkiln.train.objectives import ClassificationLoss, LanguageModelLoss
from lmkiln.train.optim import build_optimizer
from lmkiln.train.preference import PreferenceLoss, preference_evaluator
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
    run_dir, checkpoint = find_checkpoint(path)
    if not (run_dir / "tokenizer" / "tokenizer.json").is_file():
        raise LmkilnError(
            f"base model directory {run_dir} has no tokenizer (tokenizer/tokenizer.json); a base needs the "
            f"tokenizer it was trained with"
        )
    loaded = load_run(path)
    return Base(loaded.model, loaded.tokenizer, copy.deepcopy(loaded.cfg.model), str(checkpoint.resolve()))


def scratch_base(cfg: Config, records: list[Record]) -> Base:
    """finetune.base=scratch: a seeded random model of scratch_preset and a byte-level BPE trained
    on the training records' text (prompt fields and targets; validation text is not seen)."""
    from lmkiln.config import MODEL_PRESETS
    from lmkiln.data.tokenizer import train_bpe

    ft = cfg.finetune
    if ft.scratch_preset not in MODEL_PRESETS:
        raise LmkilnError(
            f"unknown finetune.scratch_preset {ft.scratch_preset!r}; valid: {', '.join(MODEL_PRESETS)}"
        )
    texts = (text for r in records for text in (*r.values.values(), *r.targets) if text)
    tokenizer = train_bpe(texts, ft.scratch_vocab)
    shape = {
        **MODEL_PRESETS[ft.scratch_preset],
        "vocab_size": tokenizer.vocab_size,
        "preset": ft.scratch_preset,
    }
    model_cfg = dataclasses.replace(ModelConfig(), **shape)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(model_cfg)
    source = f"scratch:{ft.scratch_preset}:vocab{tokenizer.vocab_size}:seed{cfg.train.seed}"
    return Base(model, tokenizer, model_cfg, source)


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
    notes: tuple[str, ...] = ()
    """Values chosen for the method, with why (`lmkiln.config.resolve.method_defaults`)."""

    def summary(self) -> str:
        from lmkiln.train.observe import format_count, format_duration

        ft, state = self.cfg.finetune, self.fit.state
        share = self.method.trainable / max(self.method.total, 1)
        lines = [
            f"fine-tuned {ft.format} ({ft.method}{'' if ft.objective == 'sft' else ', ' + ft.objective}): "
            f"{format_count(self.method.trainable)} trainable of "
            f"{format_count(self.method.total)} parameters ({share:.2%}); {state.step} steps, "
            f"{state.epoch} epoch{'' if state.epoch == 1 else 's'} in {format_duration(state.train_seconds)}",
            *self.notes,
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


@dataclass
class TaskData:
    """The encoded examples of a run and how its training set is cut into rows."""

    train: list[ex.TokenExample] | list[PreferencePair]
    val: list[ex.TokenExample] | list[PreferencePair]
    lengths: dict[str, ex.LengthReport]
    packed_rows: list | None = None
    """The packing plan (examples per row) with finetune.packing, else None."""

    @property
    def size(self) -> int:
        """Training rows per epoch."""
        return len(self.packed_rows) if self.packed_rows is not None else len(self.train)


def encode_examples(
    cfg: Config,
    tokenizer: Tokenizer,
    train: list[Record],
    val: list[Record],
    labels: list[str],
    max_length: int,
) -> TaskData:
    ft = cfg.finetune
    chat = chat_template_of(tokenizer) if uses_chat(ft, train + val) else None
    encoder = ex.ExampleEncoder(tokenizer, ft, max_length, chat, labels)
    if ft.format == "preference":
        train_examples, train_report = encode_pairs(encoder, train, "train")
        val_examples, val_report = encode_pairs(encoder, val, "validation")
    else:
        train_examples, train_report = encoder.encode_all(train, "train")
        val_examples, val_report = encoder.encode_all(val, "validation")
    if not train_examples:
        raise LmkilnError(
            f"every training example is longer than finetune.max_length={max_length} tokens "
            f"(overlong={ft.overlong}); raise max_length or use overlong=truncate"
        )
    rows = None
    if ft.packing:
        rows = ex.pack_plan([len(e.input_ids) for e in train_examples], max_length, cfg.train.seed)
        log.info("packing: %d examples into %d rows of %d tokens", len(train_examples), len(rows), max_length)
    lengths = {"train": train_report, "validation": val_report}
    return TaskData(train_examples, val_examples, lengths, rows)


def finetune(
    cfg: Config,
    resume: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    runtime: Runtime | None = None,
) -> FinetuneResult:
    started = time.perf_counter()
    check_finetune_config(cfg)
    ft = cfg.finetune
    runtime = runtime or Runtime.start(cfg.train, cfg.dist)
    train_records, val_records = split_records(cfg)  # data mistakes show before a large base loads
    labels = resolve_labels(ft, train_records, val_records) if ft.format == "classification" else []
    if ft.base == "scratch":
        base = scratch_base(cfg, train_records)
    else:
        base = load_base(ft.base, max_context=ft.max_length or None)
    tokenizer, new_rows = prepare_tokenizer(base.tokenizer, ft, uses_chat(ft, train_records + val_records))
    max_length = ft.max_length or base.model_cfg.block_size
    if max_length > base.model_cfg.block_size:
        raise LmkilnError(
            f"finetune.max_length {max_length} exceeds the base model's context of {base.model_cfg.block_size}"
        )
    data = encode_examples(cfg, tokenizer, train_records, val_records, labels, max_length)
    derived = {"train.seq_len": max_length}
    if labels:
        derived["finetune.labels"] = labels
    run = resolve(
        cfg,
        runtime.world_size,
        model=grown_model_config(base.model_cfg, new_rows),
        examples=data.size,
        derived=derived,
    )
    cfg, ft = run.cfg, run.cfg.finetune
    for note in run.notes:
        log.info("%s", note)
    model, backbone = build_finetune_model(base.model, cfg, new_rows, labels, runtime.device)
    method = apply_method(model, backbone, ft, new_rows)
    log.info(
        "method %s: %d of %d parameters trainable (%.2f%%)",
        ft.method,
        method.trainable,
        method.total,
        100 * method.trainable / max(method.total, 1),
    )
    run_dir = open_run_dir(
        cfg,
        is_main=runtime.is_main,
        barrier=runtime.barrier,
        resume=resume,
        overwrite=overwrite,
        tokenizer=tokenizer,
    )
    check: dict = {}
    fresh = not resume or ckpt.latest_checkpoint(run_dir / "checkpoints") is None
    # Generation runs on the main process alone, which a sharded (FSDP) model cannot do.
    sharded = runtime.distributed and cfg.dist.strategy == "fsdp"
    generative = ft.format not in ("classification", "preference")  # those have no task metric
    checking = runtime.is_main and ft.eval_samples > 0 and generative and val_records
    checking = checking and not sharded
    if checking and fresh:
        check["before"] = generation_check(model, tokenizer, val_records, ft)
    setup = _train_setup(run, runtime, model, tokenizer, data, labels, base, method)
    result = TrainLoop(setup, run, runtime, run_dir).fit(resume=resume, force=force)
    model.eval()
    if checking:
        check["after"] = generation_check(model, tokenizer, val_records, ft)
    if runtime.is_main:
        _write_outputs(run_dir, cfg, model, method, result, check, started)
    runtime.barrier()
    return FinetuneResult(
        run_dir,
        result,
        model,
        tokenizer,
        cfg,
        method,
        data.lengths,
        check,
        time.perf_counter() - started,
        run.notes,
    )


def eval_batches(examples: list[ex.TokenExample], micro: int, collate) -> list[dict[str, torch.Tensor]]:
    """The validation set in micro-batches of consecutive examples."""
    return [
        collate(list(range(start, min(start + micro, len(examples)))))
        for start in range(0, len(examples), micro)
    ]


def _train_setup(
    run: ResolvedConfig,
    runtime: Runtime,
    model: nn.Module,
    tokenizer: Tokenizer,
    data: TaskData,
    labels: list[str],
    base: Base,
    method: MethodSetup,
) -> TrainSetup:
    cfg = run.cfg
    ft, tcfg, micro = cfg.finetune, cfg.train, run.batch.micro_batch_size
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    evaluate = None
    if ft.format == "preference":
        collate, objective, evaluate = _preference_data(ft, model, data, method, micro, pad, runtime.device)
    elif ft.format == "classification":
        collate, objective = ex.classification_collate(data.train, pad), ClassificationLoss()
        if data.val:
            val = eval_batches(data.val, micro, ex.classification_collate(data.val, pad))
            evaluate = classification_evaluator(val, len(labels))
    else:
        if data.packed_rows is not None:
            collate = ex.packed_collate(data.train, data.packed_rows, tcfg.seq_len, pad)
        else:
            collate = ex.padded_collate(data.train, pad)
        objective = LanguageModelLoss()
        if data.val:
            evaluate = lm_evaluator(eval_batches(data.val, micro, ex.padded_collate(data.val, pad)))
    # preference rows are (chosen, rejected) pairs with lengths of their own: kept in random order
    grouped = ft.group_by_length and data.packed_rows is None and ft.format != "preference"
    lengths = [len(e.input_ids) for e in data.train] if grouped else None
    batches = epoch_stream(data.size, run.batch, tcfg.seed, runtime.rank, collate, lengths)
    fingerprint = {
        "base": base.source,
        "tokenizer": tokenizer.fingerprint[:16],
        "data": _file_identity(ft.data),
        "examples": data.size,
        "train.batch_size": tcfg.batch_size,
        "train.micro_batch_size": micro,
        "world_size": runtime.world_size,
        **{
            f"finetune.{k}": getattr(ft, k)
            for k in ("format", "method", "packing", "group_by_length", "max_length", "lora_r")
        },
        **(
            {f"finetune.{k}": getattr(ft, k) for k in ("objective", "beta", "reference")}
            if ft.objective != "sft"
            else {}
        ),
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
        total_steps=run.total_steps,
        evaluate=evaluate,
        fingerprint=fingerprint,
        tokens_in=ex.real_tokens,
        epoch_of=lambda: batches.epoch,
        stall_hint=f"the learning rate ({cfg.optim.lr:g}) may be too low for {METHOD_NAMES[ft.method]}; "
        f"raise optim.lr",
    )


def _preference_data(
    ft: FinetuneConfig,
    model: nn.Module,
    data: TaskData,
    method: MethodSetup,
    micro: int,
    pad: int,
    device: torch.device,
) -> tuple[Callable[[list[int]], dict], PreferenceLoss, Evaluator | None]:
    """(collate, objective, evaluator) of a DPO/ORPO run. A precomputed reference is scored here by
    the untrained model — on resume too: the base is loaded again, the checkpoint only later."""
    objective = preference_loss(ft, method.peft_model)
    train_ref = val_ref = None
    if reference_kind(ft) == "precomputed":
        train_ref = precompute_reference(model, data.train, micro, pad, device)
        val_ref = precompute_reference(model, data.val, micro, pad, device) if data.val else None
    collate = preference_collate(data.train, pad, train_ref)
    evaluate = None
    if data.val:
        evaluate = preference_evaluator(
            eval_batches(data.val, micro, preference_collate(data.val, pad, val_ref)), objective
        )
    return collate, objective, evaluate


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
    write_json_atomic(run_dir / CHECK_FILE, figures)


def export_merged(run_dir: Path, cfg: Config, model: nn.Module, step: int) -> Path:
    """run_dir/merged: a standalone model directory with the adapters folded into the weights."""
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
