"""Figures of an evaluation: the confusion matrix as a PNG (matplotlib, imported only when drawing)."""

from __future__ import annotations

from pathlib import Path

import torch

from lmkiln.files import atomic_path


def plot_confusion_matrix(
    confusion: torch.Tensor, path: Path, class_names: list[str] | None = None, title: str = ""
) -> Path:
    """Counts with true classes as rows and predicted classes as columns, each cell labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion.cpu().numpy()
    n = counts.shape[0]
    names = class_names or [str(i) for i in range(n)]
    size = min(4 + 0.45 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(
        xticks=range(n),
        yticks=range(n),
        xticklabels=names,
        yticklabels=names,
        xlabel="predicted class",
        ylabel="true class",
        title=title or "confusion matrix",
    )
    plt.setp(ax.get_xticklabels(), rotation=45 if max(map(len, names)) > 2 else 0, ha="right")
    if n <= 30:  # beyond that the numbers are unreadable anyway
        threshold = counts.max() / 2 if counts.size else 0
        for row in range(n):
            for column in range(n):
                value = int(counts[row, column])
                color = "white" if value > threshold else "black"
                ax.text(column, row, str(value), ha="center", va="center", color=color, fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically (a half-written plot is never left behind)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return path
