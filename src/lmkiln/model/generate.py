"""Sampling from a language model with its KV cache, token ids in and out: batched, seeded.

Prompts of different lengths are left-padded; an attention mask hides the padding and position
ids count real tokens only, so every row is generated exactly as it would be alone. Prompts of
equal length need no mask: then each step runs the model on the new token alone. This is plain
PyTorch (SDPA, the cache, `inference_mode`); text in and out, streaming and stop strings are
`lmkiln.infer.generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lmkiln.errors import LmkilnError
from lmkiln.model.transformer import KVCache


@dataclass
class Sampling:
    max_new_tokens: int = 200
    """Upper bound on generated tokens per prompt."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy decoding."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0 = all)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches p."""
    seed: int | None = None
    """Seed for reproducible samples."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation (not included in the output)."""


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) logits with everything outside top-k / top-p set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        beyond = probs.cumsum(dim=-1) - probs > top_p  # keep the token that crosses p
        sorted_logits = sorted_logits.masked_fill(beyond, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) next token ids."""
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(
    model: nn.Module,
    prompts: list[list[int]],
    sampling: Sampling,
    eos_id: int | None,
    pad_id: int = 0,
    use_cache: bool = True,
    on_tokens: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt, stopping at EOS (excluded) or max_new_tokens.

    `on_tokens(tokens (B,), active (B,))` is called after every step with the rows whose token is
    real output; it may return a (B,) mask of rows to stop (stop strings, streaming). `use_cache=False` recomputes
    the whole sequence every step: slower, and the reference the cache is tested against.
    Prompts of equal length need no padding mask: then each step runs the model on the new
    token alone (the fast path); otherwise a mask hides the left padding.
    """
    if any(len(p) == 0 for p in prompts):
        raise LmkilnError("every prompt needs at least one token")
    cfg = model.cfg
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    if longest >= cfg.block_size:
        raise LmkilnError(
            f"prompt of {longest} tokens leaves no room in the model's context of {cfg.block_size}"
        )
    steps = min(sampling.max_new_tokens, cfg.block_size - longest)
    B = len(prompts)
    width = longest + steps
    ids = torch.full((B, width), pad_id, dtype=torch.long, device=device)
    mask = torch.ones((B, width), dtype=torch.long, device=device)  # generated tokens are all real
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) : longest] = torch.tensor(prompt, device=device)
        mask[row, : longest - len(prompt)] = 0
    padded = any(len(p) != longest for p in prompts)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, width): real tokens count from 0
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    dtype = next(model.parameters()).dtype
    cache = KVCache.empty(cfg, B, width, device, dtype) if use_cache else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    can_finish = eos_id is not None or on_tokens is not None
    emitted = torch.full((B, steps), not can_finish, dtype=torch.bool, device=device)  # real output
    length = longest
    for step in range(steps):
        start = cache.length if cache is not None else 0
        inputs = {}
        if padded:
            inputs = {"attention_mask": mask[:, :length], "position_ids": positions[:, start:length]}
        logits = model(ids[:, start:length], cache=cache, **inputs)
        token = sample_next(logits[:, -1], sampling, generator)
        length += 1
        if not can_finish:  # nothing can end a row: every token is output
            ids[:, length - 1] = token
            continue
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        is_eos = token == eos_id if eos_id is not None else torch.zeros_like(finished)
        active = ~finished & ~is_eos  # rows whose token is real output
        finished = finished | is_eos
        ids[:, length - 1] = token
        emitted[:, step] = active
        if on_tokens is not None:
            stop_rows = on_tokens(token, active)
            if stop_rows is not None:
                finished = finished | stop_rows
        if bool(finished.all()):
            break
    new = ids[:, longest:length].tolist()
    keep = emitted[:, : length - longest].tolist()
    return [[t for t, k in zip(row, flags) if k] for row, flags in zip(new, keep)]
