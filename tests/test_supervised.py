"""`lmkiln.Trainer`: any nn.Module on THE loop — losses and optimizers by name, zero-weight padding,
epochs and steps, early stopping on a scripted curve, the best checkpoint, exact resume, bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from torch import nn

from lmkiln.data.labelled import collate
from lmkiln.data.loader import EpochBatches
from lmkiln.errors import LmkilnError
from lmkiln.runs import checkpoint as ckpt
from lmkiln.runs.tensors import model_tensors
from lmkiln.train.objectives import SUPERVISED_LOSSES, SupervisedLoss, loss_from_criterion
from lmkiln.train.optim import OPTIMIZERS
from lmkiln.train.runtime import Runtime
from lmkiln.train.step import train_step
from lmkiln.train.supervised import Trainer

CPU = Runtime(torch.device("cpu"))
QUIET = {"log.progress": "off", "log.plot": False}


def blobs(n: int = 60, features: int = 4, classes: int = 3, seed: int = 0):
    """Gaussian blobs a linear model separates; (x float32 (n, features), y int64 (n,))."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.randn(classes, features, generator=g) * 3
    return centres[y] + torch.randn(n, features, generator=g), y


def targets_for(name: str, n: int, g: torch.Generator) -> torch.Tensor:
    if name == "cross_entropy":
        return torch.randint(0, 3, (n,), generator=g)
    if name == "bce":
        return torch.randint(0, 2, (n, 3), generator=g).float()
    return torch.randn(n, 3, generator=g)


def weights_of(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for t in model_tensors(model).values()]


# --------------------------------------------------------------------------------------------
# Losses: padding slots weigh nothing, accumulation over a short last batch is exact


@pytest.mark.parametrize("name", list(SUPERVISED_LOSSES))
def test_zero_weight_examples_change_neither_loss_nor_gradient(name):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(6, 5, generator=g), targets_for(name, 6, g)
    loss = SupervisedLoss(name, label_smoothing=0.1 if name == "cross_entropy" else 0.0)
    padded = {"x": x, "y": y, "weight": torch.tensor([1.0, 1, 1, 1, 0, 0])}
    real = {"x": x[:4], "y": y[:4]}
    assert loss.count(padded) == loss.count(real)
    model.zero_grad()
    (loss(model, padded) / loss.count(padded)).backward()
    padded_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (loss(model, real) / loss.count(real)).backward()
    for a, b in zip(padded_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


@pytest.mark.parametrize("name", ["cross_entropy", "mse"])
def test_micro_batches_of_a_short_last_step_equal_one_batch(name):
    """7 examples, batch 8 in micro-batches of 2: padding is dealt round-robin, the step is still exact."""
    from lmkiln.data.labelled import TensorExamples

    g = torch.Generator().manual_seed(2)
    kind = "classification" if name == "cross_entropy" else "regression"
    examples = TensorExamples(torch.randn(7, 5, generator=g), targets_for(name, 7, g), kind)
    stream = EpochBatches(7, batch_size=8, micro_batch_size=2, seed=0)
    micro = [collate(examples, next(stream)) for _ in range(stream.accumulation)]
    assert sum(b["examples"] for b in micro) == 7
    whole = collate(examples, list(range(7)))
    loss = SupervisedLoss(name, class_weights=[1.0, 2.0, 0.5] if name == "cross_entropy" else [])
    torch.manual_seed(0)
    model = nn.Linear(5, 3)

    def step(batches):
        model.zero_grad()
        result = train_step(model, loss, batches, CPU, grad_clip=0)
        return result.loss, [p.grad.clone() for p in model.parameters()]

    (loss_a, grads_a), (loss_b, grads_b) = step(micro), step([whole])
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_pytorch_criteria_become_the_same_named_loss():
    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(9, 4, generator=g), torch.randint(0, 4, (9,), generator=g)
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.5]), label_smoothing=0.2)
    loss = loss_from_criterion(criterion)
    batch = {"y": y}
    torch.testing.assert_close(loss.total(logits, batch) / loss.count(batch), criterion(logits, y))
    assert loss_from_criterion(nn.HuberLoss(delta=0.3)).huber_delta == 0.3
    assert loss_from_criterion(nn.BCEWithLogitsLoss()).name == "bce"
    with pytest.raises(LmkilnError, match="unsupported loss module L1Loss.*cross_entropy, bce, mse, huber"):
        loss_from_criterion(nn.L1Loss())


# --------------------------------------------------------------------------------------------
# Names build; unknown names list the valid ones


def tiny_trainer(tmp_path, **kwargs) -> Trainer:
    x, y = blobs()
    torch.manual_seed(0)
    model = kwargs.pop("model", None) or nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = kwargs.pop("data", (x[:48], y[:48]))
    val = kwargs.pop("val", (x[48:], y[48:]))
    settings = dict(batch_size=8, run_dir=tmp_path / "run", overrides=dict(QUIET))
    return Trainer(model, data, val, **{**settings, **kwargs})


