"""The GEMVs of one generated token: lmkiln's decode kernel vs oneDNN's and MKL's M=1 paths.

The 25 weight matrices a token of the 10m generation model reads (6 layers of qkv 1152×384, out
384×384, up 1536×384, down 384×1536, and the 4096×384 head: 48.8 MB of fp32) are timed one
shape at a time, each shape cycling through enough copies to fill 48 MB so that every call reads
its weights from memory, not from cache, as in a decode. Candidates alternate round by round;
medians of `rounds`. lmkiln's kernel runs as inside `decoding()` (its own threads, torch on one),
oneDNN and MKL (torch's `F.linear`) on torch's threads.

    PYTHONPATH=src python -m benchmarks.decode_gemv [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from benchmarks.common import load_average, median, ratio

SHAPES = {(1152, 384): 6, (384, 384): 6, (1536, 384): 6, (384, 1536): 6, (4096, 384): 1}
"""(out, in) of each weight matrix of a token → how many the token reads."""


def measure(rounds: int) -> dict:
    from lmkiln.model import decode

    if not decode.available():
        raise SystemExit("lmkiln.model._decode is not built: python setup.py build_ext --inplace")
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    copies = {
        s: [torch.randn(*s, generator=g) for _ in range(max(1, int(48e6 / (s[0] * s[1] * 4))))]
        for s in SHAPES
    }
    inputs = {s: (torch.randn(1, s[1], generator=g), torch.randn(s[0], generator=g)) for s in SHAPES}

    def lmkiln(shape, weight):
        x, bias = inputs[shape]
        return decode.gemm(x, weight, bias)

    def onednn(shape, weight):
        x, bias = inputs[shape]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    def mkl(shape, weight):
        x, bias = inputs[shape]
        return F.linear(x, weight, bias)

    candidates = {"lmkiln": (lmkiln, 1, threads), "onednn": (onednn, threads, 0), "mkl": (mkl, threads, 0)}
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, (fn, torch_threads, decode_threads) in candidates.items():
                torch.set_num_threads(torch_threads)
                decode.threads = decode_threads
                token = 0.0
                for shape, count in SHAPES.items():
                    for weight in copies[shape]:  # warm-up pass: thread pools awake, pages mapped
                        fn(shape, weight)
                    start = time.perf_counter()
                    for weight in copies[shape]:
                        fn(shape, weight)
                    token += (time.perf_counter() - start) / len(copies[shape]) * count
                seconds[name].append(token)
    torch.set_num_threads(threads)
    decode.threads = 0
    megabytes = sum(s[0] * s[1] * 4 * n for s, n in SHAPES.items()) / 1e6
    rows = {
        name: {"ms_per_token": round(median(t) * 1e3, 3), "gb_per_s": round(megabytes / 1e3 / median(t), 1)}
        for name, t in seconds.items()
    }
    return {
        "weights_mb": round(megabytes, 1),
        "threads": threads,
        "rounds": rounds,
        "rows": rows,
        "lmkiln_vs_onednn": round(ratio(rows["onednn"]["ms_per_token"], rows["lmkiln"]["ms_per_token"]), 2),
        "lmkiln_vs_mkl": round(ratio(rows["mkl"]["ms_per_token"], rows["lmkiln"]["ms_per_token"]), 2),
        "load_average_end": load_average(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    print(json.dumps(measure(parser.parse_args().rounds), indent=1))


if __name__ == "__main__":
    main()
