"""What a fine-tuning method trains: every weight, all but frozen parts, or LoRA adapters.

- full: every parameter.
- freeze: the token/position embeddings (finetune.freeze_embeddings) and the first
  finetune.freeze_layers blocks are fixed. With tied embeddings the output projection is the
  same tensor, so it stays fixed too.
- lora: the base is frozen and peft injects rank-r adapters into the named Linear layers
  (module-name suffixes such as "wqkv", "w_down"). The model keeps its class and forward; the
  checkpoints hold base + adapter tensors, so resume is exact. `lmkiln.model.lora` folds the
  adapters back into plain weights (W + B·A·alpha/r, peft's own formula) without needing peft.

Tokens added for a template get new embedding rows (initialised to the mean of the old rows,
tied/untied output rows alike) that are trained under every method: a gradient mask keeps the
other rows of a frozen embedding exactly fixed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmkiln.config import FinetuneConfig
from lmkiln.errors import LmkilnError
from lmkiln.model.lora import ADAPTER
from lmkiln.model.transformer import Transformer

log = logging.getLogger("lmkiln")


@dataclass
class MethodSetup:
    trainable: int
    """Parameters the optimizer changes (only the new rows of a frozen embedding count)."""
    total: int
    peft_model: object | None = None
    """The peft wrapper of a LoRA model (for save_pretrained); the model itself is trained directly."""
    new_rows: list[int] = field(default_factory=list)
    row_masked: list[nn.Parameter] = field(default_factory=list)
    """Frozen matrices whose new-token rows train: weight decay must skip them (it would move every row)."""


# --------------------------------------------------------------------------------------------
# Vocabulary growth


def resize_vocab(model: Transformer, vocab_size: int, new_rows: list[int]) -> None:
    """Grow the embedding (and an untied lm_head) to vocab_size; the new rows start at the mean.

    The model's config is not touched: the caller gives the model its resolved config.
    """
    cfg = model.cfg
    old = model.tok_embed.weight.detach()
    if vocab_size > old.shape[0]:
        embed = nn.Embedding(vocab_size, cfg.d_model).to(old.device, old.dtype)
        embed.weight.data[: old.shape[0]] = old
        model.tok_embed = embed
        if cfg.tie_embeddings:
            model.lm_head.weight = model.tok_embed.weight
        else:
            head = nn.Linear(cfg.d_model, vocab_size, bias=False).to(old.device, old.dtype)
            head.weight.data[: old.shape[0]] = model.lm_head.weight.detach()
            model.lm_head = head
    keep = [i for i in range(model.tok_embed.weight.shape[0]) if i not in set(new_rows)]
    with torch.no_grad():
        for weight in {id(w): w for w in (model.tok_embed.weight, model.lm_head.weight)}.values():
            weight[new_rows] = weight[keep].mean(dim=0)


def _train_rows(weight: nn.Parameter, rows: list[int]) -> bool:
    """Make only `rows` of a frozen matrix learn: the other rows' gradients are zeroed.

    With zero gradients, Adam's moments stay zero and the rows do not move, as long as no weight
    decay applies (see `MethodSetup.row_masked`). Returns whether a mask was installed.
    """
    if weight.requires_grad:
        return False  # already trained as a whole
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[rows] = 1
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * mask)
    return True


def exclude_from_weight_decay(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Move `params` into a group without weight decay (decoupled decay would shrink frozen rows)."""
    ids = {id(p) for p in params}
    moved = []
    for group in optimizer.param_groups:
        if group["weight_decay"] and any(id(p) in ids for p in group["params"]):
            moved += [p for p in group["params"] if id(p) in ids]
            group["params"] = [p for p in group["params"] if id(p) not in ids]
    if moved:
        target = next((g for g in optimizer.param_groups if not g["weight_decay"]), None)
        if target is None:
            template = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
            optimizer.add_param_group({**template, "params": moved, "weight_decay": 0.0, "name": "no_decay"})
        else:
            target["params"] += moved


# --------------------------------------------------------------------------------------------
# Methods


def apply_method(
    model: nn.Module, backbone: Transformer, cfg: FinetuneConfig, new_rows: list[int]
) -> MethodSetup:
    """Set requires_grad (and inject adapters) for cfg.method; `model` may wrap `backbone` (a classifier)."""
    check_method_options(cfg, backbone)
    peft_model = None
    if cfg.method == "freeze":
        _freeze(backbone, cfg)
    elif cfg.method == "lora":
        peft_model = _inject_lora(model, backbone, cfg)
        for name, param in model.named_parameters():  # peft froze it, but a classification head is new
            if name.startswith("head."):
                param.requires_grad_(True)
    masked = []
    if new_rows:
        for weight in {id(w): w for w in (backbone.tok_embed.weight, backbone.lm_head.weight)}.values():
            if _train_rows(weight, new_rows):
                masked.append(weight)
    trainable = _count_trainable(model, masked, len(new_rows))
    total = sum(p.numel() for n, p in _unique(model) if ".lora_" not in n)
    return MethodSetup(trainable, total, peft_model, new_rows, masked)


