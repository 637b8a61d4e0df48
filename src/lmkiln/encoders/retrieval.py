"""Semantic search with an encoder: the contrastive objective, embeddings and retrieval metrics.

`ContrastiveLoss` is InfoNCE with in-batch negatives. For a micro-batch of B (query, positive)
pairs, the cosine similarities of every query with every positive, divided by a temperature, form
B×B logits whose diagonal is the right answer; the loss is the cross-entropy of each row (and,
with `symmetric`, of each column too). The other B−1 positives are the negatives, so larger
micro-batches give harder training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.encoders.data import pad_rows, tokenize
from lmkiln.encoders.model import EncoderModel
from lmkiln.errors import LmkilnError
from lmkiln.files import make_output_dir, remove_on_failure
from lmkiln.train.metrics import retrieval_metrics

Batch = dict[str, torch.Tensor]


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
    corpus, relevant = unique_corpus(positives)
    settings = dict(max_length=max_length, batch_size=batch_size, device=device)
    q = embed_texts(model, tokenizer, queries, **settings)
    d = embed_texts(model, tokenizer, corpus, **settings)
    return retrieval_metrics(q, d, relevant, ks)


def check_embeddings_path(out: str | Path) -> Path:
    """--out must be FILE.npy or FILE.safetensors, not an existing directory (checked up front)."""
    out = Path(out)
    if out.suffix.lower() not in (".npy", ".safetensors"):
        raise LmkilnError(f"--out {out}: write .npy or .safetensors")
    if out.is_dir():
        raise LmkilnError(f"--out {out} is a directory; give a file name ending in {out.suffix}")
    return out


def write_embeddings(out: str | Path, vectors: torch.Tensor, ids: list, meta: dict) -> list[str]:
    """FILE.npy (+ FILE.ids.json) or FILE.safetensors ("embeddings" (N, C), ids in the metadata)."""
    out = check_embeddings_path(out)
    make_output_dir(out.parent)
    remove_on_failure(out)
    suffix = out.suffix.lower()
    if suffix == ".safetensors":
        from lmkiln.runs.tensors import save_tensors

        metadata = {"ids": json.dumps(ids), **{k: json.dumps(v) for k, v in meta.items()}}
        save_tensors(out, {"embeddings": vectors.contiguous()}, metadata)
        return [str(out)]
    import numpy as np

    np.save(out, vectors.numpy())
    ids_file = out.with_suffix(".ids.json")
    remove_on_failure(ids_file)
    ids_file.write_text(json.dumps(ids), encoding="utf-8")
    return [str(out), str(ids_file)]
