"""`lmkiln eval RUN --task memorization`: canary exposure and an extraction test.

Exposure (Carlini et al., "The Secret Sharer", 2019). Each canary's log-perplexity (bits of the
whole text after an EOS, as the model saw it in training) is ranked among candidates drawn
uniformly from the same format space R (|R| = 10^9 for DDD-DD-DDDD):

    exposure = log2 |R| - log2 rank

estimated by sampling as in the paper's section 4: `exposure_sampled` from the share of sampled
candidates at least as likely as the canary (at most log2 of the sample size), and `exposure`
from a normal distribution fitted to the candidates' log-perplexities (the paper fits a
skew-normal), which extrapolates past the sample: -log2 Phi((x_canary - mean) / std), at most
log2 |R|. A once-seen canary should sit near 1 bit, a memorized one near log2 |R| (~30 bits).

Extraction: training documents are read back from the run's shards; the model is prompted with
the first half of a window of each (up to 2 x 32 tokens, starting at the document's start) and
must reproduce the second half exactly under greedy decoding. The same test on validation
documents is the baseline that generalization alone reaches. Each canary is also prompted with
its prefix ("the secret code is") to see whether greedy decoding completes it.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmkiln.data.canaries import PREFIX, SPACE_BITS, Canary, random_secret, read_record
from lmkiln.data.shards import TokenShards
from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError

EXTRACTION_HALF = 32
"""Tokens of prompt and of expected continuation in the extraction test."""


@dataclass
class CanaryExposure:
    canary: Canary
    log_perplexity: float
    """Bits of the canary text."""
    exposure: float
    exposure_sampled: float
    better_candidates: int
    """Sampled candidates at least as likely as the canary."""
    extracted: bool
    """Greedy decoding after the prefix reproduces the secret."""


@torch.no_grad()
def log_perplexities(
    model: nn.Module, tokenizer: Tokenizer, texts: list[str], batch_size: int = 256
) -> np.ndarray:
    """(len(texts),) bits of each text, each scored after an EOS as documents are in training."""
    device = next(model.parameters()).device
    sequences = [[tokenizer.eos_id, *ids] for ids in tokenizer.encode_batch(texts)]
    out = np.zeros(len(texts))
    for start in range(0, len(sequences), batch_size):
        rows = sequences[start : start + batch_size]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.eos_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
        for row, seq in enumerate(rows):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq) - 1] = True
        ids = ids.to(device)
        logits = model(ids[:, :-1]).float()  # (B, T-1, V)
        nll = -torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        out[start : start + len(rows)] = (nll.cpu() * mask).sum(1).numpy() / math.log(2)
    return out


def _normal_tail_bits(z: float) -> float:
    """-log2 P(N(0,1) <= z), accurate far into the tail."""
    probability = 0.5 * math.erfc(-z / math.sqrt(2))
    if probability > 0:
        return -math.log2(probability)
    return (z * z / 2 + math.log(-z * math.sqrt(2 * math.pi))) / math.log(2)  # Mills ratio, z -> -inf


def exposures(
    model: nn.Module, tokenizer: Tokenizer, canaries: list[Canary], candidates: int, seed: int = 0
) -> list[CanaryExposure]:
    """Exposure of each canary against `candidates` random members of the format space."""
    rng = random.Random(f"candidates:{seed}")
    inserted = {c.secret for c in canaries}
    pool = []
    while len(pool) < candidates:
        secret = random_secret(rng)
        if secret not in inserted:
            pool.append(PREFIX + secret)
    scores = log_perplexities(model, tokenizer, pool)
    mean, std = float(scores.mean()), float(scores.std()) or 1e-9
    canary_scores = log_perplexities(model, tokenizer, [c.text for c in canaries])
    # a token holds at least one character: as many tokens as the secret has characters suffice
    completions = _greedy_completions(model, tokenizer, PREFIX.rstrip(), len(" 000-00-0000") + 1)
    out = []
    for canary, score in zip(canaries, canary_scores):
        better = int((scores <= score).sum())
        sampled = -math.log2(max(better, 1) / candidates)  # rank ~ share x |R|
        fitted = min(_normal_tail_bits((score - mean) / std), SPACE_BITS)
        out.append(
            CanaryExposure(
                canary, float(score), fitted, sampled, better, completions.startswith(" " + canary.secret)
            )
        )
    return out


@torch.no_grad()
def _greedy_completions(model: nn.Module, tokenizer: Tokenizer, prompt: str, tokens: int) -> str:
    from lmkiln.model.generate import Sampling, generate_ids

    ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    new = generate_ids(model, [ids], Sampling(max_new_tokens=tokens, temperature=0.0), tokenizer.eos_id)[0]
    return tokenizer.decode(new)


def shard_documents(
    shards: TokenShards, split: str, count: int, seed: int, min_tokens: int = 8
) -> list[np.ndarray]:
    """Up to `count` random documents (token arrays, EOS removed) of a split, each >= min_tokens long."""
    eos = shards.manifest["eos_id"]
    documents = []
    for array in shards.arrays(split):
        tokens = np.asarray(array)
        ends = np.flatnonzero(tokens == eos)
        starts = np.concatenate(([0], ends[:-1] + 1))
        documents += [tokens[s:e] for s, e in zip(starts, ends) if e - s >= min_tokens]
    random.Random(seed).shuffle(documents)
    return documents[:count]


def extraction_rate(
    model: nn.Module, tokenizer: Tokenizer, documents: list[np.ndarray], batch_size: int = 32
) -> dict[str, float]:
    """Share of documents whose window's second half greedy decoding reproduces exactly, and the
    share of its tokens reproduced before the first error."""
    from lmkiln.eval.runner import generate_batched

    if not documents:
        return {"exact_match": float("nan"), "prefix_tokens": float("nan"), "documents": 0.0}
    prompts, targets = [], []
    limit = model.cfg.block_size
    for doc in documents:
        half = min(len(doc) // 2, EXTRACTION_HALF, (limit - 1) // 2)
        prompts.append([tokenizer.eos_id, *doc[:half].tolist()])
        targets.append(doc[half : 2 * half].tolist())
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    outputs, _ = generate_batched(model, prompts, max(map(len, targets)), batch_size, -1, pad)
    exact, reproduced = [], []
    for output, target in zip(outputs, targets):
        output = output[: len(target)]
        exact.append(output == target)
        same = next(
            (i for i, (a, b) in enumerate(zip(output, target)) if a != b), min(len(output), len(target))
        )
        reproduced.append(same / len(target))
    return {
        "exact_match": float(np.mean(exact)),
        "prefix_tokens": float(np.mean(reproduced)),
        "documents": float(len(documents)),
    }


def plot_exposure(results: list[CanaryExposure], path: Path) -> Path:
    """Exposure against repetitions (log x axis), one point per canary; the ceiling log2 |R| dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmkiln.train.plots import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    repeats = [r.canary.repeats for r in results]
    ax.scatter(repeats, [r.exposure for r in results], label="exposure (normal fit)", zorder=3)
    ax.scatter(
        repeats, [r.exposure_sampled for r in results], marker="x", label="exposure (sampled rank)", zorder=3
    )
    ax.axhline(SPACE_BITS, linestyle="--", color="grey", label=f"log2 |R| = {SPACE_BITS:.1f} bits")
    ax.set(xscale="log", xlabel="copies of the canary in the training data", ylabel="exposure (bits)")
    ax.set_title("canary exposure vs repetitions")
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)


