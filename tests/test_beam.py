"""Beam search: width 1 is greedy, a wide beam finds the exact best sequence, bad widths are one line."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import run_cli

from lmkiln.config import ModelConfig
from lmkiln.errors import LmkilnError
from lmkiln.eval.runner import generate_batched
from lmkiln.model.beam import beam_search_ids
from lmkiln.model.generate import Sampling, generate_ids
from lmkiln.model.transformer import Transformer

EOS = 0


def tiny(vocab: int, seed: int) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, block_size=32)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper distributions than the 0.02-std init, so choices matter
        model.lm_head.weight.mul_(40)
    return model


@torch.no_grad()
def sequence_logprob(model: Transformer, prompt: list[int], tokens: list[int]) -> float:
    """Summed log-probability of `tokens` after `prompt`, by full recomputation (no cache)."""
    ids = torch.tensor([prompt + tokens])
    logp = torch.log_softmax(model(ids)[0].float(), dim=-1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens))


def brute_force(model: Transformer, prompt: list[int], steps: int, penalty: float) -> tuple[list[int], float]:
    """Every sequence that ends at EOS within `steps` tokens or runs to `steps` without one."""
    vocab = model.cfg.vocab_size
    words = [t for t in range(vocab) if t != EOS]
    best: tuple[list[int], float] = ([], float("-inf"))
    for length in range(steps + 1):
        for body in itertools.product(words, repeat=length):
            ended = length < steps
            tokens = [*body, EOS] if ended else list(body)
            if not tokens:
                continue
            score = sequence_logprob(model, prompt, tokens) / len(tokens) ** penalty
            if score > best[1]:
                best = (list(body), score)
    return best


def test_width_one_is_greedy():
    model = tiny(vocab=11, seed=1)
    prompts = [[3, 4, 5], [7], [1, 2, 9, 9, 10]]
    greedy = generate_ids(model, prompts, Sampling(max_new_tokens=12, temperature=0), EOS, pad_id=EOS)
    beam = [beam_search_ids(model, p, 1, 12, EOS).tokens for p in prompts]
    assert beam == greedy
    outputs, _ = generate_batched(model, prompts, 12, 4, EOS, EOS, beams=1)
    assert outputs == greedy


@pytest.mark.parametrize("penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("seed", [2, 3])
def test_a_wide_beam_finds_the_exact_best_sequence(seed, penalty):
    model = tiny(vocab=5, seed=seed)
    prompt, steps = [1, 3], 4
    tokens, score = brute_force(model, prompt, steps, penalty)
    found = beam_search_ids(
        model, prompt, beams=4**3, max_new_tokens=steps, eos_id=EOS, length_penalty=penalty
    )
    assert found.tokens == tokens and found.score == pytest.approx(score, abs=1e-4)
    # the cache-reordered log-probability is the recomputed one
    expected = sequence_logprob(model, prompt, found.tokens + ([EOS] if found.ended else []))
    assert found.logprob == pytest.approx(expected, abs=1e-4)


def test_beam_search_beats_or_ties_greedy_on_its_own_score():
    model = tiny(vocab=9, seed=4)
    prompt = [2, 5, 7]
    greedy = beam_search_ids(model, prompt, 1, 10, EOS)
    wide = beam_search_ids(model, prompt, 4, 10, EOS)
    assert wide.score >= greedy.score - 1e-6


def test_bad_widths_are_one_line(tmp_path):
    with pytest.raises(LmkilnError, match="beam width must be at least 1, got 0"):
        beam_search_ids(tiny(5, 0), [1], 0, 4, EOS)
    proc = run_cli("eval", str(tmp_path), "--task", "translation", "--data", "x.jsonl", "--beams", "0")
    assert proc.returncode == 2 and "--beams" in proc.stderr and "at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_beam_search_equals_transformers_on_the_exported_weights(tmp_path):
    """The same hypotheses as `generate(num_beams=4)` of the HF export, with either stopping rule."""
    pytest.importorskip("transformers")
    from finetune_helpers import tokenizer
    from transformers import AutoModelForCausalLM

    from lmkiln.interop.hf_export import export_model

    tok = tokenizer()
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = ModelConfig(
            vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=64,
            tie_embeddings=False,
        )  # fmt: skip
        model = Transformer(cfg).eval()
        with torch.no_grad():  # peaked distributions, EOS likely enough that some beams end early
            model.lm_head.weight.mul_(25)
            model.lm_head.weight[tok.eos_id] *= 2
        export_model(model, tok, tmp_path / str(seed))
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / str(seed)).eval()
        for prompt in ([5, 9, 20], [40, 41]):
            for penalty, exhaustive in itertools.product((1.0, 0.0), (True, False)):
                ours = beam_search_ids(model, prompt, 4, 10, tok.eos_id, penalty, exhaustive)
                out = hf.generate(
                    torch.tensor([prompt]), num_beams=4, max_new_tokens=10, do_sample=False,
                    length_penalty=penalty, early_stopping="never" if exhaustive else False,
                    eos_token_id=tok.eos_id, pad_token_id=tok.eos_id,
                )  # fmt: skip
                theirs = out[0, len(prompt) :].tolist()
                while theirs and theirs[-1] == tok.eos_id:
                    theirs.pop()
                assert ours.tokens == theirs, (seed, prompt, penalty, exhaustive)
