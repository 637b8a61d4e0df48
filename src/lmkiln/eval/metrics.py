"""Classification and regression metrics over a whole evaluation set (never averaged per batch).

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
