"""Where to run a model on a CPU: llama.cpp on lmkiln's GGUF export vs `lmkiln generate`, batch 1.

The generation benchmark's model (the 10m shape's width and depth, a 4096-token BPE vocabulary
trained on the corpus) is built by lmkiln in two styles, GPT-2 and Llama, and exported to GGUF
as f32, f16 and q8_0. Each candidate greedily generates `new_tokens` tokens after a 16-token
prompt at batch 1 — lmkiln through `generate_ids` (fp32), llama.cpp through llama-cpp-python's
`generate` with the same thread count — and tokens/s counts generated tokens over the whole call,
prefill included, after one untimed warm-up each. Candidates alternate within each round and
figures are medians over rounds. The greedy ids of the f32 file are compared with lmkiln's.

    python -m benchmarks.gguf_speed [--corpus FILE] [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SHAPES, load_average, machine, median, ratio, spread

log = logging.getLogger("lmkiln.bench")
PROMPT_TOKENS = 16
STYLES = {
    "gpt2": dict(norm="layer", position="learned", mlp="gelu", bias=True),
    "llama": dict(norm="rms", position="rope", mlp="swiglu", bias=False),
}
DTYPES = ("f32", "f16", "q8_0")


def build(corpus: str, style: str, tokenizer=None):
    from lmkiln.config import ModelConfig
    from lmkiln.data.corpus import iter_documents
    from lmkiln.data.tokenizer import train_bpe
    from lmkiln.model.transformer import Transformer

    texts = [d.text for d in iter_documents(corpus, "text", "paragraph")]
    tok = tokenizer or train_bpe(iter(texts), vocab_size=4096)
    shape = SHAPES["10m"]
    cfg = ModelConfig(
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        d_model=shape.d_model,
        block_size=shape.seq_len,
        vocab_size=tok.vocab_size,
        **STYLES[style],
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    long_texts = [t for t in texts if len(tok.encode(t[:400])) >= PROMPT_TOKENS]
    prompt = tok.encode(long_texts[0][:400])[:PROMPT_TOKENS]
    return model, tok, prompt


def _llama_cpp_tokens(llm, prompt: list[int], new_tokens: int) -> list[int]:
    out: list[int] = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == new_tokens:
            break
    return out


def measure_style(
    corpus: str, style: str, new_tokens: int, rounds: int, threads: int, tokenizer=None
) -> dict:
    import llama_cpp

    from lmkiln.interop.gguf_export import export_gguf
    from lmkiln.model.generate import Sampling, generate_ids

    model, tok, prompt = build(corpus, style, tokenizer)
    directory = Path(tempfile.mkdtemp(prefix="lmkiln-bench-gguf-"))
    runners = {}
    sizes = {}
    for dtype in DTYPES:
        path = directory / f"{style}-{dtype}.gguf"
        sizes[dtype] = export_gguf(model, tok, path, dtype=dtype).bytes
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=model.cfg.block_size,
            n_threads=threads,
            n_threads_batch=threads,
            seed=0,
            verbose=False,
        )
        runners[f"llama.cpp {dtype}"] = lambda llm=llm: _llama_cpp_tokens(llm, prompt, new_tokens)
    sampling = Sampling(max_new_tokens=new_tokens, temperature=0.0)
    runners["lmkiln generate"] = lambda: generate_ids(model, [prompt], sampling, eos_id=None)[0]
    outputs = {name: run() for name, run in runners.items()}  # warm-up, and the ids compared
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rows = {
        name: {
            "tokens_per_s": round(new_tokens / median(t), 1),
            "tokens_per_s_round_spread": [round(new_tokens / x, 1) for x in spread(t)[::-1]],
        }
        for name, t in times.items()
    }
    ours = rows["lmkiln generate"]["tokens_per_s"]
    for dtype in DTYPES:
        row = rows[f"llama.cpp {dtype}"]
        row["file_mb"] = round(sizes[dtype] / 1e6, 1)
        row["speedup_vs_lmkiln"] = round(ratio(row["tokens_per_s"], ours), 2)
    return {
        "model": f"{style} style {model.cfg.n_layer}L/{model.cfg.n_head}H/{model.cfg.d_model}, "
        f"vocab {model.cfg.vocab_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params",
        "rows": rows,
        "f32_greedy_ids_identical": outputs["llama.cpp f32"] == outputs["lmkiln generate"],
        "f16_greedy_ids_identical": outputs["llama.cpp f16"] == outputs["lmkiln generate"],
        "q8_0_greedy_ids_identical": outputs["llama.cpp q8_0"] == outputs["lmkiln generate"],
    }


def measure(corpus: str = "builtin:pydoc", new_tokens: int = 128, rounds: int = 5, threads: int = 0) -> dict:
    from lmkiln.data.corpus import iter_documents
    from lmkiln.data.tokenizer import train_bpe

    threads = threads or torch.get_num_threads()
    texts = [d.text for d in iter_documents(corpus, "text", "paragraph")]
    tokenizer = train_bpe(iter(texts), vocab_size=4096)
    styles = {}
    for style in STYLES:
        log.info("gguf: %s style, %d rounds", style, rounds)
        styles[style] = measure_style(corpus, style, new_tokens, rounds, threads, tokenizer)
    import llama_cpp

    return {
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": new_tokens,
        "batch": 1,
        "rounds": rounds,
        "threads": threads,
        "llama_cpp_python": llama_cpp.__version__,
        "styles": styles,
        "load_average_end": load_average(),
    }


def table(report: dict) -> str:
    lines = [
        f"where to run a model on a CPU: batch 1, {report['new_tokens']} new tokens, greedy, "
        f"{report['threads']} threads"
    ]
    for style in report["styles"].values():
        lines.append(f"  {style['model']}")
        for name, row in style["rows"].items():
            extra = f"  {row['speedup_vs_lmkiln']:.2f}x  {row['file_mb']:6.1f} MB" if "file_mb" in row else ""
            lines.append(f"    {name:16} {row['tokens_per_s']:8.0f} tok/s{extra}")
        lines.append(f"    f32 greedy ids identical to lmkiln: {style['f32_greedy_ids_identical']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gguf_speed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--corpus", default="builtin:pydoc")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer's per-file INFO lines
    report = {
        "machine": machine(),
        "gguf": measure(args.corpus, 32 if args.quick else 128, 2 if args.quick else 5, args.threads),
    }
    text = json.dumps(report, indent=2)
    print(text)
    print(table(report["gguf"]))
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
