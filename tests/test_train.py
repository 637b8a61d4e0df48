"""The training loop: exact gradient accumulation, golden losses, schedules, parameter groups,
resume, and the guards around it."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from conftest import write

from lmkiln.config import ModelConfig, ScheduleConfig, load_config
from lmkiln.data.loader import IGNORE_INDEX
from lmkiln.model.transformer import Transformer
from lmkiln.tasks.pretrain import pretrain
from lmkiln.train.objectives import LanguageModelLoss
from lmkiln.train.optim import build_optimizer, lr_multiplier, parameter_groups
from lmkiln.train.runtime import Runtime
from lmkiln.train.step import train_step

CPU = Runtime(torch.device("cpu"))


def synthetic_corpus(path, lines=400):
    """Counting patterns a tiny model can learn quickly."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    text = "\n\n".join(" ".join(words[(i + j) % 8] for j in range(12)) + f" {i % 10}." for i in range(lines))
    return path if path.exists() else write(path, text)


def tiny_cfg(tmp_path, *extra):
    corpus = synthetic_corpus(tmp_path / "corpus.txt")
    return load_config(
        overrides=[
            f"data.corpus={corpus}",
            "tokenizer.vocab_size=300",
            "model.preset=tiny",
            "train.seq_len=32",
            "train.batch_size=8",
            "train.max_steps=40",
            "train.eval_every=20",
            "train.save_every=10",
            "train.log_every=5",
            f"train.run_dir={tmp_path / 'run'}",
            "log.progress=off",
            "log.plot=false",
            "schedule.warmup_steps=5",
            "optim.lr=3e-3",
            "train.sample_tokens=0",
            *extra,
        ]
    )


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def padded_batch(rows: int, width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (rows, width), generator=g)
    labels = torch.randint(0, 50, (rows, width), generator=g)
    for r in range(rows):  # different amounts of padding per row
        labels[r, width - (r * 3) % width :] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def test_k_micro_batches_equal_one_big_batch_with_padding():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_head=2, n_layer=2, block_size=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    batches = [padded_batch(3, 16, seed) for seed in range(4)]
    big = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    objective = LanguageModelLoss()

    def grads(micro):
        model.zero_grad()
        result = train_step(model, objective, micro, CPU, grad_clip=0)
        return result, [p.grad.clone() for p in model.parameters()]

    accumulated, g_acc = grads(batches)
    single, g_one = grads([big])
    assert accumulated.targets == single.targets
    torch.testing.assert_close(accumulated.loss, single.loss, atol=1e-6, rtol=0)
    for a, b in zip(g_acc, g_one):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_clipping_reports_the_pre_clip_norm_and_clips():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_head=2, n_layer=1, block_size=16)
    model = Transformer(cfg)
    result = train_step(model, LanguageModelLoss(), [padded_batch(2, 16, 0)], CPU, grad_clip=1e-3)
    after = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert result.grad_norm > 1e-3
    assert after <= 1e-3 + 1e-6


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_schedule_shapes(name):
    cfg = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    curve = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert curve[0] == pytest.approx(0.1) and curve[9] == pytest.approx(1.0)  # linear warmup
    assert all(a <= b + 1e-12 for a, b in zip(curve[:10], curve[1:10]))
    if name == "constant":
        assert set(curve[10:]) == {1.0}
    else:
        assert curve[-1] == pytest.approx(0.1, abs=0.02)  # decays to min_lr_ratio
        assert all(a >= b - 1e-12 for a, b in zip(curve[10:], curve[11:]))  # never rises again
    if name == "wsd":
        assert curve[79] == 1.0 and curve[80] < 1.0  # stable until the last 20%
    if name == "cosine":
        assert curve[55] == pytest.approx(0.55, abs=0.02)  # half-way point of the cosine


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = Transformer(
        ModelConfig(
            vocab_size=50,
            d_model=32,
            n_head=2,
            n_layer=1,
            block_size=16,
            bias=True,
            norm="layer",
            position="learned",
            mlp="gelu",
        )
    )
    groups = {g["name"]: g for g in parameter_groups(model, 0.1)}
    decayed = {id(p) for p in groups["decay"]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".weight" in names[i] and "norm" not in names[i] and "embed" not in names[i] for i in decayed)
    assert model.tok_embed.weight in groups["no_decay"]["params"]
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1


