"""Generating a token per row on CPUs: GEMMs of a few rows and attention against the KV cache in C.

At one token per step every GEMM is a matrix-vector product that reads each weight once, so its
speed is the memory bandwidth; and the dozens of small torch ops around attention cost more than
their arithmetic. `_decode` (a C extension, `_decode.c`) has a GEMV that streams the weights on its
own threads and a fused attention step that writes the new key and value into the cache and
attends in one call. Both are used only inside `decoding()`, which `generate_ids` enters once the
prompt is in the cache; everything else (training, the prompt, batches above DECODE_MAX_ROWS,
GPUs, dtypes other than fp32, builds without a C compiler) keeps torch's kernels.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lmkiln.data.fast_encode import usable_cpus

try:
    from lmkiln.model import _decode
except ImportError:  # built without a C compiler, or on Windows: decoding keeps torch's kernels
    _decode = None

DECODE_MAX_ROWS = 8
"""Most rows (sequences) a step may have to use the kernels; measured faster than torch's up to 8.
The GEMV multiplies each weight row with every input row in turn, so larger batches are left to
oneDNN's blocked GEMMs."""

_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)  # not a DTensor (FSDP) or another subclass

threads = 0
"""Threads of the GEMV inside `decoding()`; 0 outside it (then nothing here is used)."""
_depth = 0
_saved_torch_threads = 0
_lock = threading.Lock()


def available() -> bool:
    return _decode is not None


@contextmanager
def decoding(
    rows: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Iterator[None]:
    """Run generation steps of `rows` rows, one token each, of a model on `device` in `dtype` on
    the C kernels; a no-op where they cannot help (GPUs, dtypes other than fp32, large batches).

    Inside, torch runs on one thread and the GEMV on as many as torch had. Both thread pools
    busy-wait between jobs, so running them side by side on the same cores starves each other
    (numpy's OpenBLAS next to torch measured 50 ms instead of 2 ms per token); the other ops of a
    decode step are tiny and lose nothing on one thread. Reentrant and thread-safe: the outermost
    exit restores torch's setting.
    """
    global threads, _depth, _saved_torch_threads
    if (
        _decode is None
        or rows > DECODE_MAX_ROWS
        or torch.device(device).type != "cpu"
        or dtype != torch.float32
    ):
        yield
        return
    with _lock:
        if _depth == 0:
            _saved_torch_threads = torch.get_num_threads()
            threads = min(_saved_torch_threads, usable_cpus())
            torch.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                threads = 0
                torch.set_num_threads(_saved_torch_threads)


# --------------------------------------------------------------------------------------------
# GEMV: y = x @ w.T + b for a few rows of x


def gemm_eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    # called for every Linear of a decode step: the cheapest tests first, `is` for dtypes
    return (
        x.is_cpu
        and x.dtype is torch.float32
        and weight.dtype is torch.float32
        and weight.ndim == 2
        and weight.is_contiguous()
        and type(weight) in _PLAIN_TENSORS
        and x.shape[-1] == weight.shape[1]
        and 0 < x.numel() <= DECODE_MAX_ROWS * weight.shape[1]
        and (
            bias is None
            or (
                bias.dtype is torch.float32
                and bias.ndim == 1
                and bias.shape[0] == weight.shape[0]
                and bias.is_contiguous()
            )
        )
        and not torch.is_grad_enabled()
    )


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias; x (..., K) with at most DECODE_MAX_ROWS rows (`gemm_eligible`)."""
    x = x.contiguous()
    N, K = weight.shape
    out = x.new_empty((*x.shape[:-1], N))
    bias_ptr = 0 if bias is None else bias.data_ptr()
    _decode.linear(out.data_ptr(), x.data_ptr(), weight.data_ptr(), bias_ptr, x.numel() // K, N, K, threads)
    return out


# --------------------------------------------------------------------------------------------
# Attention of one new token per row


def attention_eligible(
    qkv: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    mask: torch.Tensor | None,
    dropout: float,
) -> bool:
    """qkv (B, 1, (H+2K)*D) from the fused projection; keys, values (B, K, capacity, D): one layer's
    cache; dropout: the attention dropout that applies now (the fused step has none)."""
    return (
        threads > 0
        and dropout == 0
        and qkv.dim() == 3
        and qkv.shape[1] == 1
        and qkv.dtype == torch.float32
        and qkv.device.type == "cpu"
        and keys.dtype == values.dtype == torch.float32
        and keys.is_contiguous()
        and values.is_contiguous()
        and start < keys.shape[2]
        and (mask is None or (mask.dtype == torch.bool and mask.shape[1:] == (1, 1, start + 1)))
        and not torch.is_grad_enabled()
    )


def attention(
    qkv: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    n_head: int,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """One decode step of causal attention: (B, 1, H*D) outputs; writes keys/values[:, :, start].

    rope: cos and sin (B, 1, 1, D) of each row's position; mask: bool (B or 1, 1, 1, start+1),
    True where a key may be attended (padding and sliding windows), as `build_mask` makes it.
    """
    B, n_kv, capacity, D = keys.shape
    if rope is None:
        qkv = qkv.contiguous()
    else:  # the kernel rotates q in place: not in the caller's tensor
        qkv = qkv.clone(memory_format=torch.contiguous_format)
    out = qkv.new_empty((B, 1, n_head * D))
    cos_ptr = sin_ptr = mask_ptr = mask_stride = 0
    if rope is not None:
        cos, sin = (t.reshape(-1, D).expand(B, D).float().contiguous() for t in rope)
        cos_ptr, sin_ptr = cos.data_ptr(), sin.data_ptr()
    if mask is not None:
        mask = mask.reshape(mask.shape[0], start + 1).contiguous()  # (B or 1, start+1)
        mask_ptr, mask_stride = mask.data_ptr(), (start + 1 if mask.shape[0] > 1 else 0)
    _decode.attention(
        out.data_ptr(), qkv.data_ptr(), keys.data_ptr(), values.data_ptr(), mask_ptr, cos_ptr, sin_ptr,
        mask_stride, B, n_head, n_kv, D, start, capacity, threads,
    )  # fmt: skip
    return out
