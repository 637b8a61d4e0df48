"""Where and how training runs: device, precision, threads and the process group.

All rank-dependent behaviour asks `Runtime.is_main`. Launched by `torchrun`, the RANK/WORLD_SIZE
environment variables make this a process group member (gloo on CPU, nccl on CUDA); otherwise
it is a single process and every collective is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lmkiln.config import DistConfig, TrainConfig
from lmkiln.errors import LmkilnError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LmkilnError("train.device=cuda but no CUDA device is available; use --train.device auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise LmkilnError("train.device=mps but MPS is not available; use --train.device auto")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "auto":
        return torch.bfloat16 if bf16_ok else None
    if name == "bf16":
        return torch.bfloat16
    return None


def process_memory_mb(field: str = "VmRSS") -> float | None:
    """This process's resident memory (VmRSS) or its high-water mark (VmHWM) in MiB, from
    /proc/self/status; None where there is no such file (macOS, Windows)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dict:
    """Under torchrun, a store namespace per restart attempt.

    The workers of every attempt share torchrun's TCP store; without a fresh prefix, a restarted
    worker can read the previous attempt's (dead) peer addresses and fail to connect.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    return {
        "store": dist.PrefixStore(f"lmkiln/attempt_{attempt}", store),
        "rank": rank,
        "world_size": world_size,
    }


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = 600.0
    memory_at_start_mb: float | None = None
    """Resident memory when the runtime started, after the imports and before data and model: the
    baseline of `peak_memory_mb`, as the plan's prediction leaves out the imports."""
    _group_started: bool = field(default=False, repr=False)

    @classmethod
    def start(cls, cfg: TrainConfig, dist_cfg: DistConfig | None = None) -> Runtime:
        """Set threads, join the process group if launched by torchrun, pick device and precision."""
        dist_cfg = dist_cfg or DistConfig()
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(cfg.device)
        if device.type == "cuda" and world_size > 1:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if world_size > 1 and dist_cfg.strategy == "fsdp":
            # FSDP2's code (43 MiB resident) is an import: before the baseline, like lmkiln's own
            importlib.import_module("torch.distributed.fsdp")
        runtime = cls(
            device,
            resolve_precision(cfg.precision, device),
            rank,
            world_size,
            local_rank,
            timeout_s=dist_cfg.timeout_s,
            memory_at_start_mb=process_memory_mb(),
        )
        if world_size > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            timeout = datetime.timedelta(seconds=runtime.timeout_s)
            dist.init_process_group(backend, timeout=timeout, **_attempt_store(rank, world_size, timeout))
            runtime._group_started = True
        return runtime

    def peak_memory_mb(self) -> float | None:
        """Peak memory of training so far: on CUDA the most the caching allocator held; on the
        CPU the process's high-water mark less its memory at start (Linux)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_reserved(self.device) / 2**20
        peak = process_memory_mb("VmHWM")
        if peak is None or self.memory_at_start_mb is None:
            return None
        return peak - self.memory_at_start_mb

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def collective(self, name: str) -> Iterator[None]:
        """Name a collective so that a timeout or a dead peer is reported as what it was."""
        try:
            yield
        except RuntimeError as err:  # gloo/nccl timeouts and closed connections
            raise LmkilnError(
                f"collective '{name}' failed on rank {self.rank} of {self.world_size} ({str(err).splitlines()[0]}); "
                f"another process is hung or has died (timeout {self.timeout_s:.0f} s, --dist.timeout_s)"
            ) from None

    def all_reduce_sum(self, value: torch.Tensor, name: str = "all_reduce") -> torch.Tensor:
        if self.distributed:
            with self.collective(name):
                dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def all_reduce_max(self, value: torch.Tensor, name: str = "all_reduce") -> torch.Tensor:
        if self.distributed:
            with self.collective(name):
                dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def barrier(self, name: str = "barrier") -> None:
        if self.distributed:
            with self.collective(name):
                dist.barrier()

    def shutdown(self) -> None:
        if self._group_started and dist.is_initialized():
            dist.destroy_process_group()
            self._group_started = False


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 6
) -> float:
    """Best observed FLOP/s of a square matmul: the denominator of MFU on this machine."""
    import time

    # A private generator: touching the global RNG here would break bit-exact resume.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    from lmkiln.model.kernels import onednn_linear

    best = float("inf")
    # the best of the default BLAS and the GEMM lmkiln's Linear layers use (oneDNN on AVX-512 CPUs),
    # so MFU is measured against what the machine demonstrably does
    for multiply in (torch.matmul, lambda x, y: onednn_linear(x, y.t())):
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            multiply(a, b).sum().item()
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
