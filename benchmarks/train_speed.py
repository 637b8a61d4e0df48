"""Training throughput and MFU: lmkiln vs transformers' Trainer vs a plain PyTorch loop, by shape.

Each round trains every candidate from scratch for `steps` steps on the same synthetic tokens,
in turn; the first `warmup` steps of each run are dropped and the rest are pooled over rounds.
tokens/s = batch × seq_len / median step time. MFU = tokens/s × training FLOPs per token
(6 × matmul weights + attention, lmkiln's `training_flops_per_token`, the same for every candidate
since the shapes are identical) / the best matmul FLOP/s measured in this run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from benchmarks import peers
from benchmarks.common import Shape, load_average, matmul_peak, median, ratio, spread, synthetic_tokens

log = logging.getLogger("lmkiln.bench")


def flops_per_token(shape: Shape) -> float:
    from lmkiln.config import load_config
    from lmkiln.model.transformer import training_flops_per_token

    return float(
        training_flops_per_token(load_config(overrides=shape.lmkiln_overrides()).model, shape.seq_len)
    )


def best_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """FLOP/s of torch's default matmul and of lmkiln's oneDNN GEMM; MFU uses the larger."""
    from lmkiln.model import kernels

    out = {"torch_matmul": matmul_peak(device, dtype)}
    if device.type == "cpu" and dtype == torch.float32 and kernels.onednn_available():
        out["onednn_gemm"] = _onednn_peak()
    return out


def _onednn_peak(seconds: float = 1.0) -> float:
    from lmkiln.model.kernels import _gemm

    best = 0.0
    for size in (512, 1024, 2048):
        a, b = torch.randn(size, size), torch.randn(size, size)
        _gemm(a, b, None)
        deadline = time.perf_counter() + seconds / 3
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            _gemm(a, b, None)
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def candidates(
    shape: Shape, steps: int, device: torch.device, compile_rows: bool, gpu: bool = False
) -> dict[str, Callable[[], peers.Timed]]:
    tokens = synthetic_tokens(shape.vocab_size)
    lmkiln_extra = ["train.precision=bf16", "train.compile=true"] if gpu else []
    runs = {
        "lmkiln": lambda: peers.lmkiln_run(shape, steps, tokens, device, lmkiln_extra),
        "transformers": lambda: peers.hf_trainer_run(shape, steps, tokens, device, bf16=gpu, compile=gpu),
        "plain_pytorch": lambda: peers.plain_run(shape, steps, tokens, device, bf16=gpu),
    }
    if compile_rows and not gpu:
        runs["lmkiln_compile"] = lambda: peers.lmkiln_run(
            shape, steps, tokens, device, ["train.compile=true"]
        )
    return runs


def measure_shape(
    shape: Shape,
    steps: int,
    warmup: int,
    rounds: int,
    device: torch.device,
    compile_rows: bool = False,
    gpu: bool = False,
) -> dict:
    runs = candidates(shape, steps, device, compile_rows, gpu)
    steps_by: dict[str, list[float]] = {name: [] for name in runs}
    round_medians: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, float] = {}
    loads = []
    for index in range(rounds):
        for key, value in best_matmul_peak(device, torch.bfloat16 if gpu else torch.float32).items():
            peaks[key] = max(peaks.get(key, 0.0), value)
        for name, run in runs.items():
            times = run().step_seconds(warmup)
            steps_by[name] += times
            round_medians[name].append(median(times))
            log.info("  %s round %d %s: %.1f ms/step", shape.name, index + 1, name, 1e3 * median(times))
        loads.append(load_average()[0])
    tokens_per_step = shape.batch_size * shape.seq_len
    fpt = flops_per_token(shape)
    peak = max(peaks.values())
    rows = {}
    for name, times in steps_by.items():
        rate = tokens_per_step / median(times)
        rows[name] = {
            "step_ms": round(1e3 * median(times), 2),
            "step_ms_round_spread": [round(1e3 * t, 2) for t in spread(round_medians[name])],
            "steps_timed": len(times),
            "tokens_per_s": round(rate, 1),
            "mfu": round(rate * fpt / peak, 4),
        }
    lmkiln_rate = rows["lmkiln"]["tokens_per_s"]
    ceiling = None
    if device.type == "cpu":
        ceiling = mfu_ceiling(shape)
        seconds = (ceiling["gemm_ms"] + ceiling["attention_ms"]) / 1e3
        ceiling["mfu_ceiling"] = round(tokens_per_step * fpt / seconds / peak, 4)
        ceiling["lmkiln_step_ms_outside_gemm_attention"] = round(
            rows["lmkiln"]["step_ms"] - ceiling["gemm_ms"] - ceiling["attention_ms"], 2
        )
    return {
        "shape": shape.as_dict(),
        "describe": shape.describe(),
        "flops_per_token": fpt,
        "matmul_peak_flops": {k: round(v) for k, v in peaks.items()},
        "rows": rows,
        "speedup_vs_transformers": round(ratio(lmkiln_rate, rows["transformers"]["tokens_per_s"]), 3),
        "speedup_vs_plain_pytorch": round(ratio(lmkiln_rate, rows["plain_pytorch"]["tokens_per_s"]), 3),
        "mfu_bound": ceiling,
        "load_average_per_round": loads,
        "steps_per_run": steps,
        "warmup_steps_dropped": warmup,
        "rounds": rounds,
    }


def mfu_ceiling(shape: Shape, repeats: int = 5) -> dict:
    """What MFU could be if everything but the GEMMs and attention took no time (CPU, fp32).

    Times, at this shape's real sizes, the forward and both backward GEMMs of every Linear layer
    through lmkiln's kernels (`kernels._gemm`, `kernels._weight_grad`: the oneDNN path training
    uses) and SDPA's causal attention forward+backward, best of `repeats`. MFU cannot exceed
    model FLOPs / (peak × that time) with these kernels, whatever the rest of the step costs.
    """
    import torch.nn.functional as F

    from lmkiln.model import kernels

    d, M, T, V = shape.d_model, shape.batch_size * shape.seq_len, shape.seq_len, shape.vocab_size
    layers = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]  # (in, out) of qkv, proj, up, down

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def gemms(k: int, n: int) -> float:
        x, w, g = torch.randn(M, k), torch.randn(n, k), torch.randn(M, n)
        return best(
            lambda: (kernels._gemm(x, w, None), kernels._gemm(g, w.t(), None), kernels._weight_grad(g, x))
        )

    linear_s = shape.n_layer * sum(gemms(k, n) for k, n in layers) + gemms(d, V)
    heads = shape.n_head
    q, k, v = (torch.randn(shape.batch_size, heads, T, d // heads, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape.batch_size, heads, T, d // heads)
    attention_s = shape.n_layer * best(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
    )
    return {"gemm_ms": round(1e3 * linear_s, 2), "attention_ms": round(1e3 * attention_s, 2)}
