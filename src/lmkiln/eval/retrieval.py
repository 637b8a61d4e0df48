"""Retrieval metrics: recall@k and mean reciprocal rank of (query, relevant document) pairs.

Each query has exactly one relevant document in the corpus. Ranks come from similarity scores
(higher is closer); a tie with the relevant document counts against it, so a constant scorer
gets recall@1 = 0 rather than a lucky 1.
"""

from __future__ import annotations

import torch


def relevant_ranks(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's relevant document; scores (Q, N), relevant (Q,) indices."""
    target = scores.gather(1, relevant[:, None])  # (Q, 1)
    others = torch.ones_like(scores, dtype=torch.bool)
    others[torch.arange(len(relevant)), relevant] = False
    return 1 + ((scores >= target) & others).sum(dim=1)


def retrieval_metrics(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    relevant: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """recall@k for each k and MRR, scoring by dot product (cosine for unit-length embeddings).

    queries (Q, C), corpus (N, C), relevant (Q,) the index in corpus of each query's document.
    Queries are scored in chunks so a large corpus never needs a (Q, N) matrix at once.
    """
    ranks = torch.cat(
        [
            relevant_ranks(queries[i : i + chunk].float() @ corpus.float().T, relevant[i : i + chunk])
            for i in range(0, len(queries), chunk)
        ]
    )
    out = {f"recall@{k}": float((ranks <= k).double().mean()) for k in ks}
    out["mrr"] = float((1.0 / ranks.double()).mean())
    return out
