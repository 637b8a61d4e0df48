"""Language-model pretraining: corpus → tokenizer → shards → transformer → the training loop.

The task that `lmkiln train` runs by default. It may start from another run or a Hugging Face
model (`train.init_from`, through `lmkiln.interop`), and ends with a sample (`lmkiln.infer`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmkiln.config import Config, ModelConfig, ResolvedConfig, resolve
from lmkiln.data.canaries import write_record as write_canary_record
from lmkiln.data.cleaning import describe_cleaning
from lmkiln.data.loader import RandomWindows, eval_windows
from lmkiln.data.prepare import TokenizerReport, prepare_data
from lmkiln.data.shards import PrepareReport, TokenShards
from lmkiln.data.tokenizer import Tokenizer
from lmkiln.model.kernels import swap_linears
from lmkiln.model.transformer import Transformer, count_parameters, training_flops_per_token
from lmkiln.runs.rundir import open_run_dir
from lmkiln.runs.tensors import load_model_tensors, model_tensors
from lmkiln.train.distributed import parallelize
from lmkiln.train.evaluate import Evaluator, lm_evaluator
from lmkiln.train.loop import FitResult, TrainLoop, TrainSetup
from lmkiln.train.objectives import LanguageModelLoss
from lmkiln.train.optim import build_optimizer
from lmkiln.train.runtime import Runtime

log = logging.getLogger("lmkiln")

SHAPE_FIELDS = (
    "n_layer",
    "n_head",
    "n_kv_head",
    "d_model",
    "d_ff",
    "block_size",
    "vocab_size",
    "norm",
    "position",
    "mlp",
    "bias",
    "tie_embeddings",
)


def build_transformer(
    cfg: ModelConfig,
    device: torch.device,
    seed: int,
    checkpoint_activations: bool = False,
    cpu_matmul: str = "auto",
) -> Transformer:
    """A freshly initialised Transformer for training, its Linear layers on the chosen CPU GEMM."""
    torch.manual_seed(seed)  # the same seed gives the same initial weights on every rank
    model = Transformer(cfg).to(device)
    model.checkpoint_activations = checkpoint_activations
    return swap_linears(model, cpu_matmul)


def validation_evaluator(shards: TokenShards, run: ResolvedConfig, eos_id: int | None) -> Evaluator | None:
    """Validation loss, perplexity and bits per byte over fixed windows of the validation split."""
    arrays = shards.arrays("val")
    if sum(len(a) for a in arrays) < 2:
        return None
    t = run.train
    batches = list(eval_windows(arrays, t.seq_len, run.batch.micro_batch_size, t.eval_tokens, eos_id))
    return lm_evaluator(batches, shards.bytes_per_token("val"))


MEMORIZING_GAP = 0.15
"""Validation loss this far above training loss (as a fraction) means the model learns its data by heart."""


def memorizing_warning(train_loss: float | None, val_loss: float) -> str | None:
    """One line when validation loss exceeds training loss by more than MEMORIZING_GAP, else None."""
    if not train_loss or val_loss <= train_loss * (1 + MEMORIZING_GAP):
        return None
    gap = 100 * (val_loss / train_loss - 1)
    return (
        f"warning: validation loss is {gap:.0f}% above training loss: the model is memorizing its data; "
        f"use more data, fewer steps or a smaller model (`lmkiln plan` sizes one)"
    )


@dataclass
class PretrainResult:
    run_dir: Path
    fit: FitResult
    model: Transformer
    tokenizer: Tokenizer
    tokenizer_report: TokenizerReport | None
    shards_report: PrepareReport | None
    parameters: int
    cfg: Config

    def summary(self) -> str:
        """Figures of the run and a short sample, as `lmkiln train` prints them."""
        from lmkiln.infer.generate import generate_text
        from lmkiln.model.generate import Sampling
        from lmkiln.train.observe import format_count, format_duration

        fit, state = self.fit, self.fit.state
        rate = state.tokens_seen / max(state.train_seconds, 1e-9)
        lines = [
            f"trained {state.step} steps, {format_count(state.tokens_seen)} tokens in "
            f"{format_duration(state.train_seconds)} ({format_count(rate)} tok/s)"
        ]
        before, after = fit.first_eval.get("val_loss"), fit.last_eval.get("val_loss")
        if after is not None:
            start = f"{before:.3f} → " if before is not None else ""
            trained = f"; training loss {fit.train_loss:.3f} (last 50 steps)" if fit.train_loss else ""
            lines.append(
                f"validation loss {start}{after:.3f} (perplexity {fit.last_eval['val_ppl']:.1f}, "
                f"{fit.last_eval['val_bpb']:.3f} bits/byte){trained}; stopped by {fit.stop_reason}"
            )
            warning = memorizing_warning(fit.train_loss, after)
            if warning:
                lines.append(warning)
        quality = describe_cleaning(self.shards_report.shards.manifest) if self.shards_report else ""
        if quality:
            lines.append(f"data quality: {quality}")
        lines.append(
            f"run directory: {self.run_dir} (config.yaml, tokenizer/, checkpoints/, metrics.jsonl, "
            f"plots/loss.png)"
        )
        if self.cfg.train.sample_tokens > 0:
            sampling = Sampling(
                max_new_tokens=self.cfg.train.sample_tokens, temperature=0.8, top_k=50, seed=0
            )
            text = generate_text(self.model.eval(), self.tokenizer, [""], sampling)[0]
            lines.append("sample:\n  " + text.strip().replace("\n", "\n  "))
        lines.append(
            f'next:\n  lmkiln generate {self.run_dir} --prompt "The " --max-new-tokens 100   # sample more'
        )
        return "\n".join(lines)


def _describe(
    cfg: Config,
    runtime: Runtime,
    tok: TokenizerReport,
    shards: PrepareReport,
    model: nn.Module,
    run_dir: Path,
) -> None:
    splits = shards.shards.manifest["splits"]
    how = "cached" if tok.cached else f"trained in {tok.seconds:.2f} s"
    log.info("run: %s (recipe %s)", run_dir, cfg.name)
    log.info(
        "tokenizer: %s, %d tokens (%s), %.2f bytes/token on held-out text",
        cfg.tokenizer.kind,
        tok.tokenizer.vocab_size,
        how,
        tok.bytes_per_token,
    )
    speed = "cached" if shards.cached else f"prepared at {shards.mb_per_s:.1f} MB/s"
    log.info(
        "data: %s → %s train / %s validation tokens (%s)",
        cfg.data.corpus,
        f"{splits['train']['tokens']:,}",
        f"{splits['val']['tokens']:,}",
        speed,
    )
    if describe_cleaning(shards.shards.manifest):
        log.info("data quality: %s", describe_cleaning(shards.shards.manifest))
    m = cfg.model
    flops = training_flops_per_token(m, cfg.train.seq_len)
    log.info(
        "model: %.2fM parameters (%d layers, width %d, %d/%d heads, %s/%s/%s), %.1f MFLOP per token",
        count_parameters(model) / 1e6,
        m.n_layer,
        m.d_model,
        m.n_head,
        m.kv_heads,
        m.norm,
        m.position,
        m.mlp,
        flops / 1e6,
    )
    precision = (
        "fp32" if runtime.autocast_dtype is None else str(runtime.autocast_dtype).replace("torch.", "")
    )
    t = cfg.train
    log.info(
        "training: %d steps × %d sequences × %d tokens on %s (%s, %d threads, %d process%s)",
        t.max_steps,
        t.batch_size,
        t.seq_len,
        runtime.device,
        precision,
        torch.get_num_threads(),
        runtime.world_size,
        "es" if runtime.world_size > 1 else "",
    )


def adopt_init_from(cfg: Config) -> tuple[Config, dict[str, torch.Tensor]]:
    """Model shape and tokenizer from cfg.train.init_from, and its weights.

    Returns a new config whose model section is the source's (model.dropout stays yours) and
    whose tokenizer is the source's file, so the shards are prepared with it and the saved
    config.yaml says exactly what was trained; `cfg` itself is not changed.
    """
    from lmkiln.interop.hf_import import load_pretrained, tokenizer_directory

    source = load_pretrained(cfg.train.init_from)
    derived = dataclasses.replace(
        cfg,
        model=dataclasses.replace(source.config, dropout=cfg.model.dropout),
        tokenizer=dataclasses.replace(
            cfg.tokenizer, kind="file", path=str(tokenizer_directory(cfg.train.init_from))
        ),
    )
    log.info("starting from %s (%s)", cfg.train.init_from, source.architecture)
    return derived, model_tensors(source.model)


def pretrain(
    cfg: Config,
    resume: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    runtime: Runtime | None = None,
    on_eval: Callable[[int, dict[str, float]], bool] | None = None,
) -> PretrainResult:
    """Prepare data, build the model and train it; `on_eval(step, metrics)` returning True stops
    the run after that evaluation (a sweep pruning a trial)."""
    runtime = runtime or Runtime.start(cfg.train, cfg.dist)
    source, initial = adopt_init_from(cfg) if cfg.train.init_from else (cfg, None)
    # the main process prepares tokenizer and shards; the others then open the same cached files
    if runtime.is_main:
        tok_report, shard_report = prepare_data(source)
    runtime.barrier("data preparation")
    if not runtime.is_main:
        tok_report, shard_report = prepare_data(source)
    tokenizer, shards = tok_report.tokenizer, shard_report.shards
    shards.check_tokenizer(tokenizer)
    run = resolve(source, runtime.world_size, vocab_size=tokenizer.vocab_size)
    cfg = run.cfg
    run_dir = open_run_dir(
        cfg,
        is_main=runtime.is_main,
        barrier=runtime.barrier,
        resume=resume,
        overwrite=overwrite,
        tokenizer=tokenizer,
    )
    if runtime.is_main:
        write_canary_record(run_dir, shards.manifest, shards.directory)
    t = cfg.train
    model = build_transformer(cfg.model, runtime.device, t.seed, t.activation_checkpointing, t.cpu_matmul)
    if initial is not None:
        load_model_tensors(model, initial, t.init_from)
    if runtime.is_main:
        _describe(cfg, runtime, tok_report, shard_report, model, run_dir)
    train_model = parallelize(model, cfg, runtime)  # before the optimizer: FSDP2 shards parameters
    eos = tokenizer.eos_id if cfg.data.document_mask else None
    micro = run.batch.micro_batch_size
    batches = RandomWindows(
        shards.arrays("train"), t.seq_len, micro, t.seed, runtime.rank, eos, world_size=runtime.world_size
    )
    fingerprint = {
        "train.batch_size": t.batch_size,
        "train.micro_batch_size": micro,
        "train.seq_len": t.seq_len,
        "world_size": runtime.world_size,
        "dist.strategy": cfg.dist.strategy if runtime.distributed else "single",
        "tokenizer": tokenizer.fingerprint[:16],
        "data": shards.directory.name,
        **{f"model.{k}": getattr(cfg.model, k) for k in SHAPE_FIELDS},
    }
    setup = TrainSetup(
        model=model,
        train_model=train_model,
        objective=LanguageModelLoss(),
        train_batches=batches,
        optimizer=build_optimizer(model, cfg.optim),
        total_steps=run.total_steps,
        evaluate=validation_evaluator(shards, run, eos),
        fingerprint=fingerprint,
        flops_per_token=training_flops_per_token(cfg.model, t.seq_len),
    )
    trainer = TrainLoop(setup, run, runtime, run_dir, on_eval)
    result = trainer.fit(resume=resume, force=force)
    if (
        trainer.sharded and runtime.is_main
    ):  # hand back plain weights (the final checkpoint consolidated them)
        from lmkiln.runs.load import load_run

        model = load_run(run_dir, device=str(runtime.device)).model
    return PretrainResult(
        run_dir, result, model, tokenizer, tok_report, shard_report, count_parameters(model), cfg
    )