def test_optimizer_by_name_and_fused_equals_foreach():
    torch.manual_seed(0)
    base = Transformer(ModelConfig(vocab_size=50, d_model=32, n_head=2, n_layer=1, block_size=16))
    results = {}
    for impl in ("foreach", "loop", "fused"):
        model = Transformer(base.cfg)
        model.load_state_dict(base.state_dict())
        cfg = load_config(overrides=["optim.name=adamw", f"optim.impl={impl}"]).optim
        optimizer = build_optimizer(model, cfg)
        for seed in range(3):
            model.zero_grad()
            train_step(model, LanguageModelLoss(), [padded_batch(2, 16, seed)], CPU, grad_clip=1.0)
            optimizer.step()
        results[impl] = [p.detach().clone() for p in model.parameters()]
    for a, b, c in zip(results["foreach"], results["loop"], results["fused"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


def test_golden_first_losses(tmp_path):
    """The first losses of a tiny fixed-seed run; any change to init, data order or the step shows here."""
    cfg = tiny_cfg(tmp_path, "train.max_steps=5", "train.log_every=1", "data.val_fraction=0.1")
    result = pretrain(cfg)
    losses = [h["loss"] for h in _history(result.run_dir) if h["event"] == "train"]
    assert losses == pytest.approx(GOLDEN, abs=2e-4)
    assert result.fit.train_loss == pytest.approx(sum(losses) / 5)  # the summary's "last 50 steps"


GOLDEN = [5.716, 5.5435, 5.3136, 5.0785, 4.832]


def _history(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_reduces_validation_loss_and_resume_is_exact(tmp_path):
    cfg = tiny_cfg(tmp_path / "a")
    result = pretrain(cfg)
    before, after = result.fit.first_eval["val_loss"], result.fit.last_eval["val_loss"]
    assert after < before - 1.5, (before, after)  # ln(300)=5.7 at init; the patterns are easy
    assert math.isfinite(result.fit.last_eval["val_bpb"])
    uninterrupted = weights_hash(result.model)

    # crash inside step 27 (after the checkpoint at 20), then resume from the newest checkpoint
    crashing = tiny_cfg(tmp_path / "b")
    calls = {"n": 0}
    original = LanguageModelLoss.__call__

    def crash(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 27:
            raise RuntimeError("simulated crash")
        return original(self, model, batch)

    LanguageModelLoss.__call__ = crash
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            pretrain(crashing)
    finally:
        LanguageModelLoss.__call__ = original
    resumed = pretrain(tiny_cfg(tmp_path / "b"), resume="auto")
    assert resumed.fit.state.step == 40
    assert weights_hash(resumed.model) == uninterrupted


@pytest.mark.slow
def test_torch_compile_trains_to_the_same_losses_as_eager(tmp_path):
    eager = pretrain(tiny_cfg(tmp_path / "eager", "train.max_steps=6", "train.log_every=1"))
    compiled = pretrain(
        tiny_cfg(tmp_path / "compiled", "train.max_steps=6", "train.log_every=1", "train.compile=true")
    )
    losses = [[h["loss"] for h in _history(r.run_dir) if h["event"] == "train"] for r in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)


def test_loop_accepts_a_compiled_train_model(tmp_path):
    """A compiled module refuses truth-testing (len()); the loop must not test it (compile=true)."""
    from lmkiln.train.loop import TrainLoop, TrainSetup

    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_head=2, n_layer=1, block_size=16))
    compiled = torch.compile(model)  # lazy: nothing is compiled until the first call
    cfg = load_config(overrides=["train.max_steps=1"])
    setup = TrainSetup(
        model, LanguageModelLoss(), iter([]), build_optimizer(model, cfg.optim), 1, train_model=compiled
    )
    assert TrainLoop(setup, cfg, CPU, None).train_model is compiled


def test_summary_states_the_training_loss_and_warns_once_when_the_model_memorizes(tmp_path):
    from lmkiln.tasks.pretrain import PretrainResult
    from lmkiln.train.loop import FitResult
    from lmkiln.train.state import TrainState

    cfg = load_config(recipe="default", overrides=["train.sample_tokens=0"])

    def summary(train_loss, val_loss):
        state = TrainState(step=500, tokens_seen=1_024_000, train_seconds=120.0)
        evals = {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_bpb": 1.8}
        fit = FitResult(state, evals, None, "max_steps", {"val_loss": 7.629}, train_loss)
        return PretrainResult(tmp_path, fit, None, None, None, None, 3_740_000, cfg).summary().splitlines()

    lines = summary(2.55, 4.223)
    assert "validation loss 7.629 → 4.223" in lines[1] and "training loss 2.550 (last 50 steps)" in lines[1]
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == [
        "warning: validation loss is 66% above training loss: the model is memorizing its data; "
        "use more data, fewer steps or a smaller model (`lmkiln plan` sizes one)"
    ]
    assert not any(line.startswith("warning:") for line in summary(3.70, 4.20))  # 13.5% above: fine


def test_recent_train_loss_averages_the_log_lines_of_the_last_50_steps():
    from lmkiln.train.observe import recent_train_loss

    history = [{"event": "train", "step": s, "loss": float(s)} for s in range(10, 510, 10)]
    history.append({"event": "eval", "step": 500, "val_loss": 9.0})
    assert recent_train_loss(history, 500) == pytest.approx((460 + 470 + 480 + 490 + 500) / 5)
    assert recent_train_loss([], 500) is None
