"""Metrics (one implementation on scikit-learn's) and the pictures saved with bundles."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss

from featbank import report

CLASSES = ["functional", "mono", "poly", "severe", "last"]


def _data(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    proba = rng.dirichlet(np.ones(len(CLASSES)), n)
    proba[np.arange(n), y] += 0.8 * (rng.random(n) < 0.7)
    return y, proba / proba.sum(1, keepdims=True)


def test_compute_metrics_matches_scikit_learn_and_keeps_both_accuracy_names():
    y, proba = _data()
    m = report.compute_metrics(y, proba, CLASSES, loss=0.5)
    pred = proba.argmax(1)
    assert m["top1"] == m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["log_loss"] == pytest.approx(log_loss(y, proba, labels=range(5)))
    top5 = np.argsort(-proba, 1)[:, :5]
    assert m["top5"] == pytest.approx(np.mean((top5 == y[:, None]).any(1))) == 1.0
    assert m["loss"] == 0.5 and m["n_samples"] == 200 and m["n_classes"] == 5
    cm = np.asarray(m["confusion_matrix"])
    assert cm.sum() == 200 and np.trace(cm) == int((pred == y).sum())
    assert [m["per_class"][c]["support"] for c in CLASSES] == np.bincount(y, minlength=5).tolist()


def test_balanced_accuracy_ignores_classes_absent_from_the_labels():
    # Class 2 is predicted but never true: the mean recall is over classes 0 and 1 only.
    y = np.array([0, 0, 1, 1])
    proba = np.eye(3)[[0, 2, 1, 1]]
    m = report.compute_metrics(y, proba, ["a", "b", "c"])
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert report.compute_metrics(np.zeros(0, int), np.zeros((0, 3)), ["a", "b", "c"]) == {"n_samples": 0, "n_classes": 3}


def test_per_class_recall_legend_does_not_cover_the_bars():
    y, proba = _data()
    fig = report._per_class_recall_figure(report.compute_metrics(y, proba, CLASSES))
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    for bar in ax.patches:
        assert not legend.overlaps(bar.get_window_extent())
    assert report.plot_per_class_recall(report.compute_metrics(y, proba, CLASSES)).startswith(b"\x89PNG")


@pytest.mark.parametrize("metric", ["balanced_accuracy", "accuracy"])
def test_learning_curve_has_whole_epochs_and_one_metric_per_axis(metric):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "train_accuracy": 0.5 + 0.1 * e,
                "val_accuracy": 0.4 + 0.1 * e, "val_balanced_accuracy": 0.3 + 0.1 * e} for e in (1, 2, 3)]
    start = {"val_loss": 1.5, "val_accuracy": 0.3, "val_balanced_accuracy": 0.2}
    fig = report._learning_curve_figure(history, metric, 2, start)
    fig.canvas.draw()
    assert len(fig.axes) == (3 if metric == "balanced_accuracy" else 2)
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        labels = [line.get_label() for line in ax.get_lines()]
        title = ax.get_title()
        # Train accuracy is drawn only on the accuracy axis, never against balanced accuracy.
        assert ("train" in labels) == (title in ("cross-entropy", "accuracy") or title.startswith("accuracy"))
    assert "balanced accuracy" in fig.axes[-1].get_title() if metric == "balanced_accuracy" else True
