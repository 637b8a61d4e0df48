"""Measured peak memory and step time of a training run, in a fresh process.

`python -m lmkiln.plan.measure DIR STEPS KEY=VALUE ...` builds the model and optimizer a run of
that config builds, trains STEPS steps on random tokens (rows, for an MLP) and writes
DIR/rank0.json (a file per process under torchrun): `peak_mb`, the process's peak resident
memory (VmHWM) minus its resident memory just before the model and its synthetic batch were
built (imports excluded), and `step_s`, the fastest step after the first two (the least
disturbed by other processes on a shared machine); and `states_mb`, the MiB of its weights and
optimizer state (global sizes under FSDP2). A fresh process, because a peak cannot be
reset. The plan uses it once per machine for the runtime's own memory; the plan-accuracy
benchmark uses it for every configuration it checks.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def measure_here(overrides: list[str], steps: int) -> dict[str, float]:
    """Train `steps` steps in this process; call it in a fresh one (see `measure`). Launched by
    torchrun, each process trains its share of the batch through DDP or FSDP2 (dist.strategy)."""
    import torch

    from lmkiln.config import build_config, parse_overrides, resolve
    from lmkiln.plan.speed import build_workload
    from lmkiln.train.distributed import parallelize
    from lmkiln.train.optim import build_optimizer
    from lmkiln.train.runtime import Runtime, process_memory_mb
    from lmkiln.train.step import train_step

    # LoRA keys next to a pretraining model's: the sections are not checked against a task
    cfg = build_config([("measure", parse_overrides(overrides))], check_sections=False)
    lora = cfg.finetune if cfg.finetune.method == "lora" else None
    if lora is not None:
        import peft  # noqa: F401  (its imports are not training memory)
    runtime = Runtime.start(cfg.train, cfg.dist)
    plan = resolve(cfg, runtime.world_size).batch
    baseline = process_memory_mb("VmRSS")
    work = build_workload(cfg, cfg.model, plan.micro_batch_size, runtime.device, lora)
    model = parallelize(work.model.train(), cfg, runtime)
    optimizer = build_optimizer(work.model, cfg.optim)  # after FSDP2 made the parameters shards
    durations = []
    for _ in range(steps):
        started = time.perf_counter()
        result = train_step(model, work.objective, [work.batch] * plan.accumulation, runtime, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.loss.item()
        durations.append(time.perf_counter() - started)
    peak = process_memory_mb("VmHWM") - baseline
    runtime.shutdown()
    states = [*work.model.parameters(), *(t for s in optimizer.state.values() for t in s.values())]
    states_mb = sum(t.numel() * t.element_size() for t in states if torch.is_tensor(t)) / 2**20
    return {"peak_mb": peak, "step_s": min(durations[2:] or durations), "states_mb": states_mb}


def measure(
    overrides: list[str], steps: int = 6, processes: int = 1, env: dict[str, str] | None = None
) -> dict[str, float]:
    """`measure_here` in a fresh Python process (same interpreter and lmkiln, `env` added to the
    environment), or in `processes` processes under torchrun: then the largest peak and the
    slowest step of any process."""
    import lmkiln

    source = os.path.dirname(os.path.dirname(lmkiln.__file__))
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])),
    }
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        env["OMP_NUM_THREADS"] = env.get(
            "OMP_NUM_THREADS", "1"
        )  # torchrun's default; set, it keeps torchrun's warning out
    with tempfile.TemporaryDirectory() as out:  # a file per process: their stdout lines interleave
        proc = subprocess.run(
            [*launcher, "-m", "lmkiln.plan.measure", out, str(steps), *overrides],
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"measuring {' '.join(overrides)} failed:\n{proc.stderr[-2000:]}")
        results = [json.loads(path.read_text(encoding="utf-8")) for path in Path(out).glob("*.json")]
    if len(results) != processes:
        raise RuntimeError(
            f"measuring {' '.join(overrides)}: {len(results)} of {processes} processes reported"
        )
    return {
        "peak_mb": max(r["peak_mb"] for r in results),
        "step_s": max(r["step_s"] for r in results),
        "states_mb": max(r["states_mb"] for r in results),
    }


TINY: dict[str, list[str]] = {
    "transformer": [
        "model.n_layer=1",
        "model.d_model=64",
        "model.n_head=2",
        "model.vocab_size=64",
        "model.block_size=16",
        "train.seq_len=16",
        "train.batch_size=1",
    ],
    "mlp": ["task=supervised", "mlp.inputs=4", "mlp.hidden=[4]", "mlp.outputs=2", "train.batch_size=1"],
}
"""Per kind of model, one whose tensors are negligible: what its training adds is the runtime's own
memory (the kernels a transformer's step touches are many more than an MLP's)."""

REFERENCE: dict[str, list[str]] = {
    "transformer": [
        "model.n_layer=3",
        "model.d_model=192",
        "model.n_head=4",
        "model.vocab_size=2048",
        "model.block_size=128",
        "train.seq_len=128",
        "train.batch_size=16",
    ],
    "mlp": [
        "task=supervised",
        "mlp.inputs=1024",
        "mlp.hidden=[1536,1536]",
        "mlp.outputs=10",
        "train.batch_size=384",
    ],
}
"""Per kind, a model whose step allocates a few hundred MiB (a transformer) or a few tens (an MLP):
how much of that the C allocator keeps. Large enough that what it keeps stands above the
differences between processes; every tensor under 32 MiB, so that all of its step is heap."""

REFERENCE_RUNS = 3
"""Processes measured under the default allocator; the median counts (the share kept differs by
~±10% from one process to the next)."""

RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
"""glibc maps every block of 1 MiB or more on allocation and unmaps it on free: the process then
holds its live tensors only (and each step pays for fresh pages: ~1.5x slower, so only to measure)."""


@dataclass(frozen=True)
class RuntimeMemory:
    """What a training process holds beyond its live tensors, on this machine."""

    overhead: int
    """Bytes of the runtime itself: code pages of the kernels a step touches, oneDNN primitives,
    thread pools (a tiny model's peak)."""
    heap_retention: float
    """Share of a step's heap-sized tensors that glibc keeps resident after they are freed: freed
    blocks under its mmap threshold (which rises to 32 MiB) stay in the heap, fragmented, for
    reuse, instead of returning to the system."""


def runtime_memory(cpu_matmul: str, cache_dir: Path, kind: str = "transformer") -> RuntimeMemory:
    """What a training process of this kind holds beyond its tensors here (measured once per
    machine, torch version, GEMM choice and kind of model, then cached)."""
    return RuntimeMemory(
        runtime_overhead(cpu_matmul, cache_dir, kind), heap_retention(cpu_matmul, cache_dir, kind)
    )


def runtime_overhead(cpu_matmul: str, cache_dir: Path, kind: str = "transformer") -> int:
    """TINY[kind]'s peak: `RuntimeMemory.overhead`."""
    return int(
        _cached(cache_dir, "runtime-overhead", cpu_matmul, kind, lambda: _overhead_mb(cpu_matmul, kind))
        * 2**20
    )


def heap_retention(cpu_matmul: str, cache_dir: Path, kind: str = "transformer") -> float:
    """`RuntimeMemory.heap_retention`: REFERENCE[kind]'s peak under the default allocator against
    its peak when glibc returns every freed block (RETURN_FREED); the difference, over the
    tensors its step holds beyond weights and optimizer state (that peak less the overhead and
    those states)."""

    def measured() -> float:
        matmul = f"train.cpu_matmul={cpu_matmul}"
        default_mb = statistics.median(
            measure([*REFERENCE[kind], matmul], steps=8)["peak_mb"] for _ in range(REFERENCE_RUNS)
        )
        returned = measure([*REFERENCE[kind], matmul], steps=4, env=RETURN_FREED)
        overhead_mb = runtime_overhead(cpu_matmul, cache_dir, kind) / 2**20
        step_mb = returned["peak_mb"] - overhead_mb - returned["states_mb"]
        return round(max(default_mb - returned["peak_mb"], 0.0) / max(step_mb, 1.0), 4)

    return _cached(cache_dir, "heap-retention", cpu_matmul, kind, measured)


def _overhead_mb(cpu_matmul: str, kind: str) -> float:
    return measure([*TINY[kind], f"train.cpu_matmul={cpu_matmul}"], steps=3)["peak_mb"]


def _cached(cache_dir: Path, what: str, cpu_matmul: str, kind: str, compute: Callable[[], float]) -> float:
    import torch

    path = cache_dir / "plan" / f"{what}-{kind}-torch{torch.__version__}-{cpu_matmul}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"value": value}), encoding="utf-8")
    return value


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    result = measure_here(sys.argv[3:], int(sys.argv[2]))
    rank = os.environ.get("RANK", "0")
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
