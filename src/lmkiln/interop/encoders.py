"""BERT-style encoders from a local Hugging Face directory: pooling, data, losses, embeddings.

An `EncoderModel` wraps `transformers.AutoModel` (BERT, RoBERTa, DistilBERT, MiniLM, ...) and pools
its token states into one vector per text: the mean over real tokens (padding excluded) or the
first ([CLS]) token. Two objectives train it through lmkiln's one training loop:

- `ContrastiveLoss` (semantic search): InfoNCE with in-batch negatives. For a micro-batch of B
  (query, positive) pairs, the cosine similarities of every query with every positive, divided
  by a temperature, form B×B logits whose diagonal is the right answer; the loss is the
  cross-entropy of each row (and, with `symmetric`, of each column too). The other B−1 positives
  are the negatives, so larger micro-batches give harder training.
- `ClassificationLoss`: a linear head on the pooled embedding, cross-entropy.

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
import torch.nn.functional as F
from torch import nn

from lmkiln.data.corpus import jsonl_rows
from lmkiln.data.loader import IGNORE_INDEX
from lmkiln.errors import LmkilnError

Batch = dict[str, torch.Tensor]
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
    from lmkiln.interop.hf_import import local_directory

    directory = local_directory(path, "encoder")
    if not (directory / "config.json").is_file() and (directory / "model" / "config.json").is_file():
        return directory / "model"
    if not (directory / "config.json").is_file():
        raise LmkilnError(
            f"{directory} has no config.json: give a Hugging Face encoder directory or an lmkiln "
            f"encoder run (which keeps its model in model/)"
        )
    return directory


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
    from lmkiln.interop.hf_export import require_transformers

    require_transformers()
    from transformers import AutoModel, AutoTokenizer

    directory = encoder_directory(path)
    if "auto_map" in json.loads((directory / "config.json").read_text(encoding="utf-8")):
        raise LmkilnError(
            f"{directory}/config.json asks for custom model code (auto_map); lmkiln never runs code "
            f"from a model directory (no trust_remote_code)"
        )
    meta = _saved_meta(directory)
    try:
        encoder = AutoModel.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise LmkilnError(f"cannot load the encoder in {directory}: {err}".split("\n")[0]) from None
    labels = meta.get("labels") or []
    n_labels = len(labels) if n_labels is None else n_labels
    model = EncoderModel(encoder, pooling or meta.get("pooling", "mean"), n_labels, dropout)
    head_file = directory / HEAD_FILE
    if model.head is not None and head_file.is_file() and n_labels == len(labels):
        from safetensors.torch import load_file

        model.head.load_state_dict(load_file(str(head_file)))
    meta = {**meta, "pooling": model.pooling}
    return LoadedEncoder(model.eval(), tokenizer, meta)


def save_encoder(model: EncoderModel, tokenizer: Any, directory: Path, meta: dict) -> Path:
    """Hugging Face files + lmkiln_encoder.json (+ head, + sentence-transformers module files)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    meta = {**meta, "pooling": model.pooling}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if model.head is not None:
        head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        save_file(head, str(directory / HEAD_FILE), metadata={"format": "pt"})
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


# --------------------------------------------------------------------------------------------
# Data


def read_jsonl(path: str | Path, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a JSONL file with the given fields; each row also gets `_line` (1-based).

    Text fields must be strings; a bad line raises LmkilnError naming path:line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmkilnError(f"data file not found: {path}")
    rows = []
    for number, row in jsonl_rows(path):
        missing = [f for f in fields if f not in row]
        if missing:
            raise LmkilnError(
                f"{path}:{number}: no field {missing[0]!r} (fields: {', '.join(row) or 'none'}); "
                f"name the right one in the config (e.g. --encoder.{_field_key(missing[0])} NAME)"
            )
        kept = {f: row[f] for f in (*fields, *optional) if f in row}
        kept["_line"] = number
        rows.append(kept)
    if not rows:
        raise LmkilnError(f"{path} holds no examples")
    return rows


def _field_key(field: str) -> str:
    return {"query": "query_field", "positive": "positive_field", "label": "label_field"}.get(
        field, "text_field"
    )


def require_text(row: dict, field: str, path: str | Path) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise LmkilnError(
            f"{path}:{row['_line']}: field {field!r} must be a string, got {type(value).__name__}"
        )
    return value


def label_names(values: list) -> list[str]:
    """Sorted class names; integer labels sort numerically (0, 1, 2, …, 10)."""
    unique = set(values)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in unique):
        return [str(v) for v in sorted(unique)]
    return sorted(str(v) for v in unique)


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and attention mask (B, T)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------
# Objectives (the loop's protocol: count() terms, __call__ returns their sum)


