"""Serving: `lmkiln serve` next to `transformers serve` on the same exported weights, 1/4/8 clients.

One GPT-2-style model (the 10m shape with a 4096-token BPE vocabulary; random weights, since speed
does not depend on what they say) is exported once with `lmkiln.interop.hf_export`, and every
server loads that same directory: lmkiln (continuous batching, up to 8 rows), `transformers serve`
as it starts by default, and `transformers serve --continuous-batching` (paged attention). Each
client sends `requests` streaming `/v1/completions` requests one after another (a 16-token prompt,
`max_tokens` new tokens, greedy) through the official openai client. Figures per concurrency:

    time to first token   median over requests, from sending to the first text received
    aggregate tokens/s    completion tokens of every request (the servers' `usage`) / wall time
                          from the first request sent to the last answer received

Servers run one at a time, each started fresh, and rounds alternate the candidates; figures are
medians over rounds. The benchmark process itself (the clients) shares the CPU with the server,
alike for every candidate. `answers_equal_lmkiln` compares each candidate's greedy text with
lmkiln's, prompt by prompt (a sanity check that they did the same work).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from benchmarks.common import SHAPES, load_average, median

log = logging.getLogger("lmkiln.bench")
ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 4, 8)
PROMPT_TOKENS = 16
PEERS = ("transformers serve", "transformers serve --continuous-batching")


def build(corpus: str, out: Path) -> list[str]:
    """Export the model to `out`; return prompt texts of PROMPT_TOKENS tokens each."""
    from lmkiln.config import ModelConfig
    from lmkiln.data.corpus import iter_documents
    from lmkiln.data.tokenizer import train_bpe
    from lmkiln.interop.hf_export import export_model
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
    export_model(Transformer(cfg).eval(), tok, out)
    prompts = []
    for text in texts:
        ids = tok.encode(text[:400])
        if len(ids) >= PROMPT_TOKENS:
            prompts.append(tok.decode(ids[:PROMPT_TOKENS]))
        if len(prompts) == 8:
            return prompts
    raise RuntimeError(f"{corpus} has fewer than 8 paragraphs of {PROMPT_TOKENS} tokens")


def commands(model_dir: Path, port: int) -> dict[str, list[str] | None]:
    transformers_cli = Path(sys.executable).parent / "transformers"
    peer = [str(transformers_cli), "serve", str(model_dir), "--port", str(port), "--device", "cpu"]
    lmkiln = [
        sys.executable,
        "-m",
        "lmkiln",
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--max-batch",
        "8",
    ]
    return {
        "lmkiln": lmkiln,
        PEERS[0]: peer if transformers_cli.exists() else None,
        PEERS[1]: [*peer, "--continuous-batching"] if transformers_cli.exists() else None,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_models(url: str, proc: subprocess.Popen, seconds: float = 300) -> str:
    """The id the server gives its model, once it answers."""
    import json

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as response:
                return json.loads(response.read())["data"][0]["id"]
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not start")


async def one_request(api, model: str, prompt: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    text, tokens = "", 0
    stream = await api.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            text += chunk.choices[0].text
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {
        "ttft": (first or time.perf_counter()) - started,
        "tokens": tokens,
        "prompt": prompt,
        "text": text,
    }


async def load(
    url: str, model: str, prompts: list[str], clients: int, requests: int, max_tokens: int
) -> dict:
    import openai

    api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    async def client(index: int) -> list[dict]:
        return [
            await one_request(api, model, prompts[(index + k) % len(prompts)], max_tokens)
            for k in range(requests)
        ]

    try:
        started = time.perf_counter()
        done = await asyncio.gather(*(client(i) for i in range(clients)))
        seconds = time.perf_counter() - started
    finally:
        await api.close()
    answers = [a for per_client in done for a in per_client]
    tokens = sum(a["tokens"] for a in answers)
    return {
        "ttft_s": round(statistics.median(a["ttft"] for a in answers), 4),
        "tokens_per_s": round(tokens / seconds, 1),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "texts": {a["prompt"]: a["text"] for a in answers},
    }


def run_candidate(command: list[str], prompts: list[str], requests: int, max_tokens: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    port = int(command[command.index("--port") + 1])
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir()
        )
        try:
            model = wait_for_models(url, proc)
            asyncio.run(load(url, model, prompts[:1], 1, 1, 8))  # warm-up: kernels picked on first use
            return {c: asyncio.run(load(url, model, prompts, c, requests, max_tokens)) for c in CONCURRENCY}
        except Exception:
            output.seek(0)
            log.error("%s failed:\n%s", command[:4], output.read().decode(errors="replace")[-3000:])
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def measure(corpus: str = "builtin:pydoc", rounds: int = 2, requests: int = 1, max_tokens: int = 128) -> dict:
    """Each candidate `rounds` times, alternating; medians per concurrency and lmkiln's ratios."""
    model_dir = Path(tempfile.mkdtemp(prefix="lmkiln-bench-serve-"))
    prompts = build(corpus, model_dir)
    runs: dict[str, list[dict]] = {}
    for round_ in range(rounds):
        for name, command in commands(model_dir, free_port()).items():
            if command is None:
                continue
            log.info("serving: %s, round %d of %d", name, round_ + 1, rounds)
            runs.setdefault(name, []).append(run_candidate(command, prompts, requests, max_tokens))
    rows = {}
    for name, per_round in runs.items():
        rows[name] = {
            str(c): {
                "ttft_s": median([r[c]["ttft_s"] for r in per_round]),
                "tokens_per_s": median([r[c]["tokens_per_s"] for r in per_round]),
                "tokens": per_round[0][c]["tokens"],
            }
            for c in CONCURRENCY
        }
        reference = runs["lmkiln"][0][1]["texts"]
        texts = per_round[0][1]["texts"]
        rows[name]["answers_equal_lmkiln"] = sum(texts[p] == reference.get(p) for p in texts) / len(texts)
    lmkiln = rows["lmkiln"]
    ratios = {
        peer: {
            str(c): round(lmkiln[str(c)]["tokens_per_s"] / rows[peer][str(c)]["tokens_per_s"], 2)
            for c in CONCURRENCY
        }
        for peer in PEERS
        if peer in rows
    }
    return {
        "model": f"{SHAPES['10m'].n_layer}L/{SHAPES['10m'].n_head}H/{SHAPES['10m'].d_model} GPT-2 style, "
        f"vocab 4096, ctx {SHAPES['10m'].seq_len}, fp32, exported with lmkiln.interop.hf_export",
        "prompt_tokens": PROMPT_TOKENS,
        "max_tokens": max_tokens,
        "requests_per_client": requests,
        "rounds": rounds,
        "load_average_end": load_average(),
        "rows": rows,
        "lmkiln_tokens_per_s_over_peer": ratios,
    }


