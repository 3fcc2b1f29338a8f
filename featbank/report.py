"""Classification metrics, a printable table, and the pictures saved with a bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "compute_metrics",
    "format_metrics",
    "save_metrics_json",
    "plot_confusion_matrix",
    "plot_per_class_recall",
    "plot_misclassified",
    "write_report_files",
]


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Top-1, top-5 (>= 5 classes), balanced accuracy, macro F1, per-class P/R/F1, confusion matrix.

    Args:
        y_true: (N,) class indices into ``classes``.
        proba: (N, C) probabilities, columns in the order of ``classes``.
    """
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y_true = np.asarray(y_true, np.int64)
    proba = np.asarray(proba, np.float64)
    k = len(classes)
    labels = np.arange(k)
    y_pred = proba.argmax(axis=1) if len(proba) else np.zeros(0, np.int64)
    out: dict[str, Any] = {"n_samples": int(len(y_true)), "n_classes": k}
    if len(y_true) == 0:
        return out
    out["top1"] = float(np.mean(y_pred == y_true))
    if k >= 5:
        top5 = np.argsort(-proba, axis=1)[:, :5]
        out["top5"] = float(np.mean((top5 == y_true[:, None]).any(axis=1)))
    present = np.unique(y_true)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["balanced_accuracy"] = float(balanced_accuracy_score(y_true, y_pred))
        out["macro_f1"] = float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    eps = 1e-15
    out["log_loss"] = float(-np.mean(np.log(np.clip(proba[np.arange(len(y_true)), y_true], eps, 1.0))))
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
    """PNG bytes of the row-normalised confusion matrix (rows: true class, each sums to 1)."""
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
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "Confusion matrix (normalised by true class)")
    return _png(fig)


def plot_per_class_recall(metrics: dict[str, Any], title: str = "") -> bytes:
    """PNG bytes of a horizontal bar chart of recall per class (support in the labels)."""
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
        ax.axvline(metrics["balanced_accuracy"], color="tab:red", ls="--", label="balanced accuracy")
        ax.legend(loc="lower right")
    ax.set_title(title or "Recall per class")
    return _png(fig)


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
