"""Classification metrics, a printable table, and the pictures saved with a bundle.

The one home of metrics and plots for ``fit``, ``evaluate`` and ``finetune``: every number comes
from :func:`compute_metrics` (scikit-learn's metrics), every confusion matrix from
:func:`plot_confusion_matrix`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "compute_metrics",
    "format_metrics",
    "save_metrics_json",
    "plot_confusion_matrix",
    "plot_per_class_recall",
    "plot_misclassified",
    "plot_learning_curve",
    "write_report_files",
]


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str], *,
                    loss: float | None = None) -> dict[str, Any]:
    """Top-1, top-5 (>= 5 classes), balanced accuracy, macro F1, per-class P/R/F1, confusion matrix.

    Args:
        y_true: (N,) class indices into ``classes``.
        proba: (N, C) probabilities, columns in the order of ``classes``.
        loss: a mean loss to record as ``loss`` (fine-tuning's cross-entropy), if any.

    Returns:
        ``n_samples``, ``n_classes`` and, when there are samples: ``top1`` (top-1 accuracy; also
        under ``accuracy``, the name fine-tuning's ``--metric`` and history use), ``top5`` (>= 5
        classes), ``balanced_accuracy`` (mean recall of the classes present), ``macro_f1`` (over
        the classes present), ``log_loss``, ``per_class`` (class -> precision, recall, f1,
        support) and ``confusion_matrix`` (rows: true class).
    """
    import warnings

    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    y_true = np.asarray(y_true, np.int64)
    proba = np.asarray(proba, np.float64)
    k = len(classes)
    labels = np.arange(k)
    out: dict[str, Any] = {"n_samples": int(len(y_true)), "n_classes": k}
    if len(y_true) == 0:
        return out
    y_pred = proba.argmax(axis=1)
    present = np.unique(y_true)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected on small evaluation sets.
        warnings.simplefilter("ignore")
        out["top1"] = out["accuracy"] = float(accuracy_score(y_true, y_pred))
        if k >= 5:
            out["top5"] = float(top_k_accuracy_score(y_true, proba, k=5, labels=labels))
        out["balanced_accuracy"] = float(balanced_accuracy_score(y_true, y_pred))
        out["macro_f1"] = float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    # Clipped rather than sklearn.metrics.log_loss, which renormalises rows and needs every class present.
    out["log_loss"] = float(-np.mean(np.log(np.clip(proba[np.arange(len(y_true)), y_true], 1e-15, 1.0))))
    if loss is not None:
        out["loss"] = float(loss)
    out["per_class"] = {
        str(c): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(classes)
    }
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def format_metrics(metrics: dict[str, Any], title: str = "") -> str:
    """A plain-text table: headline numbers, then per-class precision / recall / F1 / support."""
    lines = [title] if title else []
    if not metrics.get("n_samples"):
        return "\n".join(lines + ["  (no samples)"])
    head = [("top-1", "top1"), ("top-5", "top5"), ("balanced acc", "balanced_accuracy"), ("macro F1", "macro_f1")]
    lines.append("  " + "   ".join(f"{name} {metrics[k]:.4f}" for name, k in head if k in metrics)
                 + f"   (n={metrics['n_samples']})")
    per = metrics.get("per_class", {})
    if per:
        w = max(12, max(len(c) for c in per) + 2)
        lines.append(f"  {'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
        for c, m in per.items():
            lines.append(f"  {c:<{w}}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>9d}")
    return "\n".join(lines)


def save_metrics_json(metrics: dict[str, Any]) -> bytes:
    return (json.dumps(metrics, indent=2, sort_keys=False) + "\n").encode()


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def plot_confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], title: str = "") -> bytes:
    """PNG bytes of the row-normalised confusion matrix (rows: true class, each sums to 1).

    Each cell shows the fraction of its true class and, up to 12 classes, the image count.
    """
    plt = _plt()
    cm = np.asarray(cm, np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(classes)
    size = min(16, 2.5 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(k)
    ax.set_xticks(ticks, [str(c) for c in classes], rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(ticks, [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        counts = k <= 12  # room for the image count under the fraction
        for i in range(k):
            for j in range(k):
                text = f"{norm[i, j]:.2f}" + (f"\n({int(cm[i, j])})" if counts else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    note = "fraction of each true class" + ("; image count below" if k <= 12 else "")
    ax.set_title(f"{title}\n({note})" if title else f"Confusion matrix ({note})")
    return _png(fig)


def plot_per_class_recall(metrics: dict[str, Any], title: str = "") -> bytes:
    """PNG bytes of a horizontal bar chart of recall per class (support in the labels)."""
    return _png(_per_class_recall_figure(metrics, title))


def _per_class_recall_figure(metrics: dict[str, Any], title: str = "") -> Any:
    plt = _plt()
    per = metrics.get("per_class", {})
    names = list(per)
    rec = [per[c]["recall"] for c in names]
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.35 * len(names) + 1)))
    ax.barh(np.arange(len(names)), rec, color="tab:blue")
    ax.set_yticks(np.arange(len(names)), [f"{c} (n={per[c]['support']})" for c in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("recall")
    if "balanced_accuracy" in metrics:
        ax.axvline(metrics["balanced_accuracy"], color="tab:red", ls="--",
                   label=f"balanced accuracy (mean recall) {metrics['balanced_accuracy']:.3f}")
        # Below the axis: inside it, the legend hid the last bar.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    ax.set_title(title or "Recall per class")
    return fig


def plot_learning_curve(history: Sequence[dict[str, Any]], metric: str, best_epoch: int,
                        start: dict[str, Any] | None = None) -> bytes:
    """PNG bytes of a fine-tuning run: loss, accuracy (train and val) and the validation metric.

    Args:
        history: one row per epoch (``epoch``, ``train_loss``, ``val_loss``, ``train_accuracy``,
            ``val_accuracy``, ``val_<metric>``).
        metric: the selection metric (``balanced_accuracy`` or ``accuracy``); it gets its own
            panel unless it is ``accuracy``, so train accuracy is never drawn against another metric.
        best_epoch: the kept epoch (0: the LP-FT starting probe).
        start: validation numbers of the LP-FT starting probe, drawn at epoch 0.
    """
    return _png(_learning_curve_figure(history, metric, best_epoch, start))


def _learning_curve_figure(history: Sequence[dict[str, Any]], metric: str, best_epoch: int,
                           start: dict[str, Any] | None) -> Any:
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    panels = [("loss", "cross-entropy"), ("accuracy", "accuracy")]
    if metric != "accuracy":
        panels.append((metric, metric.replace("_", " ")))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        if key in ("loss", "accuracy"):  # training has no balanced accuracy: that axis is val only
            ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", color="C0", label="train")
        ax.plot(ep, [h[f"val_{key}"] for h in history], "o-", color="C1", label="val")
        if start and f"val_{key}" in start:  # LP-FT: the probe is step 0
            ax.plot([0], [start[f"val_{key}"]], "s", color="C1", label="val, starting probe")
        if key == metric:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"kept (epoch {best_epoch})")
            label += " (selects the kept epoch)"
        if key != "loss":
            ax.set_ylim(0, 1.02)
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.suptitle("featbank finetune: learning curve")
    fig.tight_layout()
    return fig


def plot_misclassified(paths: Sequence[str | Path], y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str],
                       n: int = 16, thumb: int = 96) -> bytes:
    """PNG bytes of a grid of the most confidently misclassified images.

    Thumbnails are read from the original paths when they still exist; otherwise the tile says
    the file is gone. Each title: predicted class and its probability, then the true class.
    """
    plt = _plt()
    y_true = np.asarray(y_true)
    proba = np.asarray(proba)
    pred = proba.argmax(axis=1) if len(proba) else np.zeros(0, int)
    wrong = np.flatnonzero(pred != y_true)
    wrong = wrong[np.argsort(-proba[wrong, pred[wrong]], kind="stable")][:n]
    cols = min(4, max(1, len(wrong)))
    rows = max(1, (len(wrong) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if len(wrong) == 0:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    for ax, i in zip(axes.ravel(), wrong):
        p = Path(paths[i])
        img = None
        if p.is_file():
            try:
                from .images import load_image

                im = load_image(p)
                im.thumbnail((thumb * 2, thumb * 2))
                img = np.asarray(im)
            except Exception:  # noqa: BLE001 - a picture is a nicety; the metrics are what matter
                img = None
        if img is not None:
            ax.imshow(img)
        else:
            ax.text(0.5, 0.5, f"(missing)\n{p.name}", ha="center", va="center", fontsize=8)
        ax.set_title(f"pred {classes[pred[i]]} {proba[i, pred[i]]:.2f}\ntrue {classes[y_true[i]]}", fontsize=9)
    fig.suptitle("Most confidently misclassified")
    return _png(fig)


def write_report_files(metrics: dict[str, Any], classes: Sequence[str], paths: Sequence[str | Path] | None,
                       y_true: np.ndarray | None, proba: np.ndarray | None) -> dict[str, bytes]:
    """``{file name: bytes}`` of metrics.json and the three pictures, for a bundle."""
    files = {"metrics.json": save_metrics_json(metrics)}
    ev = metrics.get("test") or metrics.get("val") or {}
    if ev.get("confusion_matrix") is not None:
        files["confusion_matrix.png"] = plot_confusion_matrix(ev["confusion_matrix"], classes)
        files["per_class_recall.png"] = plot_per_class_recall(ev)
        if paths is not None and y_true is not None and proba is not None:
            files["misclassified.png"] = plot_misclassified(paths, y_true, proba, classes)
    return files
