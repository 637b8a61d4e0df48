"""The candidates lmkiln is measured against, trained the way their users train them.

- `hf_trainer_run`: Hugging Face `transformers` GPT-2 (`GPT2LMHeadModel`) of the same shape, trained
  by `transformers.Trainer` with its defaults (fused AdamW, linear warmup, cosine decay).
- `plain_run`: a minimal nanoGPT-style GPT and loop written here in plain PyTorch — the floor:
  no framework at all, nothing but forward, backward, clip and step.
- `lmkiln_run`: lmkiln's real path — `TrainLoop` with a `TrainSetup` of lmkiln's Transformer,
  `build_optimizer`, `LanguageModelLoss` and a `RandomWindows` stream over token shards.

Step times are the intervals between consecutive step starts (all of a step's work, data loading
included): lmkiln's come from the batch stream's `__next__` calls, the Trainer's from a
`TrainerCallback.on_step_begin`, the floor's from its own loop. `transformers` is imported
lazily, so the lmkiln candidate never pays for it.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import Shape, sync

# The training recipe every candidate uses for throughput (it changes the numbers, not the cost).
LR, BETAS, WEIGHT_DECAY, WARMUP, CLIP = 1e-3, (0.9, 0.99), 0.1, 10, 1.0


@dataclass
class Timed:
    """Start times of every optimizer step, and what the run left behind."""

    starts: list[float] = field(default_factory=list)
    end: float = 0.0
    model: nn.Module | None = None

    def step_seconds(self, warmup: int) -> list[float]:
        """Duration of each step after the first `warmup` ones (compile, allocator and cache warm-up)."""
        marks = [*self.starts, self.end]
        return [b - a for a, b in zip(marks[warmup:], marks[warmup + 1 :])]


# --------------------------------------------------------------------------------------------
# lmkiln


class TimedStream:
    """A batch stream that notes when each micro-batch is asked for (= when a step starts)."""

    def __init__(self, inner, timed: Timed, device: torch.device) -> None:
        self.inner, self.timed, self.device = inner, timed, device

    def __next__(self):
        sync(self.device)
        self.timed.starts.append(time.perf_counter())
        return next(self.inner)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def lmkiln_config(shape: Shape, steps: int, extra: list[str] = ()):
    from lmkiln.config import load_config

    return load_config(
        overrides=[
            *shape.lmkiln_overrides(),
            f"train.max_steps={steps}",
            f"optim.lr={LR}",
            f"optim.betas=[{BETAS[0]},{BETAS[1]}]",
            f"optim.weight_decay={WEIGHT_DECAY}",
            f"schedule.warmup_steps={WARMUP}",
            f"train.grad_clip={CLIP}",
            f"train.log_every={steps}",
            f"train.eval_every={steps}",
            f"train.save_every={steps}",
            "train.sample_tokens=0",
            "log.progress=off",
            "log.plot=false",
            *extra,
        ]
    )


def lmkiln_run(
    shape: Shape,
    steps: int,
    tokens: np.ndarray,
    device: torch.device,
    extra: list[str] = (),
    evaluate: Callable | None = None,
    seed: int = 0,
) -> Timed:
    """Train through lmkiln's TrainLoop (no run directory: nothing is written) and time every step."""
    from lmkiln.config import resolve
    from lmkiln.data.loader import RandomWindows
    from lmkiln.model.transformer import training_flops_per_token
    from lmkiln.tasks.pretrain import build_transformer
    from lmkiln.train.distributed import parallelize
    from lmkiln.train.loop import TrainLoop, TrainSetup
    from lmkiln.train.objectives import LanguageModelLoss
    from lmkiln.train.optim import build_optimizer
    from lmkiln.train.runtime import Runtime

    cfg = lmkiln_config(shape, steps, [f"train.device={device.type}", f"train.seed={seed}", *extra])
    runtime = Runtime.start(cfg.train, cfg.dist)
    model = build_transformer(
        cfg.model, runtime.device, cfg.train.seed, cfg.train.activation_checkpointing, cfg.train.cpu_matmul
    )
    train_model = parallelize(model, cfg, runtime)
    optimizer = build_optimizer(model, cfg.optim)
    timed = Timed(model=model)
    run = resolve(cfg, runtime.world_size)
    batches = TimedStream(
        RandomWindows([tokens], cfg.train.seq_len, run.batch.micro_batch_size, cfg.train.seed),
        timed,
        runtime.device,
    )
    setup = TrainSetup(
        model=model,
        train_model=train_model,
        objective=LanguageModelLoss(),
        train_batches=batches,
        optimizer=optimizer,
        total_steps=steps,
        evaluate=evaluate,
        flops_per_token=training_flops_per_token(cfg.model, cfg.train.seq_len),
    )
    TrainLoop(setup, run, runtime, None).fit()
    sync(runtime.device)
    timed.end = time.perf_counter()
    return timed


