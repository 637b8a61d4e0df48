"""Optimized paths give the reference's numbers: oneDNN GEMMs vs torch's default, fused vs foreach."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmkiln.config import ModelConfig, load_config
from lmkiln.model import kernels
from lmkiln.model.transformer import Transformer
from lmkiln.train.optim import build_optimizer

onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="this torch build has no oneDNN")


# x shape (..., K) and N: the first takes the transposed-x branch of _weight_grad, the others the
# transposed-grad branch; 2-D and 3-D inputs
SHAPES = [((64, 16), 96), ((2, 40, 96), 24), ((3, 32, 48), 16)]


@onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("x_shape", "out"), SHAPES)
def test_onednn_linear_forward_and_gradients_equal_f_linear(x_shape, out, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=g, requires_grad=True)
    w = torch.randn(out, x_shape[-1], generator=g, requires_grad=True)
    b = torch.randn(out, generator=g, requires_grad=True) if bias else None
    grad = torch.randn(*x_shape[:-1], out, generator=g)
    results = []
    for fn in (kernels.onednn_linear, F.linear):
        y = fn(x, w, b)
        y.backward(grad)
        results.append([y.detach(), x.grad, w.grad, None if b is None else b.grad])
        x.grad = w.grad = None
        if b is not None:
            b.grad = None
    assert kernels._eligible(x, w)  # the oneDNN path was really taken
    for ours, ref in zip(*results):
        if ref is not None:
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
            assert ours.is_contiguous()


@onednn
def test_other_dtypes_and_autocast_stay_on_the_default_path():
    w = torch.randn(8, 16)
    assert kernels._eligible(torch.randn(1, 16), w)  # one generated token: oneDNN's GEMV
    assert not kernels._eligible(torch.randn(64, 16, dtype=torch.float64), w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels._eligible(torch.randn(64, 16), w)


@onednn
def test_transformer_logits_and_gradients_match_the_default_gemm():
    cfg = ModelConfig(
        vocab_size=97,
        d_model=64,
        n_head=4,
        n_layer=2,
        block_size=32,
        norm="layer",
        position="learned",
        mlp="gelu",
        bias=True,
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for choice in ("onednn", "default"):
        kernels.swap_linears(model, choice)
        model.zero_grad()
        logits = model(ids)
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        outputs[choice] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outputs["onednn"][0], outputs["default"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outputs["onednn"][1], outputs["default"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@onednn
def test_swap_linears_keeps_parameters_ties_and_state_dict():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_head=4, n_layer=1, block_size=16)
    model = Transformer(cfg)
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    keys = set(model.state_dict())
    kernels.swap_linears(model, "onednn")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is kernels.OneDNNLinear for m in linears)  # peft still sees nn.Linear
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[n] is p for n, p in before.items())  # the same Parameter objects: no copy
    assert model.lm_head.weight is model.tok_embed.weight  # tied weights stay tied
    assert set(model.state_dict()) == keys
    kernels.swap_linears(model, "default")
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="one of auto, onednn, default"):
        kernels.swap_linears(torch.nn.Linear(2, 2), "mkl")


def test_two_models_in_one_process_keep_their_own_gemm():
    """No process-wide switch: swapping one model leaves another alone."""
    a, b = torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.nn.Sequential(torch.nn.Linear(4, 4))
    kernels.swap_linears(a, "onednn" if kernels.onednn_available() else "default")
    assert type(b[0]) is torch.nn.Linear


def test_auto_optimizer_is_fused_on_cpu():
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, load_config(overrides=["optim.name=adamw"]).optim)
    assert optimizer.defaults["fused"]


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig(vocab_size=97, d_model=64, n_head=4, n_kv_head=2, n_layer=2, block_size=32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    grads = []
    for recompute in (False, True):
        model.checkpoint_activations = recompute
        model.zero_grad()
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@onednn
def test_train_cpu_matmul_reaches_the_model_built_for_training():
    from lmkiln.tasks.pretrain import build_transformer

    cfg = ModelConfig(vocab_size=97, d_model=32, n_head=4, n_layer=1, block_size=16)
    for choice, kind in (("onednn", kernels.OneDNNLinear), ("default", torch.nn.Linear)):
        model = build_transformer(cfg, torch.device("cpu"), 0, cpu_matmul=choice)
        assert {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)} == {kind}
