"""CPU matrix multiplies for Linear layers: oneDNN's fp32 GEMM where it beats the BLAS default,
applied to a model from outside by swapping its `nn.Linear` modules.

PyTorch sends fp32 `nn.Linear` on CPU to MKL's sgemm, which runs its AVX2 kernels on AMD CPUs.
oneDNN, shipped inside every PyTorch CPU build, runs AVX-512 kernels there: on the 2-core AMD
EPYC (Zen 5) development machine one training GEMM took 5.5 ms instead of 11.9 ms, and a
generation step's matrix-vector products stream the weights at 24 GB/s instead of 15
(docs/performance.md). `OneDNNLinear` is an `nn.Linear` (same parameters, state dict and init) whose
forward and backward GEMMs go through `torch.ops.mkldnn._linear_pointwise`: the same fp32
arithmetic in another summation order (relative differences ~1e-6).

The model files build plain `nn.Linear`; `swap_linears(model, "auto" | "onednn" | "default")`
replaces them in place, sharing the very same Parameter objects (tied weights stay tied,
optimizers built before keep working). Training setup calls it with `train.cpu_matmul`, loading a
run for inference with "auto". Nothing here changes a process-wide setting: two models in one
process may use different GEMMs. "auto" takes oneDNN on CPUs with AVX-512 — a fixed rule rather
than a timing, so that a resumed run computes exactly what the uninterrupted run computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CPU_MATMUL_CHOICES = ("auto", "onednn", "default")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def resolve_cpu_matmul(choice: str) -> bool:
    """Whether `choice` ("auto", "onednn" or "default") means oneDNN GEMMs on this machine."""
    if choice not in CPU_MATMUL_CHOICES:
        raise ValueError(f"cpu matmul must be one of {', '.join(CPU_MATMUL_CHOICES)}, got {choice!r}")
    if choice == "default" or not onednn_available():
        return False
    if choice == "onednn":
        return True
    return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


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


class _OneDNNLinearFunction(torch.autograd.Function):
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
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
    )


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` through oneDNN for CPU fp32 tensors (with gradients), else `F.linear` itself."""
    if not _eligible(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _OneDNNLinearFunction.apply(x, weight, bias)
    return _gemm(x, weight, bias)  # inference: no graph to record


class OneDNNLinear(nn.Linear):
    """`nn.Linear` (same parameters, state dict and init) whose CPU fp32 GEMMs use oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


def swap_linears(model: nn.Module, choice: str = "auto") -> nn.Module:
    """Route the CPU fp32 GEMMs of `model`'s Linear layers through oneDNN or torch's default.

    Every child whose class is exactly `nn.Linear` or `OneDNNLinear` becomes the one the choice
    names; other subclasses are left alone. Call it before wrapping the model (LoRA, DDP, FSDP,
    torch.compile). Returns the model (changed in place).
    """
    target = OneDNNLinear if resolve_cpu_matmul(choice) else nn.Linear
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Linear, OneDNNLinear) and type(child) is not target:
                setattr(parent, name, _as(target, child))
    return model


def _as(target: type[nn.Linear], layer: nn.Linear) -> nn.Linear:
    """`layer` as a `target` module holding the same Parameter objects (no copy: ties and
    optimizers built on them survive)."""
    swapped = target.__new__(target)
    nn.Module.__init__(swapped)
    swapped.in_features, swapped.out_features = layer.in_features, layer.out_features
    swapped.register_parameter("weight", layer.weight)
    swapped.register_parameter("bias", layer.bias)
    swapped.train(layer.training)
    return swapped
