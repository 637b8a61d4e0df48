"""The classic feed-forward models: softmax(Wx + b) and the multi-layer perceptron.

    linear:  x (B, inputs) → Linear → logits (B, outputs)
    mlp:     x (B, inputs) → [Linear → activation → Dropout] × len(hidden) → Linear → logits

The softmax (or sigmoid, for multi-label) lives in the loss, as in PyTorch's CrossEntropyLoss, so
the models return logits. Weights use PyTorch's default initialisation, so a model built here is
the same model a textbook builds with `nn.Sequential`.
"""

from __future__ import annotations

import torch
from torch import nn

from lmkiln.config import MLPConfig
from lmkiln.errors import LmkilnError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


class MLP(nn.Module):
    """Linear layers with an activation (and dropout) between them; no hidden layer = linear model."""

    def __init__(
        self, inputs: int, hidden: list[int], outputs: int, activation: str = "relu", dropout: float = 0.0
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise LmkilnError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if not 0 <= dropout < 1:
            raise LmkilnError(f"mlp.dropout must be in [0, 1), got {dropout}")
        widths = [inputs, *hidden, outputs]
        if any(w <= 0 for w in widths):
            raise LmkilnError(f"layer widths must be positive, got {widths}")
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(width_in, width_out), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(widths[-2], widths[-1]))
        self.layers = nn.Sequential(*layers)
        self.inputs, self.outputs = inputs, outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, inputs) → (B, outputs)


def build_mlp(cfg: MLPConfig, inputs: int, outputs: int) -> MLP:
    """The model of an `mlp` config section; widths set to 0 there come from the data."""
    return MLP(cfg.inputs or inputs, list(cfg.hidden), cfg.outputs or outputs, cfg.activation, cfg.dropout)
