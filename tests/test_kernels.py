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


@pytest.fixture(autouse=True)
def restore_choice():
    yield
    kernels.set_cpu_matmul("auto")


# x shape (..., K) and N: the first takes the transposed-x branch of _weight_grad, the others the
# transposed-grad branch; 2-D and 3-D inputs
SHAPES = [((64, 16), 96), ((2, 40, 96), 24), ((3, 32, 48), 16)]


@onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("x_shape", "out"), SHAPES)
def test_onednn_linear_forward_and_gradients_equal_f_linear(x_shape, out, bias):
    kernels.set_cpu_matmul("onednn")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=g, requires_grad=True)
    w = torch.randn(out, x_shape[-1], generator=g, requires_grad=True)
    b = torch.randn(out, generator=g, requires_grad=True) if bias else None
    grad = torch.randn(*x_shape[:-1], out, generator=g)
    results = []
    for fn in (kernels.linear, F.linear):
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
def test_small_gemms_and_other_dtypes_stay_on_the_default_path():
    kernels.set_cpu_matmul("onednn")
    w = torch.randn(8, 16)
    assert not kernels._eligible(torch.randn(kernels.MIN_ROWS - 1, 16), w)  # e.g. one generated token
    assert not kernels._eligible(torch.randn(64, 16, dtype=torch.float64), w.double())
    assert kernels._eligible(torch.randn(kernels.MIN_ROWS, 16), w)
    kernels.set_cpu_matmul("default")
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
        kernels.set_cpu_matmul(choice)
        model.zero_grad()
        logits = model(ids)
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        outputs[choice] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outputs["onednn"][0], outputs["default"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outputs["onednn"][1], outputs["default"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_linear_is_an_nn_linear_with_the_same_state_dict():
    layer = kernels.Linear(8, 4)
    assert isinstance(layer, torch.nn.Linear)  # what LoRA (peft) and the init code look for
    assert set(layer.state_dict()) == set(torch.nn.Linear(8, 4).state_dict())


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="one of auto, onednn, default"):
        kernels.set_cpu_matmul("mkl")


def test_cpu_matmul_config_reaches_the_process_setting():
    from lmkiln.train.runtime import Runtime

    Runtime.start(load_config(overrides=["train.cpu_matmul=default", "train.device=cpu"]).train)
    assert not kernels.use_onednn()


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
