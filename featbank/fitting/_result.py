"""What one ``fit`` returns: :class:`FitResult`, its summary and its JSON form."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..heads import Estimator

__all__ = ["FitResult"]


@dataclass
class FitResult:
    """What one ``fit`` did.

    Attributes:
        path: the bundle folder (``None`` when ``save=False``).
        head: ``linear``, ``mlp`` or the scikit-learn class name.
        estimator: the fitted estimator (refitted on train+val), mapping embeddings -> probabilities.
        classes: class names.
        chosen: the selected hyperparameter, e.g. ``{"C": 0.01}`` or ``{"epochs": 14}``.
        sweep: one dict per tried value: C, val top-1, val log loss, L-BFGS iterations.
        metrics: ``{"val": {...}, "test": {...}}`` (and ``"shots"`` for K-shot runs).
        eval_split: which split the headline metrics come from (``test`` or ``val``).
        cache_path: the cache used; ``streaming``: whether rows were streamed from disk.
    """

    path: Path | None
    head: str
    estimator: Estimator
    classes: list[str]
    chosen: dict[str, Any]
    sweep: list[dict[str, Any]]
    metrics: dict[str, Any]
    eval_split: str
    cache_path: Path
    streaming: bool = False
    seconds: float = 0.0
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    notes: list[str] = field(default_factory=list)
    search: dict[str, Any] | None = None

    @property
    def headline(self) -> dict[str, Any]:
        return self.metrics.get(self.eval_split, {})

    def summary(self) -> str:
        from ..report import format_metrics

        chosen = ", ".join(f"{k}={_fmt(v)}" for k, v in self.chosen.items()) or "-"
        lines = [
            f"Head {self.head} on {self.cache_path.name}: {self.n_train} train / {self.n_val} val / {self.n_test} test"
            f"{' (streamed)' if self.streaming else ''}; chosen {chosen}; {self.seconds:.1f} s",
        ]
        lines += [f"Note: {n}" for n in self.notes]
        if self.search is not None:
            from ._report import search_lines

            lines += search_lines(self.search, self.headline)
        lines += _features_lines(self.metrics.get("features"))
        if "shots" in self.metrics:
            s = self.metrics["shots"]
            lines.append(
                f"{s['shots']}-shot over seeds {s['seeds']}: top-1 {s['top1_mean']:.4f} ± {s['top1_std']:.4f}, "
                f"balanced acc {s['balanced_accuracy_mean']:.4f} ± {s['balanced_accuracy_std']:.4f}, "
                f"macro F1 {s['macro_f1_mean']:.4f} ± {s['macro_f1_std']:.4f}"
            )
        if "val" in self.metrics and self.eval_split != "val":
            v = self.metrics["val"]
            if v.get("n_samples"):
                lines.append(f"Validation (model fit on train only): top-1 {v['top1']:.4f}, balanced acc "
                             f"{v['balanced_accuracy']:.4f} (n={v['n_samples']})")
        lines.append(format_metrics(self.headline, f"{self.eval_split.capitalize()} metrics:"))
        if self.path is not None:
            lines.append(f"Bundle: {self.path}")
            for f in ("metrics.json", "confusion_matrix.png", "per_class_recall.png", "misclassified.png"):
                if (self.path / f).exists():
                    lines.append(f"  {self.path / f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None, "head": self.head, "classes": self.classes,
            "chosen": self.chosen, "sweep": self.sweep, "metrics": self.metrics, "eval_split": self.eval_split,
            "cache": str(self.cache_path), "streaming": self.streaming, "seconds": self.seconds,
            "n_train": self.n_train, "n_val": self.n_val, "n_test": self.n_test, "notes": self.notes,
            **({"leaderboard": self.search["leaderboard"], "search": self.search} if self.search else {}),
        }


def _features_lines(feats: dict[str, Any] | None) -> list[str]:
    """The layers, views and TTA lines of a fit's summary (nothing for a plain fit)."""
    if not feats or (feats["layers"] == ["final"] and not feats["n_views"] and "selection" not in feats):
        return []
    dims = "+".join(str(feats["layer_dims"][t]) for t in feats["layers"])
    lines = [f"Layers {','.join(feats['layers'])} ({dims} = {sum(feats['layer_dims'].values())} features, "
             f"pooling {feats['pooling']})"]
    sel = feats.get("selection")
    if sel:
        from ._layers import LayerChoice

        lines.append(LayerChoice(tuple(sel["layers"]), sel["val_score"], sel["rounds"], sel["scorer"],
                                 sel["n_train_rows"]).summary())
    if feats.get("view_pool"):
        lines.append(f"Views: {feats['n_views']} {feats['augment']} view(s) per image, pooled ({feats['view_pool']} of each "
                     f"feature over the plain and augmented views: one row of {2 * sum(feats['layer_dims'].values())} "
                     "features per image, no TTA)")
    elif feats["n_views"]:
        t = feats["tta_choice"]
        why = (f"validation top-1 {t['val_plain']:.4f} plain vs {t['val_tta']:.4f} averaged"
               if "val_plain" in t else t.get("reason") or f"--tta {t['mode']}")
        lines.append(f"Views: {feats['n_views']} {feats['augment']} view(s) per image; trained on "
                     f"{'plain + views' if feats['views_used'] else 'the plain view only'}; TTA "
                     f"{'on' if feats['tta'] else 'off'} ({why})")
        if "eval_tta_top1" in t:
            lines.append(f"Evaluation top-1 without TTA {t['eval_plain_top1']:.4f}, with TTA {t['eval_tta_top1']:.4f}")
    return lines


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