@pytest.mark.parametrize(
    "name, extra",
    [(name, {}) for name in OPTIMIZERS] + [("sgd", {"optim.momentum": 0.9, "optim.nesterov": True})],
)
def test_every_optimizer_name_builds_and_trains(tmp_path, name, extra):
    trainer = tiny_trainer(tmp_path, optimizer=name, lr=0.05, epochs=3, overrides={**QUIET, **extra})
    assert type(trainer.optimizer).__name__.lower() == name
    result = trainer.fit()
    assert result.steps == 18 and result.epochs == 3
    first, last = result.history[0]["val_loss"], result.history[-1]["val_loss"]
    assert last < first - 0.1, (first, last)  # well-separated blobs: every optimizer makes progress


@pytest.mark.parametrize("name", list(SUPERVISED_LOSSES))
def test_every_loss_name_builds_and_trains(tmp_path, name):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 4, generator=g)
    if name == "cross_entropy":
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    elif name == "bce":
        y = (x[:, :3] > 0).float()
    else:
        y = x[:, :3] * 2 - 1
    torch.manual_seed(0)
    trainer = Trainer(
        nn.Linear(4, 3), (x, y), (x, y), loss=name, optimizer="adam", lr=0.05, epochs=15, batch_size=8,
        run_dir=tmp_path / "run", overrides=QUIET,
    )  # fmt: skip
    result = trainer.fit()
    first, last = result.history[0]["val_loss"], result.metrics["val_loss"]
    assert last < 0.7 * first, (first, last)
    expected = {"cross_entropy": "val_accuracy", "bce": "val_f1_micro", "mse": "val_mae", "huber": "val_mse"}
    assert expected[name] in result.metrics


def test_unknown_names_list_the_valid_ones(tmp_path):
    with pytest.raises(LmkilnError, match="'loss.name'.*'crossentropy' is not one of 'cross_entropy'"):
        tiny_trainer(tmp_path, loss="crossentropy")
    with pytest.raises(LmkilnError, match="'optim.name'.*'sgdd' is not one of 'adamw', 'adam', 'sgd'"):
        tiny_trainer(tmp_path, optimizer="sgdd")
    with pytest.raises(LmkilnError, match="'schedule.name'.*'cosin'.*did you mean 'cosine'"):
        tiny_trainer(tmp_path, overrides={"schedule.name": "cosin"})
    with pytest.raises(LmkilnError, match="unknown classification metric 'auc'; valid: accuracy"):
        tiny_trainer(tmp_path, metrics=["auc"])
    with pytest.raises(LmkilnError, match="monitor 'val_mse' is not a validation metric here; available"):
        tiny_trainer(tmp_path, monitor="mse")
    with pytest.raises(LmkilnError, match="val_accuracy improves as it rises.*monitor_mode='max'"):
        tiny_trainer(tmp_path, monitor="accuracy", monitor_mode="min")
    with pytest.raises(LmkilnError, match="give epochs or steps, not both"):
        tiny_trainer(tmp_path, epochs=2, steps=3)


# --------------------------------------------------------------------------------------------
# Epochs, steps, early stopping, the best checkpoint, resume


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, torch.zeros(len(x), dtype=torch.long)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        self.reads[index] += 1
        return self.x[index], self.y[index]


def test_epochs_see_every_example_once_and_steps_stop_on_the_step(tmp_path):
    x, y = blobs(21)
    dataset = CountingDataset(x, y)
    trainer = tiny_trainer(tmp_path, data=dataset, val=None, epochs=3)
    probe = dataset.reads.clone()  # the shape check reads examples 0 and 1 once
    result = trainer.fit()
    assert (dataset.reads - probe).tolist() == [3] * 21
    assert (result.steps, result.epochs, result.steps_per_epoch, result.stop_reason) == (
        9,
        3,
        3,
        "max_epochs",
    )
    result = tiny_trainer(tmp_path / "s", steps=7, val=None).fit()
    assert (result.steps, result.epochs, result.stop_reason) == (7, 1, "max_steps")


SCRIPT = [5.0, 1.0, 0.8, 0.7, 0.695, 0.75, 0.65, 0.66, 0.645, 0.7, 0.1, 0.1]
"""Validation values per evaluation (step 0, then one per epoch). With min_delta 0.01 and
patience 3: epochs 4 (a gain of only 0.005) and 5 are bad, epoch 6 is a new best, epochs 7, 8
(0.005 again) and 9 are bad, so training stops after epoch 9 with the best at epoch 6."""


