"""Next-token cross-entropy from hidden states, without holding every logit at once.

A language model's logits are (tokens × vocabulary): 2,048 tokens of GPT-2's 50,257-token
vocabulary are 412 MB in fp32, and autograd keeps several such tensors alive from the forward to
the backward pass. Above `CHUNK_ABOVE` logits, `lm_cross_entropy` instead runs the output head
and the loss on row chunks of `CHUNK_LOGITS` and computes each chunk's gradients right away (the
"fused linear cross-entropy" of Liger-Kernel and others), keeping only the gradients for the
backward pass: peak memory holds one chunk's logits; the arithmetic is the same three matrix
products, plus adding up the head's gradient once per chunk. On the 2-core development CPU, with
GPT-2's vocabulary at 2,048 tokens per step, that took peak memory from 2,209 to 1,482 MB and made
the step 7% slower (docs/performance.md), hence the threshold: below it — every small
vocabulary, and batches whose logits fit in 256 MB — the loss is the plain computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.data.loader import IGNORE_INDEX

CHUNK_LOGITS = 1 << 23
"""Logits per chunk (32 MB in fp32)."""
CHUNK_ABOVE = 1 << 26
"""A batch with more logits than this (256 MB in fp32) is computed in chunks."""


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in at least fp32 (bf16 logits lose too much in the softmax)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _summed_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(
        upcast(logits), targets, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
    )


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss of head(hidden) in row chunks; the gradients are computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, targets, head, label_smoothing, rows, *params):
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_params = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            part = hidden[start : start + rows].detach().requires_grad_(grad_hidden is not None)
            with torch.enable_grad():
                loss = _summed_loss(head(part), targets[start : start + rows], label_smoothing)
            wrt = ([part] if grad_hidden is not None else []) + list(params)
            grads = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt else ()
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = grads[0]
                grads = grads[1:]
            for accumulated, grad in zip(grad_params, grads):
                if grad is not None:  # None: a parameter of the head that the loss does not use
                    accumulated += grad
            total += loss.detach()
        ctx.save_for_backward(*([grad_hidden] if grad_hidden is not None else []), *grad_params)
        ctx.has_hidden_grad = grad_hidden is not None
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0) * grad_total if ctx.has_hidden_grad else None
        return (grad_hidden, None, None, None, None, *(g * grad_total for g in saved))


def _chunkable(head: nn.Module) -> bool:
    # Only a head whose parameters are plain tensors: FSDP's sharded DTensor parameters are
    # gathered and reduced by hooks around module calls that a gradient taken here would bypass.
    return all(type(p) in (torch.Tensor, nn.Parameter) for p in head.parameters())


def lm_cross_entropy(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Sum over rows of cross-entropy(head(hidden), targets); IGNORE_INDEX targets add nothing.

    hidden (N, C), targets (N,). The sum is the same as one `F.cross_entropy` over all rows, up
    to the order of floating-point additions, and so are the gradients.

    Rows whose target is IGNORE_INDEX (padding, and the prompt side of fine-tuning examples)
    never reach the head: on sentence pairs they were over half the rows, and the head is the
    largest matrix of a small model (vocab × width).
    """
    kept = targets != IGNORE_INDEX
    if not bool(kept.all()):
        hidden, targets = hidden[kept], targets[kept]  # (N', C), (N',)
    rows = max(1, CHUNK_LOGITS // vocab_size)
    if hidden.shape[0] * vocab_size <= CHUNK_ABOVE or not _chunkable(head):
        return _summed_loss(head(hidden), targets, label_smoothing)
    if not torch.is_grad_enabled():
        parts = zip(hidden.split(rows), targets.split(rows))
        return sum(_summed_loss(head(h), t, label_smoothing) for h, t in parts)
    params = [p for p in head.parameters() if p.requires_grad]
    return _ChunkedHeadLoss.apply(hidden, targets, head, label_smoothing, rows, *params)
