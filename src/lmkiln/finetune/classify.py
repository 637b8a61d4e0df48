"""Sequence classification with a decoder backbone: hidden states → pooling → a linear head.

The backbone is any `Transformer` (a pretrained run, fully trained, frozen in part or with LoRA
adapters); the head maps the pooled final hidden state (B, C) to class logits (B, n_classes).
Pooling is at the last real token (a causal model has read the whole text there; right padding
is skipped by the attention mask) or the mean over real tokens. Training goes through the same
`TrainLoop`, with the shared `SupervisedLoss` criteria and the shared metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmkiln.eval.metrics import classification_metrics
from lmkiln.finetune.examples import TokenExample, classification_collate
from lmkiln.model.transformer import Transformer
from lmkiln.train.objectives import Batch, SupervisedLoss
from lmkiln.train.runtime import Runtime


def pool_last(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) → (B, C) at each row's last real token (right padding)."""
    last = mask.sum(dim=1).clamp(min=1) - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pool_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) → (B, C): the mean over real tokens."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


POOLING: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "last": pool_last,
    "mean": pool_mean,
}


class SequenceClassifier(nn.Module):
    """`forward(input_ids, attention_mask=, position_ids=)` → class logits (B, n_classes)."""

    def __init__(self, backbone: Transformer, n_classes: int, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {', '.join(POOLING)}, got {pooling!r}")
        self.backbone, self.pooling = backbone, pooling
        self.head = nn.Linear(backbone.cfg.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=backbone.cfg.init_std)
        nn.init.zeros_(self.head.bias)

    @property
    def cfg(self):
        return self.backbone.cfg

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone.hidden_states(
            input_ids, attention_mask=attention_mask, position_ids=position_ids
        )  # (B, T, C)
        return self.head(POOLING[self.pooling](hidden, attention_mask))


@dataclass
class ClassificationLoss:
    """A SupervisedLoss criterion on the classifier's logits; -1 padding slots carry IGNORE_INDEX."""

    criterion: SupervisedLoss = field(default_factory=SupervisedLoss)

    def count(self, batch: Batch) -> torch.Tensor:
        return self.criterion.count({"y": batch["y"]})

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(
            batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        )
        return self.criterion.total(logits, {"y": batch["y"]})


def _batches(examples: Sequence[TokenExample], batch_size: int, pad_id: int):
    collate = classification_collate(examples, pad_id)
    for start in range(0, len(examples), batch_size):
        yield collate(list(range(start, min(start + batch_size, len(examples)))))


@torch.no_grad()
def predict(
    model: nn.Module, examples: Sequence[TokenExample], batch_size: int, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, loss per example) for every example, in order."""
    predicted, losses = [], []
    for batch in _batches(examples, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(
            batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        )
        predicted.append(logits.argmax(dim=-1).cpu())
        losses.append(nn.functional.cross_entropy(logits.float(), batch["y"], reduction="none").cpu())
    return torch.cat(predicted), torch.cat(losses)


def classification_evaluator(
    examples: Sequence[TokenExample], n_classes: int, batch_size: int, pad_id: int
) -> Callable[[nn.Module, Runtime], dict[str, float]]:
    """Validation loss, accuracy and macro F1 over the whole validation set."""
    target = torch.tensor([e.label for e in examples])

    def evaluate(model: nn.Module, runtime: Runtime) -> dict[str, float]:
        predicted, losses = predict(model, examples, batch_size, pad_id, runtime.device)
        metrics = classification_metrics(predicted, target, n_classes)
        return {
            "val_loss": float(losses.mean()),
            "accuracy": metrics["accuracy"],
            "f1_macro": metrics["f1_macro"],
        }

    return evaluate


def load_classifier(path: str | Path, device: str = "cpu"):
    """(classifier, tokenizer, config) of a classification fine-tuning run (LoRA merged)."""
    from lmkiln.config import from_dict
    from lmkiln.data.tokenizer import Tokenizer
    from lmkiln.finetune.methods import lora_scaling, merge_lora_tensors
    from lmkiln.infer.load import find_checkpoint
    from lmkiln.train import checkpoint as ckpt
    from lmkiln.train.loop import load_model_tensors

    run_dir, checkpoint = find_checkpoint(path)
    saved = ckpt.read_checkpoint(checkpoint)
    cfg = from_dict(saved.trainer["config"], f"{checkpoint}/trainer.json")
    model = SequenceClassifier(Transformer(cfg.model), len(cfg.finetune.labels), cfg.finetune.pooling)
    tensors = saved.model
    if any(".lora_A." in k for k in tensors):
        tensors = merge_lora_tensors(tensors, lora_scaling(cfg.finetune))
    load_model_tensors(model, tensors, str(checkpoint / "model.safetensors"))
    return model.to(torch.device(device)).eval(), Tokenizer.load(run_dir / "tokenizer"), cfg


def is_classifier_checkpoint(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("head.") for k in tensors) and any(k.startswith("backbone.") for k in tensors)
