"""LoRA adapters in checkpoint tensors: folding them into plain weights, without peft.

A LoRA fine-tuning run's checkpoints hold peft's names: `<layer>.base_layer.weight` (the frozen
W), `<layer>.lora_A.default.weight` (A, (r, in)) and `<layer>.lora_B.default.weight` (B, (out, r)).
Merging gives the plain model's `<layer>.weight` = W + scaling·B·A with scaling = lora_alpha / r,
peft's own formula; everything that loads a run for use (generation, evaluation, export) gets a
plain model this way. Injecting adapters for training is `lmkiln.finetune.methods`.
"""

from __future__ import annotations

import torch

from lmkiln.config import FinetuneConfig

ADAPTER = "default"  # peft's adapter name; it appears in the checkpoint keys


def lora_scaling(cfg: FinetuneConfig) -> float:
    return cfg.lora_alpha / cfg.lora_r


def has_lora(tensors: dict[str, torch.Tensor]) -> bool:
    return any(".lora_A." in name for name in tensors)


def merge_lora_tensors(tensors: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of a LoRA model → the plain model's tensors with W' = W + scaling·B·A."""
    lora_a = f".lora_A.{ADAPTER}.weight"
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        if name.endswith(".base_layer.weight"):
            prefix = name[: -len(".base_layer.weight")]
            a = tensors[prefix + lora_a].double()  # (r, in)
            b = tensors[prefix + f".lora_B.{ADAPTER}.weight"].double()  # (out, r)
            out[prefix + ".weight"] = (tensor.double() + scaling * (b @ a)).to(tensor.dtype)
        else:
            out[name.replace(".base_layer.", ".")] = tensor
    return out
