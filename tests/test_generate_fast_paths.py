"""Generation: the fast paths (KV cache, no mask for equal-length prompts) equal the reference."""

from __future__ import annotations

import pytest
import torch

from lmkiln.config import ModelConfig
from lmkiln.model.generate import Sampling, generate_ids
from lmkiln.model.transformer import Transformer

GREEDY = Sampling(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request) -> Transformer:
    style = (
        dict(norm="layer", position="learned", mlp="gelu", bias=True)
        if request.param == "gpt2"
        else dict(n_kv_head=2)
    )
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=61, d_model=64, n_head=4, n_layer=2, block_size=40, **style))
    with torch.no_grad():  # sharper distributions than the init's, so greedy choices are not near-ties
        for p in m.parameters():
            p.mul_(4.0)
    return m.eval()


PROMPTS = [[5, 9, 11, 3, 7, 2], [8, 1, 4], [13, 12, 6, 10, 3, 9]]


def test_batched_left_padded_generation_equals_each_prompt_alone(model):
    together = generate_ids(model, PROMPTS, GREEDY, eos_id=None, pad_id=0)
    alone = [generate_ids(model, [p], GREEDY, eos_id=None, pad_id=0)[0] for p in PROMPTS]
    assert together == alone
    assert all(len(row) == GREEDY.max_new_tokens for row in together)


@pytest.mark.parametrize("prompts", [PROMPTS, [PROMPTS[0], PROMPTS[2]]], ids=["padded", "equal-length"])
def test_kv_cache_generation_equals_full_recomputation(model, prompts):
    cached = generate_ids(model, prompts, GREEDY, eos_id=None)
    recomputed = generate_ids(model, prompts, GREEDY, eos_id=None, use_cache=False)
    assert cached == recomputed


def test_eos_ends_its_row_only_and_is_not_returned(model):
    free = generate_ids(model, PROMPTS, GREEDY, eos_id=None)
    eos = free[1][4]  # make the 5th token of row 1 the end of text
    out = generate_ids(model, PROMPTS, GREEDY, eos_id=eos)
    cut = free[1].index(eos)
    assert out[1] == free[1][:cut]
    for row in (0, 2):
        expected = free[row][: free[row].index(eos)] if eos in free[row] else free[row]
        assert out[row] == expected


def test_on_tokens_can_stop_a_row(model):
    def stop_row0_after_three(tokens, active, seen=[0]):  # noqa: B006 - a counter across calls
        seen[0] += 1
        return torch.tensor([seen[0] >= 3, False, False])

    out = generate_ids(model, PROMPTS, GREEDY, eos_id=None, on_tokens=stop_row0_after_three)
    free = generate_ids(model, PROMPTS, GREEDY, eos_id=None)
    assert out[0] == free[0][:3] and out[1] == free[1] and out[2] == free[2]
