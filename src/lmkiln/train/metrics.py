"""Metrics over a whole evaluation set (never averaged per batch): classification, regression,
and retrieval (recall@k, MRR). They are what the training loop evaluates in-loop.

Plain torch so they run anywhere the model runs; tests check them against scikit-learn.
"""

from __future__ import annotations

import torch


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, n_classes) counts; rows are true classes, columns predicted classes."""
    index = target.long() * n_classes + predicted.long()
    return torch.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))


def classification_metrics(predicted: torch.Tensor, target: torch.Tensor, n_classes: int) -> dict[str, float]:
    """accuracy, macro/micro precision, recall and F1 (zero where a class is never predicted/present)."""
    cm = confusion_matrix(predicted, target, n_classes).double()
    tp = cm.diag()
    support, predicted_count = cm.sum(dim=1), cm.sum(dim=0)
    precision = _safe_divide(tp, predicted_count)
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    micro = tp.sum() / cm.sum().clamp(min=1)  # micro P = R = F1 = accuracy for single-label tasks
    return {
        "accuracy": float(micro),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "precision_micro": float(micro),
        "recall_micro": float(micro),
        "f1_micro": float(micro),
    }


def per_class_f1(predicted: torch.Tensor, target: torch.Tensor, n_classes: int) -> list[float]:
    cm = confusion_matrix(predicted, target, n_classes).double()
    tp = cm.diag()
    precision = _safe_divide(tp, cm.sum(dim=0))
    recall = _safe_divide(tp, cm.sum(dim=1))
    return _safe_divide(2 * precision * recall, precision + recall).tolist()


def regression_metrics(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    error = predicted.double().reshape(target.shape) - target.double()
    return {"mse": float(error.pow(2).mean()), "mae": float(error.abs().mean())}


def multilabel_metrics(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """(N, L) 0/1 predictions against (N, L) 0/1 targets: subset accuracy, macro/micro P/R/F1.

    Macro averages over labels (zero where a label is never predicted/present), micro pools every
    (example, label) decision: scikit-learn's definitions with zero_division=0.
    """
    predicted, target = predicted.bool(), target.bool()
    tp = (predicted & target).sum(dim=0).double()  # (L,)
    predicted_count, support = predicted.sum(dim=0).double(), target.sum(dim=0).double()
    precision, recall = _safe_divide(tp, predicted_count), _safe_divide(tp, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    micro_p = _safe_divide(tp.sum(), predicted_count.sum())
    micro_r = _safe_divide(tp.sum(), support.sum())
    return {
        "subset_accuracy": float((predicted == target).all(dim=1).double().mean()),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "precision_micro": float(micro_p),
        "recall_micro": float(micro_r),
        "f1_micro": float(_safe_divide(2 * micro_p * micro_r, micro_p + micro_r)),
    }


# What each kind of target is scored with (all are computed; these are shown by default), and
# which way each metric improves (early stopping needs to know).
DEFAULT_METRICS: dict[str, list[str]] = {
    "classification": ["accuracy", "f1_macro"],
    "multilabel": ["f1_micro", "f1_macro"],
    "regression": ["mse", "mae"],
}
METRIC_NAMES: dict[str, list[str]] = {
    "classification": [
        "accuracy",
        *(f"{m}_{avg}" for avg in ("macro", "micro") for m in ("precision", "recall", "f1")),
    ],
    "multilabel": [
        "subset_accuracy",
        *(f"{m}_{avg}" for avg in ("macro", "micro") for m in ("precision", "recall", "f1")),
    ],
    "regression": ["mse", "mae"],
}
LOWER_IS_BETTER = {"loss", "mse", "mae"}
HIGHER_IS_BETTER = {
    "accuracy",
    "subset_accuracy",
    *(f"{m}_{avg}" for m in ("precision", "recall", "f1") for avg in ("macro", "micro")),
}


def task_metrics(kind: str, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Every metric of a target kind from raw model outputs (logits, or values for regression).

    classification: outputs (N, C) logits, target (N,) ids; multilabel: outputs (N, L) logits,
    target (N, L) 0/1 (predicted 1 where sigmoid > 0.5, i.e. logit > 0); regression: any shapes
    with equal element counts.
    """
    if kind == "classification":
        return classification_metrics(outputs.argmax(dim=-1), target, outputs.shape[-1])
    if kind == "multilabel":
        return multilabel_metrics(outputs > 0, target > 0.5)
    return regression_metrics(outputs, target)


# --------------------------------------------------------------------------------------------
# Retrieval: each query has exactly one relevant document in the corpus. Ranks come from
# similarity scores (higher is closer); a tie with the relevant document counts against it, so a
# constant scorer gets recall@1 = 0 rather than a lucky 1.


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
