"""Language-model pretraining: corpus → tokenizer → shards → transformer → the training loop."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmkiln.config import Config, ModelConfig, validate
from lmkiln.data.canaries import write_record as write_canary_record
from lmkiln.data.cleaning import describe_cleaning
from lmkiln.data.loader import RandomWindows, eval_windows
from lmkiln.data.prepare import TokenizerReport, build_tokenizer
from lmkiln.data.shards import PrepareReport, TokenShards, is_shard_set, prepare_shards
from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.model.transformer import Transformer, count_parameters, training_flops_per_token
from lmkiln.train.distributed import parallelize
from lmkiln.train.loop import FitResult, TrainLoop, TrainSetup, load_model_tensors, model_tensors
from lmkiln.train.objectives import LanguageModelLoss
from lmkiln.train.optim import build_optimizer
from lmkiln.train.run import prepare_run_dir, run_dir_of
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


def resolve_vocab(cfg: ModelConfig, tokenizer: Tokenizer) -> None:
    if cfg.vocab_size == 0:
        cfg.vocab_size = tokenizer.vocab_size
    elif cfg.vocab_size < tokenizer.vocab_size:
        raise LmkilnError(
            f"model.vocab_size {cfg.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}); set it to 0 to use the tokenizer's size"
        )


def build_model(
    cfg: ModelConfig, device: torch.device, seed: int, checkpoint_activations: bool = False
) -> Transformer:
    torch.manual_seed(seed)  # the same seed gives the same initial weights on every rank
    model = Transformer(cfg).to(device)
    model.checkpoint_activations = checkpoint_activations
    return model


def lm_evaluator(shards: TokenShards, cfg: Config, eos_id: int | None):
    """Validation loss, perplexity and bits per byte over fixed windows, sharded across ranks."""
    arrays = shards.arrays("val")
    bytes_per_token = shards.bytes_per_token("val")
    micro = cfg.train.micro_batch_size or cfg.train.batch_size

    def evaluate(model: nn.Module, runtime: Runtime) -> dict[str, float]:
        loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
        count = torch.zeros((), device=runtime.device, dtype=torch.float64)
        objective = LanguageModelLoss()
        batches = list(eval_windows(arrays, cfg.train.seq_len, micro, cfg.train.eval_tokens, eos_id))
        # Ranks take turns; all run the same number of forwards (FSDP's forward is a collective),
        # a rank without a batch of its own repeats the first one with zero weight.
        rounds = -(-len(batches) // runtime.world_size)
        for turn in range(rounds):
            index = turn * runtime.world_size + runtime.rank
            batch = {k: v.to(runtime.device) for k, v in batches[min(index, len(batches) - 1)].items()}
            loss, n = objective(model, batch).double(), objective.count(batch).double()
            if index < len(batches):
                loss_sum += loss
                count += n
        runtime.all_reduce_sum(loss_sum, "validation loss sum")
        runtime.all_reduce_sum(count, "validation target count")
        loss = (loss_sum / count.clamp(min=1)).item()
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": loss / math.log(2) / bytes_per_token,
        }

    return evaluate if sum(len(a) for a in arrays) >= 2 else None


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
        from lmkiln.infer.generate import Sampling, generate_text
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
            lines.append(
                f"validation loss {start}{after:.3f} (perplexity {fit.last_eval['val_ppl']:.1f}, "
                f"{fit.last_eval['val_bpb']:.3f} bits/byte); stopped by {fit.stop_reason}"
            )
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


def adopt_init_from(cfg: Config) -> dict[str, torch.Tensor]:
    """Take model shape and tokenizer from cfg.train.init_from and return its weights.

    The config is rewritten (model section, tokenizer.kind=file) so that the saved config.yaml
    says exactly what was trained and the shards are prepared with the source's tokenizer.
    """
    from lmkiln.interop.hf_import import load_pretrained, tokenizer_directory

    source = load_pretrained(cfg.train.init_from)
    cfg.model = dataclasses.replace(source.config, dropout=cfg.model.dropout)
    cfg.tokenizer.kind, cfg.tokenizer.path = "file", str(tokenizer_directory(cfg.train.init_from))
    validate(cfg)
    log.info("starting from %s (%s)", cfg.train.init_from, source.architecture)
    return model_tensors(source.model)


def prepare_data(cfg: Config) -> tuple[TokenizerReport, PrepareReport]:
    """The tokenizer and the shards of a config; a prepared shard set is used as it is."""
    if is_shard_set(cfg.data.corpus):
        shards = TokenShards(Path(cfg.data.corpus).expanduser())
        if cfg.tokenizer.kind == "file":
            report = build_tokenizer(cfg)
        else:
            tokenizer = Tokenizer.load(shards.directory / "tokenizer", fast=cfg.tokenizer.fast)
            report = TokenizerReport(tokenizer, True, 0.0, float("nan"))
        shards.check_tokenizer(report.tokenizer)
        return report, PrepareReport(shards, cached=True, seconds=0.0, megabytes=0.0)
    report = build_tokenizer(cfg)
    return report, prepare_shards(cfg.data, report.tokenizer)


def pretrain(
    cfg: Config,
    resume: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    runtime: Runtime | None = None,
) -> PretrainResult:
    runtime = runtime or Runtime.start(cfg.train, cfg.dist)
    initial = adopt_init_from(cfg) if cfg.train.init_from else None
    tok_report = shard_report = None
    if runtime.is_main:
        tok_report, shard_report = prepare_data(cfg)
        tokenizer = tok_report.tokenizer
        resolve_vocab(cfg.model, tokenizer)
        run_dir = prepare_run_dir(cfg, resume=resume, overwrite=overwrite)
        tokenizer.save(run_dir / "tokenizer")
        write_canary_record(run_dir, shard_report.shards.manifest, shard_report.shards.directory)
    runtime.barrier()
    if not runtime.is_main:  # the main process prepared everything; the others open the same files
        tok_report, shard_report = prepare_data(cfg)
        tokenizer = tok_report.tokenizer
        resolve_vocab(cfg.model, tokenizer)
        run_dir = run_dir_of(cfg)
    shards = shard_report.shards
    shards.check_tokenizer(tokenizer)

    model = build_model(cfg.model, runtime.device, cfg.train.seed, cfg.train.activation_checkpointing)
    if initial is not None:
        load_model_tensors(model, initial, cfg.train.init_from)
    if runtime.is_main:
        _describe(cfg, runtime, tok_report, shard_report, model, run_dir)
    train_model = parallelize(model, cfg, runtime)  # before the optimizer: FSDP2 shards parameters
    optimizer = build_optimizer(model, cfg.optim)
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    eos = tokenizer.eos_id if cfg.data.document_mask else None
    batches = RandomWindows(
        shards.arrays("train"),
        cfg.train.seq_len,
        micro,
        cfg.train.seed,
        runtime.rank,
        eos,
        world_size=runtime.world_size,
    )
    evaluate = lm_evaluator(shards, cfg, eos)
    fingerprint = {
        "train.batch_size": cfg.train.batch_size,
        "train.micro_batch_size": micro,
        "train.seq_len": cfg.train.seq_len,
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
        optimizer=optimizer,
        total_steps=cfg.train.max_steps,
        evaluate=evaluate,
        fingerprint=fingerprint,
        flops_per_token=training_flops_per_token(cfg.model, cfg.train.seq_len),
    )
    trainer = TrainLoop(setup, cfg, runtime, run_dir)
    result = trainer.fit(resume=resume, force=force)
    if (
        trainer.sharded and runtime.is_main
    ):  # hand back plain weights (the final checkpoint consolidated them)
        from lmkiln.infer.load import load_run

        model = load_run(run_dir, device=str(runtime.device)).model
    return PretrainResult(
        run_dir, result, model, tokenizer, tok_report, shard_report, count_parameters(model), cfg
    )
