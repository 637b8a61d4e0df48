"""The decode kernels (lmkiln.model._decode) give torch's numbers: GEMV, fused attention, generation."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch
import torch.nn.functional as F

from lmkiln.config import ModelConfig
from lmkiln.infer.generate import Sampling, generate_ids
from lmkiln.model import decode, kernels
from lmkiln.model.transformer import Transformer, apply_rope, build_mask, rope_tables

pytestmark = pytest.mark.skipif(not decode.available(), reason="lmkiln.model._decode was not built")


@pytest.fixture
def decode_threads(monkeypatch):
    """Set the GEMV's thread count as `decoding()` would, without touching torch's."""

    def set_threads(n: int) -> None:
        monkeypatch.setattr(decode, "threads", n)

    return set_threads


# --------------------------------------------------------------------------------------------
# GEMV


@pytest.mark.parametrize("threads", [1, 2, 64])  # 64 is capped at the cores there are
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    ("rows", "out", "inp"),
    # K below, at and past the 64-float unrolled step; N below the 64 rows split between threads,
    # and odd N, so that a thread's block ends in the middle of a cache line
    [(1, 1152, 384), (1, 5, 7), (3, 100, 65), (8, 1000, 1536), (2, 64, 64), (1, 4097, 128), (5, 17, 1)],
)
def test_gemv_equals_f_linear(rows, out, inp, bias, threads, decode_threads):
    decode_threads(threads)
    g = torch.Generator().manual_seed(rows * out + inp)
    x = torch.randn(rows, 1, inp, generator=g)  # (B, T=1, K), as in a decode step
    w = torch.randn(out, inp, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    with torch.no_grad():
        assert decode.gemm_eligible(x, w, b)
        y = kernels.linear(x, w, b)  # what every Linear layer calls
    assert y.shape == (rows, 1, out)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5 * inp**0.5)


def test_gemv_copies_strided_inputs_and_refuses_what_it_cannot_read(decode_threads):
    decode_threads(2)
    w = torch.randn(64, 32)
    x = torch.randn(2, 64)[:, ::2]  # non-contiguous rows are copied first
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        assert not decode.gemm_eligible(x, w.t().contiguous().t(), None)  # strided weight
        assert not decode.gemm_eligible(x, w.double(), None)
        assert not decode.gemm_eligible(x, w, torch.randn(63))
        assert not decode.gemm_eligible(torch.randn(decode.DECODE_MAX_ROWS + 1, 32), w, None)
    assert not decode.gemm_eligible(x, w, None)  # autograd on: training never takes it


def test_gemv_is_safe_from_several_python_threads(decode_threads):
    decode_threads(2)
    g = torch.Generator().manual_seed(0)
    cases = [
        (torch.randn(r, k, generator=g), torch.randn(n, k, generator=g))
        for r, n, k in [(1, 300, 64), (4, 90, 200), (8, 1000, 33)]
    ]
    failures = []

    def work(x, w):
        reference = F.linear(x, w)
        with torch.no_grad():
            for _ in range(200):
                if not torch.allclose(kernels.linear(x, w), reference, rtol=1e-5, atol=1e-4):
                    failures.append(x.shape)
                    return

    workers = [threading.Thread(target=work, args=case) for case in cases * 2]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in workers) and not failures


def _gemv_in_child(queue):
    decode.threads = 2
    with torch.no_grad():
        queue.put(float(kernels.linear(torch.ones(1, 128), torch.ones(256, 128)).sum()))


def test_gemv_works_in_a_forked_child(decode_threads):
    decode_threads(2)
    with torch.no_grad():
        kernels.linear(torch.ones(1, 128), torch.ones(256, 128))  # the parent's worker threads exist
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_gemv_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=5) == 256 * 128


def test_decoding_runs_torch_on_one_thread_and_restores_it():
    before = torch.get_num_threads()
    with decode.decoding(rows=1):
        assert torch.get_num_threads() == 1 and decode.threads >= 1
        with decode.decoding(rows=1):  # nested: the inner exit must not restore early
            pass
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before and decode.threads == 0
    nothing_to_gain = [
        (decode.DECODE_MAX_ROWS + 1, "cpu", torch.float32),
        (1, "meta", torch.float32),
        (1, "cpu", torch.bfloat16),
    ]
    for rows, device, dtype in nothing_to_gain:
        with decode.decoding(rows, device, dtype):
            assert torch.get_num_threads() == before and decode.threads == 0
    with pytest.raises(RuntimeError), decode.decoding(rows=1):
        raise RuntimeError("a failing step")
    assert torch.get_num_threads() == before and decode.threads == 0


# --------------------------------------------------------------------------------------------
# Attention of one new token against the cache


def _reference_step(qkv, keys, values, start, n_head, rope, mask):
    """What Attention.forward does for one token with torch ops."""
    B, n_kv, _, D = keys.shape
    q, k, v = qkv.split([n_head * D, n_kv * D, n_kv * D], dim=-1)
    q, k, v = (t.view(B, 1, -1, D).transpose(1, 2) for t in (q, k, v))
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    keys[:, :, start : start + 1], values[:, :, start : start + 1] = k, v
    k = keys[:, :, : start + 1].repeat_interleave(n_head // n_kv, dim=1)
    v = values[:, :, : start + 1].repeat_interleave(n_head // n_kv, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.transpose(1, 2).reshape(B, 1, n_head * D)


@pytest.mark.parametrize(
    ("B", "n_head", "n_kv", "D", "start", "use_rope", "masking"),
    [
        (1, 6, 6, 64, 0, False, None),  # the first generated token sees only itself
        (1, 6, 6, 64, 143, False, None),
        (3, 4, 2, 16, 20, True, "padding"),  # grouped-query heads, RoPE, left padding
        (2, 8, 1, 32, 40, True, "window"),  # one K/V head (MQA), sliding window
        (8, 2, 2, 10, 5, False, "padding"),  # D not a multiple of the vector width
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_attention_equals_torch_and_fills_the_cache(
    B, n_head, n_kv, D, start, use_rope, masking, threads, decode_threads
):
    decode_threads(threads)
    g = torch.Generator().manual_seed(B * 100 + start)
    capacity = start + 4
    keys, values = torch.randn(2, B, n_kv, capacity, D, generator=g)
    qkv = torch.randn(B, 1, (n_head + 2 * n_kv) * D, generator=g)
    rope = None
    if use_rope:
        cos, sin = rope_tables(D, capacity, 10000.0)
        positions = torch.tensor([start - row for row in range(B)])  # left padding shifts positions
        rope = (cos[positions][:, None, None], sin[positions][:, None, None])
    mask = None
    if masking == "padding":
        real = torch.ones(B, start + 1, dtype=torch.long)
        for row in range(B):
            real[row, : row * 2] = 0  # row r has 2r padding tokens on the left
        mask = build_mask(1, start, None, real, True, torch.device("cpu"))
    elif masking == "window":
        mask = build_mask(1, start, None, None, True, torch.device("cpu"), window=8)
    expected_keys, expected_values = keys.clone(), values.clone()
    expected = _reference_step(qkv, expected_keys, expected_values, start, n_head, rope, mask)
    with torch.no_grad():
        assert decode.attention_eligible(qkv, keys, values, start, mask, dropout=0.0)
        qkv_before = qkv.clone()
        out = decode.attention(qkv, keys, values, start, n_head, rope, mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys, expected_keys, rtol=1e-6, atol=1e-6)  # the new key, rotated
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0)
    assert torch.equal(qkv, qkv_before)  # the caller's projection is left as it was


# --------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("batch", [1, 3])
def test_generation_uses_the_kernels_after_the_prompt_and_gives_torchs_tokens(style, batch, monkeypatch):
    extra = (
        dict(norm="layer", position="learned", mlp="gelu", bias=True)
        if style == "gpt2"
        else dict(n_kv_head=2)
    )
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=61, d_model=64, n_head=4, n_layer=2, block_size=40, **extra)
    ).eval()
    with torch.no_grad():  # sharper distributions than the init's, so greedy choices are not near-ties
        for p in model.parameters():
            p.mul_(4.0)
    prompts = [[5, 9, 11, 3, 7, 2], [8, 1, 4], [13, 12, 6, 10, 3, 9]][:batch]  # batch 3: left padding
    real, calls = decode._decode, []

    class Counting:
        def linear(self, *args):
            calls.append(("linear", args[4]))  # rows
            return real.linear(*args)

        def attention(self, *args):
            calls.append(("attention", args[8]))  # B
            return real.attention(*args)

    samplings = [
        Sampling(max_new_tokens=12, temperature=0.0),
        Sampling(max_new_tokens=12, temperature=1.0, seed=3),
    ]
    monkeypatch.setattr(decode, "_decode", Counting())
    with_kernels = [generate_ids(model, prompts, s, eos_id=None) for s in samplings]
    monkeypatch.setattr(decode, "_decode", None)
    with_torch = [generate_ids(model, prompts, s, eos_id=None) for s in samplings]
    assert with_kernels == with_torch
    # every GEMM and attention of the 11 steps after the prompt ran in C, none of the prompt's
    per_step = [("linear", batch)] + [("attention", batch)] + [("linear", batch)] * 3
    per_step = per_step * model.cfg.n_layer + [("linear", batch)]  # + the LM head
    assert calls == per_step * 11 * len(samplings)


def test_a_model_left_in_training_mode_keeps_its_attention_dropout(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=61, d_model=64, n_head=4, n_layer=2, block_size=40, dropout=0.5)
    )
    real, calls = decode._decode, []

    class Counting:
        def linear(self, *args):
            calls.append("linear")
            return real.linear(*args)

        def attention(self, *args):
            calls.append("attention")
            return real.attention(*args)

    monkeypatch.setattr(decode, "_decode", Counting())
    generate_ids(model.train(), [[5, 9, 11]], Sampling(max_new_tokens=4, temperature=0.0), eos_id=None)
    assert "linear" in calls and "attention" not in calls  # SDPA applies the dropout, the C step cannot
    calls.clear()
    generate_ids(model.eval(), [[5, 9, 11]], Sampling(max_new_tokens=4, temperature=0.0), eos_id=None)
    assert "attention" in calls
