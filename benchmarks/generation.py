"""Generation throughput with a KV cache: lmkiln's `generate_ids` vs `transformers` `generate`.

One GPT-2-style model (the 10m shape's width and depth, a 4096-token BPE vocabulary) is built by
lmkiln, exported with `lmkiln.interop.hf_export` and loaded by `AutoModelForCausalLM` in fp32 —
the same weights on both sides. Each side greedily generates `new_tokens` tokens after 16-token
prompts at batch 1 and batch 8 (EOS does not stop either, so both produce exactly the same
number of tokens); tokens/s counts generated tokens over the whole call, prefill included, after
one untimed warm-up call each (oneDNN and MKL pick their kernels on first use). The
generated ids are compared as a sanity check (greedy decoding of the same weights). lmkiln's model
has its Linear layers swapped as `load_run` does (`kernels.swap_linears(model, "auto")`: oneDNN's
GEMV on AVX-512 CPUs); a third row keeps torch's default GEMM (MKL) to show what that choice is worth.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager

import torch

from benchmarks.common import SHAPES, load_average, median, ratio, spread

log = logging.getLogger("lmkiln.bench")
PROMPT_TOKENS = 16
TORCH_KERNELS = "lmkiln, default GEMM"
"""The same generate_ids with torch's default GEMM (MKL) instead of oneDNN: what the swap is worth."""


@contextmanager
def default_gemm(model):
    from lmkiln.model.kernels import swap_linears

    swap_linears(model, "default")
    try:
        yield
    finally:
        swap_linears(model, "auto")


def build(corpus: str) -> tuple:
    from transformers import AutoModelForCausalLM

    from lmkiln.config import ModelConfig
    from lmkiln.data.corpus import iter_documents
    from lmkiln.data.tokenizer import train_bpe
    from lmkiln.interop.hf_export import export_model
    from lmkiln.model.kernels import swap_linears
    from lmkiln.model.transformer import Transformer

    texts = [d.text for d in iter_documents(corpus, "text", "paragraph")]
    tok = train_bpe(iter(texts), vocab_size=4096)
    shape = SHAPES["10m"]
    cfg = ModelConfig(
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        d_model=shape.d_model,
        block_size=shape.seq_len,
        vocab_size=tok.vocab_size,
        norm="layer",
        position="learned",
        mlp="gelu",
        bias=True,
    )
    torch.manual_seed(0)
    model = swap_linears(Transformer(cfg).eval(), "auto")  # as lmkiln.runs.load does
    out = tempfile.mkdtemp(prefix="lmkiln-bench-export-")
    export_model(model, tok, out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    long_texts = [t for t in texts if len(tok.encode(t[:400])) >= PROMPT_TOKENS]
    prompts = [tok.encode(t[:400])[:PROMPT_TOKENS] for t in long_texts[:8]]
    return model, hf, tok, prompts, cfg


def measure(corpus: str, new_tokens: int, rounds: int) -> dict:
    from lmkiln.model.generate import Sampling, generate_ids

    model, hf, tok, prompts, cfg = build(corpus)
    sampling = Sampling(max_new_tokens=new_tokens, temperature=0.0)
    results = {}
    for batch in (1, 8):
        rows = prompts[:batch]
        ids = torch.tensor(rows)
        times: dict[str, list[float]] = {"lmkiln": [], TORCH_KERNELS: [], "transformers": []}
        ours = theirs = None
        generate_ids(model, rows, Sampling(max_new_tokens=4, temperature=0.0), eos_id=None)  # warm-up
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        for _ in range(rounds):
            start = time.perf_counter()
            ours = generate_ids(model, rows, sampling, eos_id=None, pad_id=tok.pad_id)
            times["lmkiln"].append(time.perf_counter() - start)
            with default_gemm(model):
                start = time.perf_counter()
                generate_ids(model, rows, sampling, eos_id=None, pad_id=tok.pad_id)
                times[TORCH_KERNELS].append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    use_cache=True,
                    eos_token_id=None,
                    pad_token_id=tok.pad_id,
                )
            times["transformers"].append(time.perf_counter() - start)
            theirs = out[:, PROMPT_TOKENS:].tolist()
        generated = batch * new_tokens
        table = {
            name: {
                "tokens_per_s": round(generated / median(t), 1),
                "tokens_per_s_round_spread": [round(generated / x, 1) for x in spread(t)[::-1]],
            }
            for name, t in times.items()
        }
        results[f"batch_{batch}"] = {
            "rows": table,
            "speedup_vs_transformers": round(
                ratio(table["lmkiln"]["tokens_per_s"], table["transformers"]["tokens_per_s"]), 3
            ),
            "onednn_gemv_speedup": round(
                ratio(table["lmkiln"]["tokens_per_s"], table[TORCH_KERNELS]["tokens_per_s"]), 3
            ),
            "greedy_ids_identical": ours == theirs,
            "first_difference": _first_difference(ours, theirs),
        }
    return {
        "model": f"GPT-2 style {cfg.n_layer}L/{cfg.n_head}H/{cfg.d_model}, vocab {cfg.vocab_size}, fp32",
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "load_average_end": load_average(),
        **results,
    }


def _first_difference(ours: list[list[int]], theirs: list[list[int]]) -> list[int] | None:
    """(row, position) of the first differing generated token, or None."""
    for row, (a, b) in enumerate(zip(ours, theirs)):
        for position, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return [row, position]
        if len(a) != len(b):
            return [row, min(len(a), len(b))]
    return None
