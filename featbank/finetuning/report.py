"""Metrics and plots of a fine-tuning run."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

__all__: list[str] = []  # machinery of the loop; nothing public

# --------------------------------------------------------------------------------------------
# Metrics and plots
# --------------------------------------------------------------------------------------------


def _metrics(y: np.ndarray, pred: np.ndarray, n_classes: int, loss: float | None = None) -> dict[str, Any]:
    ok = y >= 0
    y, pred = y[ok], pred[ok]
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (y, pred), 1)
    support = cm.sum(1)
    recall = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    out: dict[str, Any] = {
        "n_samples": int(len(y)),
        "accuracy": float((y == pred).mean()) if len(y) else float("nan"),
        "balanced_accuracy": float(np.nanmean(recall)) if np.any(support > 0) else float("nan"),
        "per_class_recall": [None if math.isnan(r) else float(r) for r in recall],
        "confusion_matrix": cm.tolist(),
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _plot_learning_curve(history: list[dict[str, Any]], metric: str, best_epoch: int,
                         start: dict[str, Any] | None = None) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(ep, [h["val_loss"] for h in history], "o-", label="val")
    a1.set_xlabel("epoch"), a1.set_ylabel("cross-entropy"), a1.legend()
    a2.plot(ep, [h["train_accuracy"] for h in history], "o-", label="train accuracy")
    if start:  # LP-FT: the probe at step 0
        a1.plot([0], [start["val_loss"]], "s", color="C1")
        a2.plot([0], [start[f"val_{metric}"]], "s", color="C1", label="val, starting probe")
    a2.plot(ep, [h[f"val_{metric}"] for h in history], "o-", label=f"val {metric}")
    a2.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best (epoch {best_epoch})")
    a2.set_xlabel("epoch"), a2.set_ylim(0, 1.02), a2.legend(fontsize=8)
    fig.suptitle("featbank finetune: learning curve")
    return _png(fig)


def _plot_confusion(cm: np.ndarray, classes: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * n))
    ax.imshow(cm, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    return _png(fig)