def check_method_options(cfg: FinetuneConfig, backbone: Transformer) -> None:
    if cfg.method != "freeze" and cfg.freeze_layers:
        raise LmkilnError("finetune.freeze_layers needs finetune.method=freeze")
    if cfg.freeze_layers > backbone.cfg.n_layer or cfg.freeze_layers < 0:
        raise LmkilnError(
            f"finetune.freeze_layers is {cfg.freeze_layers} but the base model has {backbone.cfg.n_layer} blocks"
        )
    if cfg.method == "lora" and (cfg.lora_r <= 0 or not 0 <= cfg.lora_dropout < 1):
        raise LmkilnError("finetune.lora_r must be positive and finetune.lora_dropout in [0, 1)")


def _unique(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in seen:
            seen.add(id(param))
            out.append((name, param))
    return out


def _count_trainable(model: nn.Module, masked: list[nn.Parameter], rows: int) -> int:
    ids = {id(p) for p in masked}
    total = 0
    for _, param in _unique(model):
        if param.requires_grad:
            total += rows * param.shape[1] if id(param) in ids else param.numel()
    return total


def _freeze(backbone: Transformer, cfg: FinetuneConfig) -> None:
    frozen: list[nn.Module] = list(backbone.blocks[: cfg.freeze_layers])
    if cfg.freeze_embeddings:
        frozen.append(backbone.tok_embed)
        if backbone.pos_embed is not None:
            frozen.append(backbone.pos_embed)
    if not frozen:
        raise LmkilnError(
            "finetune.method=freeze freezes nothing: set finetune.freeze_embeddings=true or finetune.freeze_layers"
        )
    for module in frozen:
        module.requires_grad_(False)


def lora_target_names(backbone: Transformer, targets: list[str]) -> list[str]:
    """The configured suffixes that name Linear layers of this model (at least one must)."""
    linear = {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    linear.discard("lm_head")  # may be the embedding matrix itself (tied); adapters go in the blocks
    present = [t for t in targets if t in linear]
    if not present:
        raise LmkilnError(
            f"finetune.lora_targets {targets} name no Linear layer of the base model "
            f"(available: {', '.join(sorted(linear))})"
        )
    return present


def _inject_lora(model: nn.Module, backbone: Transformer, cfg: FinetuneConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise LmkilnError("finetune.method=lora needs peft: pip install 'lmkiln[lora]'") from None
    targets = lora_target_names(backbone, cfg.lora_targets)
    config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets
    )
    return get_peft_model(model, config, adapter_name=ADAPTER)


# --------------------------------------------------------------------------------------------
# Saving adapters


def save_adapter(method: MethodSetup, model: nn.Module, directory: Path, tokenizer_dir: Path | None) -> Path:
    """The adapter alone, in peft's format (adapter_config.json + adapter_model.safetensors).

    Rows of added tokens and a classification head are trained outside the adapter; they are
    saved beside it (extra_weights.safetensors) so the directory is complete on its own.
    """
    from lmkiln.runs.tensors import save_tensors

    directory.mkdir(parents=True, exist_ok=True)
    method.peft_model.save_pretrained(str(directory))
    extra: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    if method.new_rows:
        rows = torch.tensor(method.new_rows)
        for name in (
            "tok_embed.weight",
            "lm_head.weight",
            "backbone.tok_embed.weight",
            "backbone.lm_head.weight",
        ):
            if name in state:
                extra[name.replace("weight", "new_rows")] = state[name][rows].contiguous()
        extra["new_row_ids"] = rows
    for name, tensor in state.items():
        if name.startswith("head."):
            extra[name] = tensor.contiguous()
    if extra:
        save_tensors(directory / "extra_weights.safetensors", {k: v.detach().cpu() for k, v in extra.items()})
    if tokenizer_dir is not None:
        (directory / "tokenizer").mkdir(exist_ok=True)
        for file in tokenizer_dir.iterdir():
            (directory / "tokenizer" / file.name).write_bytes(file.read_bytes())
    readme = directory / "README.md"  # peft writes a model-card template; say what this is instead
    readme.write_text(
        "LoRA adapter written by lmkiln (peft format). Load it onto the base model with "
        "`peft.PeftModel.from_pretrained`, or use the run directory with `lmkiln generate`/`lmkiln eval`, "
        "which merge it.\n",
        encoding="utf-8",
    )
    (directory / "lmkiln_adapter.json").write_text(
        json.dumps({"new_rows": method.new_rows, "trainable_parameters": method.trainable}, indent=1),
        encoding="utf-8",
    )
    return directory
