"""Metrics equal scikit-learn's on random inputs."""

from __future__ import annotations

import pytest
import torch

from lmkiln.train.metrics import classification_metrics, confusion_matrix, per_class_f1, regression_metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    n_classes = 5
    target = torch.randint(0, n_classes, (200,), generator=g)
    predicted = torch.where(
        torch.rand(200, generator=g) < 0.6, target, torch.randint(0, n_classes, (200,), generator=g)
    )
    predicted[predicted == 3] = 2  # a class that is never predicted
    ours = classification_metrics(predicted, target, n_classes)
    y, p = target.numpy(), predicted.numpy()
    assert ours["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, p))
    for avg in ("macro", "micro"):
        kw = dict(average=avg, zero_division=0, labels=list(range(n_classes)))
        assert ours[f"f1_{avg}"] == pytest.approx(sklearn_metrics.f1_score(y, p, **kw))
        assert ours[f"precision_{avg}"] == pytest.approx(sklearn_metrics.precision_score(y, p, **kw))
        assert ours[f"recall_{avg}"] == pytest.approx(sklearn_metrics.recall_score(y, p, **kw))
    assert per_class_f1(predicted, target, n_classes) == pytest.approx(
        sklearn_metrics.f1_score(y, p, average=None, zero_division=0, labels=list(range(n_classes))).tolist()
    )
    assert (
        confusion_matrix(predicted, target, n_classes).tolist()
        == sklearn_metrics.confusion_matrix(y, p, labels=list(range(n_classes))).tolist()
    )


def test_regression_metrics_match_sklearn():
    g = torch.Generator().manual_seed(0)
    target, predicted = torch.randn(100, generator=g), torch.randn(100, generator=g)
    ours = regression_metrics(predicted, target)
    assert ours["mse"] == pytest.approx(sklearn_metrics.mean_squared_error(target.numpy(), predicted.numpy()))
    assert ours["mae"] == pytest.approx(
        sklearn_metrics.mean_absolute_error(target.numpy(), predicted.numpy())
    )


@pytest.mark.parametrize("seed", range(3))
def test_multilabel_metrics_match_sklearn(seed):
    from lmkiln.train.metrics import multilabel_metrics

    g = torch.Generator().manual_seed(seed)
    target = torch.rand(150, 4, generator=g) < 0.4
    predicted = torch.where(
        torch.rand(150, 4, generator=g) < 0.7, target, torch.rand(150, 4, generator=g) < 0.5
    )
    predicted[:, 3] = False  # a label that is never predicted
    ours = multilabel_metrics(predicted, target)
    y, p = target.numpy(), predicted.numpy()
    assert ours["subset_accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, p))
    for avg in ("macro", "micro"):
        kw = dict(average=avg, zero_division=0)
        assert ours[f"f1_{avg}"] == pytest.approx(sklearn_metrics.f1_score(y, p, **kw))
        assert ours[f"precision_{avg}"] == pytest.approx(sklearn_metrics.precision_score(y, p, **kw))
        assert ours[f"recall_{avg}"] == pytest.approx(sklearn_metrics.recall_score(y, p, **kw))


def test_task_metrics_decode_outputs_like_the_loss():
    from lmkiln.train.metrics import METRIC_NAMES, task_metrics

    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.1, 0.2]])
    assert task_metrics("classification", logits, torch.tensor([0, 1]))["accuracy"] == 0.5
    # multi-label: a positive logit means sigmoid > 0.5, i.e. predicted 1
    assert (
        task_metrics("multilabel", logits, torch.tensor([[1.0, 0, 1], [0, 1, 1]]))["subset_accuracy"] == 1.0
    )
    assert task_metrics("regression", logits[:, :1], torch.tensor([2.0, -1.0]))["mse"] == pytest.approx(2.0)
    for kind, names in METRIC_NAMES.items():
        target = torch.tensor([0, 1]) if kind == "classification" else torch.zeros(2, 3)
        assert sorted(task_metrics(kind, logits, target)) == sorted(names)