@dataclass
class ContrastiveLoss:
    """In-batch-negative InfoNCE over cosine similarities / temperature (see the module docstring).

    Batch: q_ids, q_mask, p_ids, p_mask (B, T) and valid (B,) — False for the loop's padding
    slots, which are neither queries nor candidates.
    """

    temperature: float = 0.05
    symmetric: bool = False

    def count(self, batch: Batch) -> torch.Tensor:
        return batch["valid"].sum() * (2 if self.symmetric else 1)

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        q = F.normalize(_embed(model, batch["q_ids"], batch["q_mask"]).float(), dim=-1)  # (B, C)
        p = F.normalize(_embed(model, batch["p_ids"], batch["p_mask"]).float(), dim=-1)
        valid = batch["valid"].bool()
        logits = (q @ p.T / self.temperature).masked_fill(~valid[None, :], float("-inf"))  # (B, B)
        target = torch.arange(len(valid), device=logits.device)
        loss = F.cross_entropy(logits[valid], target[valid], reduction="sum")
        if self.symmetric:
            flipped = logits.T.masked_fill(~valid[None, :], float("-inf"))
            loss = loss + F.cross_entropy(flipped[valid], target[valid], reduction="sum")
        return loss


def _embed(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The pooled embedding through whatever wraps the EncoderModel (DDP, compile)."""
    return model(ids, mask)


@dataclass
class ClassificationLoss:
    """Cross-entropy of the head's logits; labels IGNORE_INDEX mark padding slots."""

    label_smoothing: float = 0.0

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["attention_mask"])  # (B, n_labels)
        return F.cross_entropy(
            logits.float(),
            batch["labels"],
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )


# --------------------------------------------------------------------------------------------
# Embeddings


@torch.no_grad()
def embed_texts(
    model: EncoderModel,
    tokenizer: Any,
    texts: list[str],
    *,
    max_length: int = 128,
    batch_size: int = 32,
    normalize: bool = True,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(N, C) float32 embeddings in the order of `texts` (unit length when normalize)."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = tokenize(tokenizer, texts, max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths pad less
    out = torch.empty(len(ids), model.encoder.config.hidden_size)
    for start in range(0, len(order), batch_size):
        picked = order[start : start + batch_size]
        batch_ids, mask = pad_rows([ids[i] for i in picked], pad_id)
        vectors = model.embed(batch_ids.to(device), mask.to(device)).float().cpu()
        out[picked] = F.normalize(vectors, dim=-1) if normalize else vectors
    model.train(was_training)
    return out


def unique_corpus(positives: list[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct documents and, per pair, the index of its positive among them."""
    index: dict[str, int] = {}
    relevant = [index.setdefault(text, len(index)) for text in positives]
    return list(index), torch.tensor(relevant, dtype=torch.long)


def evaluate_pairs(
    model: EncoderModel,
    tokenizer: Any,
    queries: list[str],
    positives: list[str],
    *,
    max_length: int = 128,
    batch_size: int = 32,
    ks: tuple[int, ...] = (1, 5, 10),
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """recall@k and MRR of finding each query's positive among all distinct positives."""
    from lmkiln.eval.retrieval import retrieval_metrics

    corpus, relevant = unique_corpus(positives)
    settings = dict(max_length=max_length, batch_size=batch_size, device=device)
    q = embed_texts(model, tokenizer, queries, **settings)
    d = embed_texts(model, tokenizer, corpus, **settings)
    return retrieval_metrics(q, d, relevant, ks)


def write_embeddings(out: str | Path, vectors: torch.Tensor, ids: list, meta: dict) -> list[str]:
    """FILE.npy (+ FILE.ids.json) or FILE.safetensors ("embeddings" (N, C), ids in the metadata)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"ids": json.dumps(ids), **{k: json.dumps(v) for k, v in meta.items()}}
        save_file({"embeddings": vectors.contiguous()}, str(out), metadata=metadata)
        return [str(out)]
    if suffix != ".npy":
        raise LmkilnError(f"--out {out}: write .npy or .safetensors")
    import numpy as np

    np.save(out, vectors.numpy())
    ids_file = out.with_suffix(".ids.json")
    ids_file.write_text(json.dumps(ids), encoding="utf-8")
    return [str(out), str(ids_file)]
