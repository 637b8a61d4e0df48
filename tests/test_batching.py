"""Continuous batching: a request's tokens do not depend on what else is in the batch."""

from __future__ import annotations

import pytest
import torch

from lmkiln.config import ModelConfig
from lmkiln.data.tokenizer import train_char
from lmkiln.infer.batching import ContinuousBatcher, GenerationRequest, Update, run_to_completion
from lmkiln.model.generate import Sampling, generate_ids
from lmkiln.model.transformer import Transformer

TEXT = "the cat sat on the mat. the dog sat on the log. " * 20
PROMPTS = ["the cat sat", "a", "on the mat the", "dog", "the log. the dog sat on"]


@pytest.fixture(scope="module")
def tok():
    return train_char(iter([TEXT]))


@pytest.fixture(scope="module", params=["rope", "learned"])
def model(request, tok):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=64,
        block_size=64,
        position=request.param,
        norm="rms" if request.param == "rope" else "layer",
    )
    return Transformer(cfg).eval()


class Recorder:
    def __init__(self) -> None:
        self.updates: list[Update] = []

    def __call__(self, update: Update) -> None:
        self.updates.append(update)

    @property
    def text(self) -> str:
        return "".join(u.text for u in self.updates)

    @property
    def end(self) -> Update:
        assert self.updates[-1].finish_reason is not None
        return self.updates[-1]


def request(tok, prompt: str, sampling: Sampling, stop_ids=frozenset()) -> tuple[GenerationRequest, Recorder]:
    recorder = Recorder()
    return GenerationRequest(tok.encode(prompt), sampling, frozenset(stop_ids), recorder), recorder


def test_greedy_alone_equals_generate_ids_and_equals_batched_with_staggered_joins(model, tok):
    greedy = Sampling(max_new_tokens=70, temperature=0)  # more than fits: every row runs to the context
    reference = [
        tok.decode(generate_ids(model, [tok.encode(p)], greedy, eos_id=None)[0], skip_special=True)
        for p in PROMPTS
    ]
    batcher = ContinuousBatcher(model, tok, max_rows=3)
    alone = []
    for prompt in PROMPTS:
        req, out = request(tok, prompt, greedy)
        run_to_completion(batcher, req)
        alone.append(out)
    assert [o.text for o in alone] == reference
    assert [o.end.tokens for o in alone] == [64 - len(tok.encode(p)) for p in PROMPTS]
    assert all(o.end.finish_reason == "length" for o in alone)

    # Rows join while others decode, wait for a free row (3 of 5), leave at different steps, and
    # the cache shifts left when its end reaches the capacity (80 columns for 64 tokens of context).
    pairs = [request(tok, p, greedy) for p in PROMPTS]
    shifts_before = batcher.cache.capacity
    batcher.add(pairs[0][0])
    batcher.step()
    batcher.step()
    batcher.add(pairs[1][0])
    batcher.add(pairs[2][0])
    for _ in range(5):
        batcher.step()
    batcher.add(pairs[3][0])
    batcher.add(pairs[4][0])
    widest = 0
    while batcher.busy:
        batcher.step()
        widest = max(widest, len(batcher.rows))
        assert batcher.cache.end <= batcher.cache.capacity
    assert widest == 3 and shifts_before == 80
    assert [out.text for _, out in pairs] == reference


def test_seeded_sampling_is_the_same_alone_and_batched(model, tok):
    sampling = Sampling(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    batcher = ContinuousBatcher(model, tok, max_rows=4)
    alone_req, alone = request(tok, "the cat", sampling)
    run_to_completion(batcher, alone_req)
    pairs = [
        request(tok, p, Sampling(max_new_tokens=20, temperature=0.9, seed=i)) for i, p in enumerate(PROMPTS)
    ]
    for req, _ in pairs[:2]:
        batcher.add(req)
    batcher.step()
    again_req, again = request(tok, "the cat", sampling)
    batcher.add(again_req)
    while batcher.busy:
        batcher.step()
    assert again.text == alone.text and again.end.tokens == 20


def test_stop_token_stop_string_and_max_tokens_end_a_request(model, tok):
    greedy = Sampling(max_new_tokens=30, temperature=0)
    batcher = ContinuousBatcher(model, tok, max_rows=4)
    free_req, free = request(tok, "the cat", greedy)
    run_to_completion(batcher, free_req)
    first_token = tok.encode(free.text[0])[0]
    stopped_req, stopped = request(tok, "the cat", greedy, stop_ids={first_token})
    text = free.text
    stop_string = text[3:5]
    string_req, by_string = request(
        tok, "the cat", Sampling(max_new_tokens=30, temperature=0, stop=[stop_string])
    )
    short_req, short = request(tok, "the cat", Sampling(max_new_tokens=4, temperature=0))
    for req in (stopped_req, string_req, short_req):
        batcher.add(req)
    while batcher.busy:
        batcher.step()
    assert (stopped.text, stopped.end.tokens, stopped.end.finish_reason) == ("", 1, "stop")
    assert by_string.text == text[: text.index(stop_string)] and by_string.end.finish_reason == "stop"
    assert short.end.tokens == 4 and short.end.finish_reason == "length" and text.startswith(short.text)
    assert batcher.finished == {"length": 2, "stop": 2}


def test_a_cancelled_request_leaves_the_batch_at_the_next_step(model, tok):
    greedy = Sampling(max_new_tokens=50, temperature=0)
    batcher = ContinuousBatcher(model, tok, max_rows=2)
    (a, out_a), (b, out_b) = request(tok, "the cat", greedy), request(tok, "a dog", greedy)
    batcher.add(a)
    batcher.add(b)
    batcher.step()
    batcher.step()
    a.cancelled.set()
    batcher.step()
    assert len(batcher.rows) == 1 and out_a.end.finish_reason == "cancelled" and out_a.end.tokens == 3
    while batcher.busy:
        batcher.step()
    assert out_b.end.finish_reason == "length"
