"""Evaluation metrics against reference values worked out by hand (or published by the library)."""

from __future__ import annotations

import math

import pytest
import torch

from lmkiln.config import ModelConfig
from lmkiln.eval.runner import _label_metrics, generate_batched, perplexity
from lmkiln.eval.text_metrics import exact_match_f1, normalize_answer, token_f1
from lmkiln.model.transformer import Transformer


def test_squad_normalisation_exact_match_and_token_f1():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    # "a big red cat" vs "the red cat": tokens {big, red, cat} vs {red, cat}: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("a big red cat", "the red cat") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    scores = exact_match_f1(["The Cat!", "a big red cat", "dog"], [["cat"], ["the red cat"], ["cat", "dog"]])
    assert scores["exact_match"] == pytest.approx(2 / 3)  # the best reference counts
    assert scores["f1"] == pytest.approx((1 + 0.8 + 1) / 3)


def test_bleu_and_chrf_match_sacrebleus_published_example():
    pytest.importorskip("sacrebleu")
    from lmkiln.eval.text_metrics import bleu_chrf

    hypotheses = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    references = [
        ["The dog bit the man.", "The dog had bit the man."],
        ["It was not unexpected.", "No one was surprised."],
        ["The man bit him first.", "The man had bitten the dog."],
    ]
    scores = bleu_chrf(hypotheses, references)  # sacrebleu's README: BLEU = 48.53, chrF2 = 59.73
    assert scores["bleu"] == pytest.approx(48.53, abs=0.005)
    assert scores["chrf"] == pytest.approx(59.73, abs=0.005)
    assert bleu_chrf(["a b c d e"], [["a b c d e"]]) == pytest.approx({"bleu": 100.0, "chrf": 100.0})


def test_rouge_by_hand():
    pytest.importorskip("rouge_score")
    from lmkiln.eval.text_metrics import rouge

    # "the cat sat" vs "the cat sat on the mat": unigrams P=3/3 R=3/6 → F=2/3; bigrams P=2/2 R=2/5 → F=4/7;
    # longest common subsequence 3 → F=2/3
    scores = rouge(["the cat sat"], [["the cat sat on the mat"]])
    assert scores == pytest.approx({"rouge1": 2 / 3, "rouge2": 4 / 7, "rougeL": 2 / 3})


def test_generated_label_accuracy_and_macro_f1_by_hand():
    # neg: never predicted right → F1 0; pos: TP 2, predicted 2, support 3 → P 1, R 2/3, F1 0.8
    scores = _label_metrics(["pos", "neg", "maybe", "pos"], ["pos", "pos", "neg", "pos"], ["neg", "pos"])
    assert scores == pytest.approx({"accuracy": 0.5, "f1_macro": 0.4})


def zero_model(vocab: int = 40) -> Transformer:
    """Every logit is exactly 0: a uniform next-token distribution, and greedy picks id 0."""
    model = Transformer(ModelConfig(vocab_size=vocab, d_model=16, n_head=2, n_layer=1, block_size=24))
    with torch.no_grad():
        model.norm_f.weight.zero_()
    return model.eval()


class _Chars:
    eos_id = 0

    @staticmethod
    def encode(text: str) -> list[int]:
        return [1 + ord(c) % 30 for c in text]


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    texts = ["hello world", "x" * 60]  # the second spans several windows of the 24-token context
    scores = perplexity(zero_model(40), _Chars(), texts)
    assert scores["perplexity"] == pytest.approx(40.0, rel=1e-5)
    assert scores["tokens"] == 11 + 60
    assert scores["bits_per_byte"] == pytest.approx(math.log2(40), rel=1e-5)  # one byte per token


def test_batched_generation_reports_which_outputs_stopped_at_eos():
    model = zero_model()
    prompts = [[3, 4, 5], [6], [7, 8]]
    outputs, stopped = generate_batched(model, prompts, max_new_tokens=5, batch_size=2, stop_id=0, pad_id=1)
    assert outputs == [[], [], []] and stopped == [True, True, True]  # greedy emits id 0 = the stop token
    outputs, stopped = generate_batched(model, prompts, max_new_tokens=5, batch_size=2, stop_id=9, pad_id=1)
    assert outputs == [[0] * 5] * 3 and stopped == [False] * 3
