"""The transformer's invariants: causality, KV cache, document masks, GQA, sizes."""

from __future__ import annotations

import pytest
import torch

from lmkiln.config import ModelConfig
from lmkiln.model.transformer import KVCache, Transformer, count_parameters, training_flops_per_token

LLAMA = dict(vocab_size=97, d_model=64, n_head=4, n_kv_head=2, n_layer=2, block_size=48)
GPT2 = dict(
    vocab_size=97,
    d_model=64,
    n_head=4,
    n_layer=2,
    block_size=48,
    norm="layer",
    position="learned",
    mlp="gelu",
    bias=True,
    tie_embeddings=False,
)
STYLES = {
    "llama-gqa": LLAMA,
    "gpt2": GPT2,
    "llama-mha-untied": {**LLAMA, "n_kv_head": 0, "tie_embeddings": False},
}


def model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**kw)).eval()


@pytest.mark.parametrize("style", STYLES)
def test_causality_future_tokens_do_not_change_past_logits(style):
    m = model(**STYLES[style])
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = m(x), m(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("style", STYLES)
def test_kv_cache_matches_full_recomputation(style):
    m = model(**STYLES[style])
    x = torch.randint(0, 97, (3, 24))
    full = m(x)
    cache = KVCache.empty(m.cfg, 3, 48, x.device, torch.float32)
    pieces = [m(x[:, :10], cache=cache)] + [m(x[:, t : t + 1], cache=cache) for t in range(10, 20)]
    pieces.append(m(x[:, 20:], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_packed_documents_do_not_attend_to_each_other():
    m = model(**LLAMA)
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 9))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    out = m(packed, doc_ids=doc_ids, position_ids=positions)
    torch.testing.assert_close(out[:, :7], m(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 7:], m(b), atol=1e-5, rtol=1e-5)
    # without the mask, the second document would see the first
    assert not torch.allclose(m(packed, position_ids=positions)[:, 7:], m(b), atol=1e-3)


def test_left_padding_with_mask_equals_unpadded():
    m = model(**GPT2)
    x = torch.randint(0, 97, (1, 10))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 10])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = m(padded, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(out[:, 4:], m(x), atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_storage_and_count_once():
    tied, untied = model(**LLAMA), model(**{**LLAMA, "tie_embeddings": False})
    assert tied.lm_head.weight is tied.tok_embed.weight
    assert count_parameters(untied) - count_parameters(tied) == 97 * 64


def test_flops_per_token_formula():
    cfg = ModelConfig(vocab_size=1000, d_model=128, n_head=4, n_layer=2, d_ff=512, mlp="gelu", block_size=64)
    matmul = 2 * (128 * 3 * 128 + 128 * 128 + 2 * 128 * 512) + 128 * 1000
    assert training_flops_per_token(cfg, 64) == 6 * matmul + 12 * 2 * 128 * 64


def test_context_longer_than_block_size_is_refused():
    m = model(**LLAMA)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        m(torch.zeros(1, 49, dtype=torch.long))


def test_sliding_window_sees_only_the_last_window_tokens():
    # one layer: the logits at t depend on tokens t-7..t only, and RoPE is relative, so they equal
    # the last logits of those 8 tokens run alone
    m = model(**{**LLAMA, "n_layer": 1, "sliding_window": 8})
    x = torch.randint(0, 97, (2, 30))
    full = m(x)
    for t in (7, 19, 29):
        torch.testing.assert_close(full[:, t], m(x[:, t - 7 : t + 1])[:, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full, model(**{**LLAMA, "n_layer": 1})(x), atol=1e-3)


def test_kv_cache_matches_full_recomputation_with_a_sliding_window():
    m = model(**{**LLAMA, "sliding_window": 6})
    x = torch.randint(0, 97, (2, 24))
    cache = KVCache.empty(m.cfg, 2, 48, x.device, torch.float32)
    pieces = [m(x[:, :10], cache=cache)] + [m(x[:, t : t + 1], cache=cache) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), m(x), atol=1e-5, rtol=1e-5)


def test_qkv_bias_and_explicit_head_size_shape_the_attention():
    m = model(**{**LLAMA, "qkv_bias": True, "head_size": 24})
    attn = m.blocks[0].attn
    assert attn.wqkv.bias is not None and attn.wo.bias is None
    assert attn.wqkv.weight.shape == ((4 + 2 * 2) * 24, 64) and attn.wo.weight.shape == (64, 4 * 24)
    assert m(torch.randint(0, 97, (1, 5))).shape == (1, 5, 97)


@pytest.mark.parametrize(
    "style,label_smoothing,frozen",
    [
        ("llama-gqa", 0.0, ""),  # tied head: the embedding gets gradients from both ends
        ("gpt2", 0.1, ""),  # untied head, label smoothing
        ("llama-mha-untied", 0.0, "lm_head"),  # a frozen head (only the hidden states get gradients)
        ("llama-mha-untied", 0.1, "blocks"),  # frozen blocks (the head and embeddings still train)
    ],
)
def test_loss_in_chunks_equals_the_loss_of_all_logits(style, label_smoothing, frozen, monkeypatch):
    from lmkiln.model import loss as loss_module

    m = model(**STYLES[style]).train()
    for name, p in m.named_parameters():
        p.requires_grad_(not (frozen and name.startswith(frozen)))
    x = torch.randint(0, 97, (3, 20))
    targets = torch.randint(0, 97, (3, 20))
    targets[0, :5] = -100  # IGNORE_INDEX: no loss, no gradient
    full = torch.nn.functional.cross_entropy(
        m(x).flatten(0, 1), targets.flatten(), reduction="sum", label_smoothing=label_smoothing
    )
    full.backward()
    expected = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad()
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 97 * 7)  # 55 targeted rows → 8 chunks of ≤ 7
    monkeypatch.setattr(loss_module, "CHUNK_ABOVE", 97 * 7)
    calls = []
    hook = m.lm_head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    chunked = m(x, targets=targets, label_smoothing=label_smoothing)
    hook.remove()
    assert calls == [7] * 7 + [6]  # chunk by chunk, and the 5 ignored rows never reach the head
    (chunked * 0.5).backward()  # the step scales the sum (by 1 / number of targets)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-4)
    for name, p in m.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name] * 0.5, rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert p.grad is None, name
    with torch.no_grad():  # evaluation: chunks, no gradients
        evaluated = m(x, targets=targets, label_smoothing=label_smoothing)
        torch.testing.assert_close(evaluated, full.detach(), rtol=1e-5, atol=1e-4)
