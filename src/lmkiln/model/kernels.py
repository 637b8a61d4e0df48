"""CPU matrix multiplies for Linear layers: oneDNN's fp32 GEMM where it beats the BLAS default.

PyTorch sends fp32 `nn.Linear` on CPU to MKL's sgemm, which runs its AVX2 kernels on AMD CPUs.
oneDNN, shipped inside every PyTorch CPU build, runs AVX-512 kernels there: on the 2-core AMD
EPYC (Zen 5) development machine one training GEMM took 5.5 ms instead of 11.9 ms (README,
"Performance"). `Linear` is an `nn.Linear` whose forward and backward GEMMs go through
`torch.ops.mkldnn._linear_pointwise` instead: the same fp32 arithmetic in another summation order
(relative differences ~1e-6). Small GEMMs (fewer than `MIN_ROWS` rows, e.g. generating one token)
stay on the default path, where oneDNN's ~15 µs call overhead would cost more than it saves.

The choice is process-wide, like torch's own backend flags: `set_cpu_matmul("auto" | "onednn" |
"default")`, called by `Runtime.start` with `train.cpu_matmul`. "auto" takes oneDNN on CPUs with
AVX-512 — a fixed rule rather than a timing, so that a resumed run computes exactly what the
uninterrupted run computed.

Generating a token per row is another regime: inside `decode.decoding()` GEMMs of a few rows go
to `decode.gemm` instead (lmkiln's matrix-vector kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.model import decode

CPU_MATMUL_CHOICES = ("auto", "onednn", "default")
MIN_ROWS = 1
"""Input rows (tokens) below which a GEMM stays on the default path."""

_choice = "auto"
_resolved: bool | None = None


def set_cpu_matmul(choice: str) -> None:
    """Pick the CPU fp32 GEMM of lmkiln's Linear layers: auto, onednn or default (MKL/BLAS)."""
    global _choice, _resolved
    if choice not in CPU_MATMUL_CHOICES:
        raise ValueError(f"cpu matmul must be one of {', '.join(CPU_MATMUL_CHOICES)}, got {choice!r}")
    _choice, _resolved = choice, None


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn() -> bool:
    """Whether CPU fp32 Linear layers go through oneDNN in this process."""
    global _resolved
    if _resolved is None:
        if _choice == "default" or not onednn_available():
            _resolved = False
        elif _choice == "onednn":
            _resolved = True
        else:
            _resolved = torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))
    return _resolved


@torch.library.custom_op("lmkiln::onednn_gemm", mutates_args=())
def _compiled_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Inductor lowers mkldnn._linear_pointwise only for frozen (constant) weights; as an opaque
    # custom op the GEMM stays a oneDNN call while torch.compile fuses everything around it.
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_compiled_gemm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) by oneDNN; x (..., K) is made contiguous, weight (N, K) may be strided."""
    if torch.compiler.is_compiling():
        return _compiled_gemm(x, weight, bias)
    # called directly in eager mode: the custom op's dispatch costs ~11 µs a call
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad.T @ x, (N, M) @ (M, K) → (N, K) contiguous, copying the smaller transposed operand.

    oneDNN wants its first operand contiguous: either grad.T (N×M values) or x.T (K×M values, plus
    a K×N copy to bring the transposed result back to the weight's layout) is copied.
    """
    (M, N), K = grad.shape, x.shape[1]
    if K * (M + N) < N * M:
        return _gemm(x.t(), grad.t(), None).t().contiguous()  # (K, N) → (N, K)
    return _gemm(grad.t(), x.t(), None)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _gemm(x, weight, bias)  # (..., N)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        grad2 = grad.reshape(-1, grad.shape[-1])  # (M, N)
        if ctx.needs_input_grad[0]:
            grad_x = _gemm(grad, weight.t(), None)  # (..., N) @ (N, K) → (..., K)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(grad2, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2.sum(0)
        return grad_x, grad_w, grad_b


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and type(weight) in (torch.Tensor, nn.Parameter)  # not a DTensor (FSDP) or another subclass
        and x.numel() >= MIN_ROWS * x.shape[-1]
        and not torch.is_autocast_enabled("cpu")
        and use_onednn()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN for CPU fp32 when `use_onednn()` and the GEMM is large enough,
    or through `decode.gemm` for the few rows of a generation step inside `decode.decoding()`."""
    if decode.threads and decode.gemm_eligible(x, weight, bias):
        return decode.gemm(x, weight, bias)
    if not _eligible(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _OneDNNLinear.apply(x, weight, bias)
    return _gemm(x, weight, bias)  # inference: no graph to record


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, state dict and init) whose CPU fp32 GEMMs may use oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