def table(result: dict) -> str:
    lines = [
        f"serving, {result['model']}, {result['prompt_tokens']}-token prompts, {result['max_tokens']} new tokens, "
        f"{result['requests_per_client']} streaming requests per client"
    ]
    header = "".join(f"{f'{c} client' + ('s' if c > 1 else ''):>22}" for c in CONCURRENCY)
    lines.append(f"  {'':42}{header}")
    lines.append(f"  {'':42}" + "".join(f"{'TTFT s':>10}{'tok/s':>12}" for _ in CONCURRENCY))
    for name, row in result["rows"].items():
        cells = "".join(
            f"{row[str(c)]['ttft_s']:>10.3f}{row[str(c)]['tokens_per_s']:>12.1f}" for c in CONCURRENCY
        )
        lines.append(f"  {name:42}{cells}   same answers as lmkiln: {100 * row['answers_equal_lmkiln']:.0f}%")
    for peer, ratio_row in result["lmkiln_tokens_per_s_over_peer"].items():
        lines.append(
            f"  lmkiln / {peer}: " + ", ".join(f"{c} clients {r:.2f}x" for c, r in ratio_row.items())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--requests", type=int, default=1, help="streaming requests per client, one after another"
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", default="", help="also write the JSON report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    from benchmarks.common import machine

    report = {
        "command": " ".join(["python -m benchmarks.serving", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        **measure(rounds=args.rounds, requests=args.requests, max_tokens=args.max_tokens),
    }
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(text)
    print(table(report))


if __name__ == "__main__":
    main()
