"""The GPU section: bf16 autocast and torch.compile on, GPT-2 124M/350M shapes, lmkiln vs the Trainer.

Runs only when CUDA is available (`python -m benchmarks.run` calls it then). Both candidates use
bf16 mixed precision (lmkiln `train.precision=bf16`, the Trainer `bf16=True`) and torch.compile
(`train.compile=true`, `torch_compile=True`); MFU is against the measured bf16 matmul peak.
Compilation happens in the warm-up steps, which are dropped.
"""

from __future__ import annotations

import torch

from benchmarks.common import GPU_SHAPES, Shape
from benchmarks.train_speed import measure_shape


def measure(quick: bool, device: torch.device | None = None, shapes: dict[str, Shape] | None = None) -> dict:
    device = device or torch.device("cuda")
    shapes = shapes or GPU_SHAPES
    if quick:
        shapes = dict(list(shapes.items())[:1])
    steps, warmup, rounds = (12, 6, 1) if quick else (30, 10, 2)
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "shapes": {},
    }
    for name, shape in shapes.items():
        out["shapes"][name] = measure_shape(shape, steps, warmup, rounds, device, gpu=True)
    return out
