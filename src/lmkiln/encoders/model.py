"""BERT-style encoders from a local Hugging Face directory: the model, loading and saving.

An `EncoderModel` wraps `transformers.AutoModel` (BERT, RoBERTa, DistilBERT, MiniLM, ...) and pools
its token states into one vector per text: the mean over real tokens (padding excluded) or the
first ([CLS]) token; with a linear head it classifies. Training objectives are in
`lmkiln.encoders.retrieval` (contrastive) and `lmkiln.train.objectives.ClassificationLoss`.

A fine-tuned encoder is saved in Hugging Face format (config.json, model.safetensors, tokenizer
files) plus `lmkiln_encoder.json` (pooling, labels), `classifier.safetensors` for a head, and the
sentence-transformers module files so that library loads a retrieval model as it is.
transformers is imported inside functions only (the `hf` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkiln.errors import LmkilnError
from lmkiln.runs.load import local_directory
from lmkiln.runs.tensors import check_tensor_file, read_tensors, save_tensors

META_FILE = "lmkiln_encoder.json"
HEAD_FILE = "classifier.safetensors"
POOLINGS = ("mean", "cls")


def pool(states: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, C) token states → (B, C): mean over tokens where mask is 1, or the first token."""
    if how == "cls":
        return states[:, 0]
    weights = mask.to(states.dtype).unsqueeze(-1)  # (B, T, 1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class EncoderModel(nn.Module):
    """A Hugging Face encoder, a pooling rule and an optional linear classification head."""

    def __init__(self, encoder: nn.Module, pooling: str, n_labels: int = 0, dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise LmkilnError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.encoder, self.pooling = encoder, pooling
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_labels) if n_labels else None
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled sentence embeddings (B, C), not normalised."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(states, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_labels) with a head, else the pooled embeddings (B, C)."""
        pooled = self.embed(input_ids, attention_mask)
        return self.head(self.dropout(pooled)) if self.head is not None else pooled


# --------------------------------------------------------------------------------------------
# Loading and saving


@dataclass
class LoadedEncoder:
    model: EncoderModel
    tokenizer: Any
    """A transformers tokenizer (adds [CLS]/[SEP] as the encoder expects)."""
    meta: dict
    """pooling, max_length, objective and labels, as saved in lmkiln_encoder.json."""


def encoder_directory(path: str | Path) -> Path:
    """A Hugging Face encoder directory, or the `model/` directory of an lmkiln encoder run."""
    directory = local_directory(path, "encoder")
    if not (directory / "config.json").is_file() and (directory / "model" / "config.json").is_file():
        return directory / "model"
    if not (directory / "config.json").is_file():
        raise LmkilnError(
            f"{directory} has no config.json: give a Hugging Face encoder directory or an lmkiln "
            f"encoder run (which keeps its model in model/)"
        )
    return directory


def _check_weight_files(directory: Path) -> None:
    """Weights only from safetensors files, checked before transformers reads them: a pickle
    (pytorch_model.bin) can run code when loaded, and a corrupt file ends in a traceback there."""
    files = sorted(directory.glob("*.safetensors"))
    files = [f for f in files if f.name != HEAD_FILE]
    if not files:
        pickles = sorted(p.name for p in directory.glob("*.bin")) or ["no weights file"]
        raise LmkilnError(
            f"{directory} has no model.safetensors ({', '.join(pickles)}); lmkiln loads weights only "
            f"from safetensors files, never from pickles: convert it first (e.g. with transformers: "
            f"model.save_pretrained(DIR, safe_serialization=True))"
        )
    for file in files:
        check_tensor_file(file)


def _saved_meta(directory: Path) -> dict:
    """lmkiln's own metadata, else what sentence-transformers' pooling config says."""
    meta_file = directory / META_FILE
    if meta_file.is_file():
        return json.loads(meta_file.read_text(encoding="utf-8"))
    pooling_file = directory / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        config = json.loads(pooling_file.read_text(encoding="utf-8"))
        return {"pooling": "cls" if config.get("pooling_mode_cls_token") else "mean"}
    return {}


def load_encoder(
    path: str | Path, *, pooling: str | None = None, n_labels: int | None = None, dropout: float = 0.1
) -> LoadedEncoder:
    """Load an encoder (never from the network, never with remote code) and its tokenizer.

    pooling/n_labels override what the directory saved; a saved classification head is restored
    when the number of labels matches.
    """
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise LmkilnError("encoders need transformers: pip install 'lmkiln[hf]'") from None

    directory = encoder_directory(path)
    if "auto_map" in json.loads((directory / "config.json").read_text(encoding="utf-8")):
        raise LmkilnError(
            f"{directory}/config.json asks for custom model code (auto_map); lmkiln never runs code "
            f"from a model directory (no trust_remote_code)"
        )
    meta = _saved_meta(directory)
    _check_weight_files(directory)
    try:
        encoder = AutoModel.from_pretrained(
            str(directory), dtype=torch.float32, local_files_only=True, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise LmkilnError(f"cannot load the encoder in {directory}: {err}".split("\n")[0]) from None
    labels = meta.get("labels") or []
    n_labels = len(labels) if n_labels is None else n_labels
    model = EncoderModel(encoder, pooling or meta.get("pooling", "mean"), n_labels, dropout)
    head_file = directory / HEAD_FILE
    if model.head is not None and head_file.is_file() and n_labels == len(labels):
        model.head.load_state_dict(read_tensors(head_file))
    meta = {**meta, "pooling": model.pooling}
    return LoadedEncoder(model.eval(), tokenizer, meta)


def save_encoder(model: EncoderModel, tokenizer: Any, directory: Path, meta: dict) -> Path:
    """Hugging Face files + lmkiln_encoder.json (+ head, + sentence-transformers module files)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    meta = {**meta, "pooling": model.pooling}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if model.head is not None:
        head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        save_tensors(directory / HEAD_FILE, head, {"format": "pt"})
    _write_sentence_transformers_files(model, directory, meta)
    return directory


def _write_sentence_transformers_files(model: EncoderModel, directory: Path, meta: dict) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {
        "word_embedding_dimension": model.encoder.config.hidden_size,
        "pooling_mode_cls_token": model.pooling == "cls",
        "pooling_mode_mean_tokens": model.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (directory / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2), encoding="utf-8")
    (directory / "2_Normalize").mkdir(exist_ok=True)
    config = {"max_seq_length": meta.get("max_length", 128), "do_lower_case": False}
    (directory / "sentence_bert_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
