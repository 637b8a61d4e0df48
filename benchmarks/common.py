"""Pieces every benchmark section shares: the model shapes, the machine, statistics, the matmul peak.

Figures are medians over alternating rounds (lmkiln, peer, floor, lmkiln, peer, floor, ...): a
burst of background load then slows every candidate of one round instead of one candidate of
the whole run, so the ratios stay meaningful on a shared machine.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Shape:
    """A GPT-2-style model and its training batch (the same for lmkiln and every peer)."""

    name: str
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    batch_size: int
    vocab_size: int

    def lmkiln_overrides(self) -> list[str]:
        """Config overrides that make lmkiln's Transformer exactly GPT-2's architecture."""
        return [
            f"model.n_layer={self.n_layer}",
            f"model.n_head={self.n_head}",
            f"model.d_model={self.d_model}",
            f"model.block_size={self.seq_len}",
            f"model.vocab_size={self.vocab_size}",
            "model.norm=layer",
            "model.position=learned",
            "model.mlp=gelu",
            "model.bias=true",
            "model.tie_embeddings=true",
            "model.dropout=0.0",
            f"train.seq_len={self.seq_len}",
            f"train.batch_size={self.batch_size}",
        ]

    def parameters(self) -> int:
        """Unique parameters of the GPT-2 architecture at this shape (tied embeddings counted once)."""
        d = self.d_model
        block = 12 * d * d + 13 * d  # qkv, proj, 4x MLP with biases, two LayerNorms
        return self.n_layer * block + (self.vocab_size + self.seq_len) * d + 2 * d

    def describe(self) -> str:
        return (
            f"{self.n_layer}L/{self.n_head}H/{self.d_model}, ctx {self.seq_len}, batch {self.batch_size}, "
            f"vocab {self.vocab_size}, {self.parameters() / 1e6:.1f}M params"
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "parameters": self.parameters()}


SHAPES: dict[str, Shape] = {
    # nanoGPT's CPU Shakespeare example (README "I only have a macbook"): char vocabulary of 65
    "small": Shape("small", 4, 4, 128, 64, 12, 65),
    # nanoGPT's shakespeare_char model (6L/6H/384, ctx 256) at a CPU-sized batch of 8
    "10m": Shape("10m", 6, 6, 384, 256, 8, 65),
    # a BPE-vocabulary model between 25 and 50M parameters
    "30m": Shape("30m", 8, 8, 512, 256, 8, 8192),
    # the 10m shape with GPT-2's vocabulary: the logits dominate memory (memory section)
    "10m-v50k": Shape("10m-v50k", 6, 6, 384, 256, 8, 50257),
}

GPU_SHAPES: dict[str, Shape] = {
    "gpt2-124m": Shape("gpt2-124m", 12, 12, 768, 1024, 16, 50304),
    "gpt2-350m": Shape("gpt2-350m", 24, 16, 1024, 1024, 8, 50304),
}


def synthetic_tokens(vocab_size: int, count: int = 1 << 20, seed: int = 0) -> np.ndarray:
    """Uniform random token ids: throughput does not depend on what the tokens say."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=count).astype(np.uint16)


def machine() -> dict:
    """What the figures were measured on (recorded in every report)."""
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name in ("transformers", "tokenizers", "tiktoken"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> list[float]:
    """(min, max) of the per-round figures, to show how much load moved them."""
    return [min(values), max(values)] if values else []


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> float:
    """Best FLOP/s of square matmuls (512..4096) on this device: the denominator of every MFU here.

    The best over sizes and repeats (not the median) is the honest denominator: it is what the
    hardware demonstrably does, so background load can only make MFU look worse, never better.
    """
    sizes = (512, 1024, 2048, 4096) if device.type == "cuda" else (512, 1024, 2048)
    generator = torch.Generator(device=device).manual_seed(0)
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        deadline = time.perf_counter() + seconds / len(sizes)
        (a @ b).sum().item()  # warm-up
        while time.perf_counter() < deadline:
            sync(device)
            start = time.perf_counter()
            c = a @ b
            sync(device)
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
            del c
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")
