"""Fine-tuning's ingredients: the task records, the tokenizer with its template tokens, and the
model (a base grown for new tokens, under a classification head when the format asks for one).

`lmkiln.tasks.finetune` puts them together with a method (`lmkiln.finetune.methods`) into a run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from lmkiln.config import Config, FinetuneConfig, ModelConfig
from lmkiln.data.formats import Record, read_records
from lmkiln.data.templates import chat_template_of
from lmkiln.data.tokenizer import CHATML_TEMPLATE, IM_END, IM_START, Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.finetune.methods import resize_vocab
from lmkiln.model.classifier import SequenceClassifier
from lmkiln.model.kernels import swap_linears
from lmkiln.model.transformer import Transformer


def check_finetune_config(cfg: Config) -> None:
    ft = cfg.finetune
    if not ft.base:
        raise LmkilnError("fine-tuning needs a base model: --base RUN_DIR (finetune.base)")
    if not ft.data:
        raise LmkilnError("fine-tuning needs training data: --data FILE (finetune.data)")
    if ft.packing and ft.format == "classification":
        raise LmkilnError("finetune.packing applies to generative formats, not classification")
    preference = ft.format == "preference"
    if preference and ft.objective == "sft":
        raise LmkilnError("finetune.format=preference trains with objective dpo or orpo (--objective dpo)")
    if ft.objective != "sft" and not preference:
        raise LmkilnError(
            f"finetune.objective={ft.objective} needs preference pairs: format=preference "
            f"(rows of prompt, chosen, rejected)"
        )
    if ft.reference == "adapters_disabled" and ft.method != "lora":
        raise LmkilnError(
            f"finetune.reference=adapters_disabled needs method=lora (method is {ft.method}); "
            f"use reference=precomputed or auto"
        )
    if ft.packing and preference:
        raise LmkilnError(
            "finetune.packing does not apply to preference pairs (each pair is one padded batch)"
        )
    if ft.max_length < 0 or ft.eval_samples < 0 or ft.max_new_tokens <= 0:
        raise LmkilnError("finetune.max_length and finetune.eval_samples must be ≥ 0, max_new_tokens > 0")


def split_records(cfg: Config) -> tuple[list[Record], list[Record]]:
    ft = cfg.finetune
    train = read_records(ft.data, ft)
    if ft.val_data:
        return train, read_records(ft.val_data, ft)
    if not 0 <= ft.val_fraction < 1:
        raise LmkilnError(f"finetune.val_fraction must be in [0, 1), got {ft.val_fraction}")
    n_val = int(round(len(train) * ft.val_fraction))
    if n_val >= len(train):
        raise LmkilnError(
            f"{ft.data}: {len(train)} examples leave none for training after the validation split"
        )
    order = np.random.default_rng([cfg.train.seed, 11]).permutation(len(train))
    held = set(order[:n_val].tolist())
    return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]


def resolve_labels(cfg: FinetuneConfig, train: list[Record], val: list[Record]) -> list[str]:
    labels = list(cfg.labels) or sorted({r.targets[0] for r in train})
    for record in val:
        if record.targets[0] not in labels:
            raise LmkilnError(
                f"{record.location}: label {record.targets[0]!r} does not occur in the training data "
                f"({', '.join(labels)}); declare the label set with finetune.labels"
            )
    if len(labels) < 2:
        raise LmkilnError(f"classification needs at least two labels, found {labels}")
    return labels


def uses_chat(cfg: FinetuneConfig, records: list[Record]) -> bool:
    """Whether the examples are conversations: the chat format, or preference pairs whose prompt is
    `messages` (then every row must be; one template and one EOS serve the whole run)."""
    if cfg.format != "preference":
        return cfg.format == "chat"
    chat = bool(records) and bool(records[0].messages)
    odd = next((r for r in records if bool(r.messages) != chat), None)
    if odd is not None:
        kind = "a prompt" if chat else "messages"
        raise LmkilnError(
            f"{odd.location}: this row has {kind} while {records[0].location} does not; preference rows "
            f"are either all prompt strings or all conversations (messages)"
        )
    return chat


def prepare_tokenizer(
    tokenizer: Tokenizer, cfg: FinetuneConfig, chat: bool | None = None
) -> tuple[Tokenizer, list[int]]:
    """The fine-tuning tokenizer and the ids of tokens it adds (they need new embedding rows).

    Chat adds the ChatML markers when the tokenizer has no template of its own and lacks them,
    and its EOS becomes the template's end-of-turn token: generation and any tool reading the
    saved tokenizer then stop where an assistant turn ends.
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    chat = cfg.format == "chat" if chat is None else chat
    wanted = list(cfg.add_tokens)
    template = tokenizer.chat_template
    if chat and not template:
        template = CHATML_TEMPLATE
        wanted = [IM_START, IM_END, *wanted]
    missing = [t for t in dict.fromkeys(wanted) if tokenizer.token_id(t) is None]
    hf = HFTokenizer.from_str(tokenizer.json)
    if missing:
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    eos = tokenizer.eos_token
    if chat:
        probe = Tokenizer(
            hf, chat_template=template, eos_token=eos, pad_token=tokenizer.pad_token, fast=False
        )
        names = {probe.decode([i]) for i in probe.special_ids}
        eos = chat_template_of(probe).end_of_turn(names)
        if eos is None:
            raise LmkilnError(
                "the chat template closes assistant turns with no special token, so generation could not "
                "stop; use a template with an end-of-turn token (ChatML: <|im_end|>)"
            )
    tuned = Tokenizer(
        hf,
        chat_template=template,
        eos_token=eos,
        pad_token=tokenizer.pad_token,
        bos_token=tokenizer.bos_token,
        fast=tokenizer.fast_path != "tokenizers",
    )
    return tuned, [tuned.token_id(t) for t in missing]


def grown_model_config(base: ModelConfig, new_rows: list[int]) -> ModelConfig:
    """The base's model section with room for the tokens the tokenizer added."""
    if not new_rows:
        return base
    return dataclasses.replace(base, vocab_size=max(base.vocab_size, max(new_rows) + 1))


def build_finetune_model(
    backbone: Transformer, cfg: Config, new_rows: list[int], labels: list[str], device: torch.device
) -> tuple[nn.Module, Transformer]:
    """(model, backbone): the base on the device, grown for new tokens, maybe under a head.

    `cfg` is the resolved config: its model section is the base's, grown by `grown_model_config`.
    """
    backbone = backbone.to(device)
    if new_rows:
        resize_vocab(backbone, cfg.model.vocab_size, new_rows)
    backbone.cfg = cfg.model
    swap_linears(backbone, cfg.train.cpu_matmul)  # before LoRA wraps the layers
    torch.manual_seed(cfg.train.seed)  # head and adapter initialisation
    if cfg.finetune.format == "classification":
        return SequenceClassifier(backbone, len(labels), cfg.finetune.pooling).to(device), backbone
    return backbone, backbone