def test_early_stopping_stops_at_the_expected_epoch_and_keeps_the_best(tmp_path):
    calls = iter(SCRIPT)

    def scripted(outputs, targets):
        return next(calls)

    trainer = tiny_trainer(
        tmp_path, epochs=50, metrics=[scripted], monitor="scripted", monitor_mode="min", patience=3,
        min_delta=0.01, optimizer="sgd", lr=0.05,
    )  # fmt: skip
    spe = 6  # 48 examples in batches of 8
    result = trainer.fit()
    assert result.stop_reason == "early_stopping"
    assert result.epochs == 9 and result.steps == 9 * spe
    assert [h["epoch"] for h in result.history] == list(range(10))
    assert [h["val_scripted"] for h in result.history] == SCRIPT[:10]
    assert (result.best_step, result.best_value, result.best_epoch) == (6 * spe, 0.65, 6)
    best = tmp_path / "run" / "checkpoints" / ckpt.checkpoint_name(6 * spe)
    assert result.restored_best and result.checkpoint == best
    saved = ckpt.read_checkpoint(best).model
    for name, tensor in model_tensors(trainer.model).items():
        assert torch.equal(tensor, saved[name]), name  # the model holds the best weights
    latest = ckpt.read_checkpoint(tmp_path / "run" / "checkpoints" / ckpt.checkpoint_name(9 * spe)).model
    assert any(not torch.equal(latest[k], saved[k]) for k in saved)


def test_resume_continues_bit_for_bit(tmp_path):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    full = tiny_trainer(tmp_path / "a", model=model(), epochs=4, optimizer="adamw", restore_best=False)
    full.fit()
    tiny_trainer(tmp_path / "b", model=model(), epochs=2, optimizer="adamw", restore_best=False).fit()
    resumed = tiny_trainer(tmp_path / "b", model=model(), epochs=4, optimizer="adamw", restore_best=False)
    result = resumed.fit(resume="auto")
    assert result.steps == 24
    for a, b in zip(weights_of(full.model), weights_of(resumed.model)):
        assert torch.equal(a, b)


def test_evaluate_report_and_predict(tmp_path):
    x, y = blobs(90, seed=5)
    trainer = tiny_trainer(tmp_path, data=(x[:60], y[:60]), val=(x[60:], y[60:]), epochs=20, lr=0.02)
    trainer.fit()
    metrics = trainer.evaluate((x[60:], y[60:]))
    predicted = trainer.predict(x[60:])
    assert metrics["accuracy"] == pytest.approx((predicted == y[60:]).float().mean().item())
    assert metrics["accuracy"] >= 0.9, metrics  # separated blobs
    report = trainer.report((x[60:], y[60:]), class_names=["a", "b", "c"])
    assert report.confusion.sum() == 30 and report.confusion.trace() == round(30 * metrics["accuracy"])
    png = report.save_confusion_matrix(tmp_path / "cm.png")
    assert png.stat().st_size > 1000


# --------------------------------------------------------------------------------------------
# Bad input: one clear message naming the example


def test_bad_data_names_the_example(tmp_path):
    x, y = blobs()
    with pytest.raises(LmkilnError, match=r"does not accept the training examples \(each of shape \(4,\).*"):
        tiny_trainer(tmp_path, model=nn.Linear(6, 3))
    bad = y.clone()
    bad[5] = 7
    with pytest.raises(LmkilnError, match=r"training data: example 5 has label 7, outside \[0, 3\)"):
        tiny_trainer(tmp_path, data=(x, bad))
    nan = x.clone()
    nan[4, 2] = float("nan")
    with pytest.raises(LmkilnError, match="training data: example 4, feature 2 is nan"):
        tiny_trainer(tmp_path, data=(nan, y))
    with pytest.raises(LmkilnError, match="features have 60 rows but targets have 59"):
        tiny_trainer(tmp_path, data=(x, y[:-1]))
    with pytest.raises(LmkilnError, match="example 0 has label .*0.5.*not a class id"):
        tiny_trainer(tmp_path, data=(x, y.float() + 0.5))
    with pytest.raises(LmkilnError, match="validation data: example 2 has label -1"):
        tiny_trainer(tmp_path, val=(x[:5], torch.tensor([0, 1, -1, 0, 1])))
    with pytest.raises(LmkilnError, match="early stopping .*needs validation data"):
        tiny_trainer(tmp_path, val=None, patience=2)


def test_import_lmkiln_stays_light_and_exports_trainer():
    code = (
        "import sys, lmkiln, lmkiln.cli; "
        "heavy = [m for m in ('torch', 'sklearn', 'pyarrow') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "from lmkiln import Trainer; print(Trainer.__module__)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert proc.stdout.strip() == "lmkiln.train.supervised"


def test_learning_rate_schedule_by_name(tmp_path):
    import json

    trainer = tiny_trainer(
        tmp_path, schedule="cosine", lr=0.1, steps=20, val=None,
        overrides={**QUIET, "schedule.warmup_steps": 2, "schedule.min_lr_ratio": 0.1, "train.log_every": 1},
    )  # fmt: skip
    trainer.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    lrs = [e["lr"] for e in map(json.loads, lines) if e["event"] == "train"]
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1)  # linear warmup
    assert lrs[-1] == pytest.approx(0.01, rel=0.1) and lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)
