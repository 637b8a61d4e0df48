"""Small builders shared by the fine-tuning tests: a tokenizer, a base run directory, task files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lmkiln.config import Config, FinetuneConfig, load_config, to_dict
from lmkiln.data.tokenizer import EOS, PAD, Tokenizer, train_bpe
from lmkiln.model.transformer import Transformer
from lmkiln.runs.checkpoint import CheckpointData, write_checkpoint
from lmkiln.runs.tensors import model_tensors
from lmkiln.train.state import TrainState

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
PARTNER = dict(zip(WORDS, ["green", "red", "tree", "dog", "cat", "moon", "sun", "blue"]))

_TOKENIZERS: dict[str, Tokenizer] = {}


def word_lists(n: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(2, 4))] for _ in range(n)]


def tokenizer(chatml: bool = True) -> Tokenizer:
    """A byte-level BPE over the word lists; chatml=False has only <|endoftext|> and <|pad|>."""
    key = str(chatml)
    if key not in _TOKENIZERS:
        texts = [
            " ".join(words) + " means Reverse the words Instruction Response" for words in word_lists(200)
        ]
        if chatml:
            _TOKENIZERS[key] = train_bpe(iter(texts), 300)
        else:
            from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
            from tokenizers import Tokenizer as HFTokenizer

            hf = HFTokenizer(models.BPE())
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=290,
                special_tokens=[EOS, PAD],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            hf.train_from_iterator(texts, trainer=trainer)
            hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (EOS, PAD)])
            _TOKENIZERS[key] = Tokenizer(hf, chat_template=None, bos_token=None)
    return _TOKENIZERS[key]


def make_base(
    directory: Path,
    *,
    chatml: bool = True,
    tie: bool = True,
    seed: int = 0,
    block_size: int = 96,
    d_model: int = 32,
) -> Path:
    """A run directory with a random tiny model and its tokenizer, as `lmkiln train` leaves one."""
    tok = tokenizer(chatml)
    cfg = load_config(
        overrides=[
            "model.preset=tiny",
            f"model.d_model={d_model}",
            f"model.vocab_size={tok.vocab_size}",
            f"model.tie_embeddings={tie}",
            f"model.block_size={block_size}",
            "train.seq_len=64",
        ]
    )
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    tok.save(directory / "tokenizer")
    trainer = {"format": 1, "state": TrainState(step=1).to_dict(), "config": to_dict(cfg)}
    write_checkpoint(directory / "checkpoints", 1, CheckpointData(model_tensors(model), {}, {}, trainer))
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def reverse_rows(n: int, seed: int = 0) -> list[dict]:
    return [
        {"instruction": "Reverse the words.", "input": " ".join(w), "output": " ".join(reversed(w))}
        for w in word_lists(n, seed)
    ]


def ft_config(base: Path, data: Path, run_dir: Path, *overrides: str) -> Config:
    return load_config(
        overrides=[
            "task=finetune",
            f"finetune.base={base}",
            f"finetune.data={data}",
            f"train.run_dir={run_dir}",
            "train.batch_size=8",
            "train.max_steps=6",
            "train.eval_every=3",
            "train.save_every=3",
            "train.log_every=3",
            "train.sample_tokens=0",
            "finetune.eval_samples=0",
            "log.progress=off",
            "log.plot=false",
            "schedule.warmup_steps=2",
            "optim.lr=3e-3",
            *overrides,
        ]
    )


def finetune_cfg(**values) -> FinetuneConfig:
    return FinetuneConfig(**values)