def evaluate_memorization(
    path: str | Path, candidates: int = 2000, documents: int = 200, device: str = "cpu", seed: int = 0
):
    """Exposure of every canary of a run, extraction rates on training and validation documents,
    and RUN_DIR/plots/exposure.png; returns an EvalResult."""
    from lmkiln.eval.runner import EvalResult
    from lmkiln.runs.load import find_checkpoint, load_run

    if candidates < 10:
        raise LmkilnError(f"--candidates must be at least 10, got {candidates}")
    started = time.perf_counter()
    run_dir, _ = find_checkpoint(path)
    record = read_record(run_dir)
    loaded = load_run(path, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    results = exposures(model, tokenizer, record["canaries"], candidates, seed)
    metrics: dict[str, float] = {}
    for repeats in sorted({r.canary.repeats for r in results}):
        group = [r for r in results if r.canary.repeats == repeats]
        metrics[f"exposure_x{repeats}"] = float(np.mean([r.exposure for r in group]))
    metrics["canaries_extracted"] = float(np.mean([r.extracted for r in results]))
    shard_dir = Path(record["shards"])
    if (shard_dir / "manifest.json").is_file():
        shards = TokenShards(shard_dir)
        for split in ("train", "val"):
            found = extraction_rate(model, tokenizer, shard_documents(shards, split, documents, seed))
            metrics[f"{split}_extraction_exact"] = found["exact_match"]
            metrics[f"{split}_extraction_prefix"] = found["prefix_tokens"]
    plot = plot_exposure(results, run_dir / "plots" / "exposure.png")
    samples = [
        {
            "canary": r.canary.text,
            "repeats": r.canary.repeats,
            "log_perplexity_bits": round(r.log_perplexity, 3),
            "exposure": round(r.exposure, 2),
            "exposure_sampled": round(r.exposure_sampled, 2),
            "better_candidates": r.better_candidates,
            "extracted": r.extracted,
        }
        for r in results
    ]
    samples.append({"plot": str(plot), "candidates": candidates, "space_bits": SPACE_BITS})
    return EvalResult(
        "memorization", len(results), metrics, seconds=time.perf_counter() - started, samples=samples
    )