# --------------------------------------------------------------------------------------------
# Hugging Face transformers: GPT2LMHeadModel + Trainer


def gpt2_config(shape: Shape):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=shape.vocab_size,
        n_positions=shape.seq_len,
        n_embd=shape.d_model,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )


class WindowDataset(torch.utils.data.Dataset):
    """Random windows of seq_len tokens; GPT2LMHeadModel shifts the labels itself, so a window of
    seq_len tokens costs what lmkiln's seq_len inputs (+1 label token) cost."""

    def __init__(self, tokens: np.ndarray, seq_len: int, length: int, seed: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.starts = np.random.default_rng(seed).integers(0, len(tokens) - seq_len - 1, size=length)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = self.starts[index]
        window = torch.from_numpy(self.tokens[start : start + self.seq_len].astype(np.int64))
        return {"input_ids": window, "labels": window}


def hf_trainer_run(
    shape: Shape,
    steps: int,
    tokens: np.ndarray,
    device: torch.device,
    bf16: bool = False,
    compile: bool = False,
    seed: int = 0,
    lr: float = LR,
    warmup: int = WARMUP,
    callbacks: list = (),
) -> Timed:
    """Train GPT2LMHeadModel with transformers.Trainer (plus `callbacks`), timing every step."""
    import transformers
    from transformers import GPT2LMHeadModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    transformers.logging.set_verbosity_error()

    timed = Timed()

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            timed.starts.append(time.perf_counter())

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config(shape))
    with tempfile.TemporaryDirectory(prefix="lmkiln-bench-hf-") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=shape.batch_size,
            max_steps=steps,
            learning_rate=lr,
            adam_beta1=BETAS[0],
            adam_beta2=BETAS[1],
            weight_decay=WEIGHT_DECAY,
            warmup_steps=warmup,
            lr_scheduler_type="cosine",
            max_grad_norm=CLIP,
            logging_steps=max(steps, 1),
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            bf16=bf16,
            torch_compile=compile,
            dataloader_num_workers=0,
            seed=seed,
        )
        dataset = WindowDataset(tokens, shape.seq_len, shape.batch_size * steps, seed)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[StepClock(), *callbacks])
        trainer.remove_callback(PrinterCallback)  # its log lines would go to stdout, the report's place
        trainer.train()
    sync(device)
    timed.end = time.perf_counter()
    timed.model = model
    return timed


# --------------------------------------------------------------------------------------------
# The floor: a minimal GPT in plain PyTorch (nanoGPT's model.py, condensed)


class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        d = shape.d_model
        self.wte, self.wpe = nn.Embedding(shape.vocab_size, d), nn.Embedding(shape.seq_len, d)
        self.h = nn.ModuleList(PlainBlock(d, shape.n_head) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, shape.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * shape.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def plain_run(
    shape: Shape, steps: int, tokens: np.ndarray, device: torch.device, seed: int = 0, bf16: bool = False
) -> Timed:
    """nanoGPT's training loop: random windows, forward, backward, clip, AdamW (torch's defaults)."""
    torch.manual_seed(seed)
    model = PlainGPT(shape).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
    )
    data = torch.from_numpy(tokens.astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    timed = Timed(model=model)
    T, B = shape.seq_len, shape.batch_size
    for step in range(steps):
        sync(device)
        timed.starts.append(time.perf_counter())
        ix = torch.randint(len(data) - T - 1, (B,), generator=generator)
        x = torch.stack([data[i : i + T] for i in ix]).to(device)
        y = torch.stack([data[i + 1 : i + 1 + T] for i in ix]).to(device)
        lr = LR * min(1.0, (step + 1) / WARMUP)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    timed.end = time.perf_counter()
    return timed
