"""Hyperparameter sweeps on a validation split: the linear head's warm-started C sweep, a scikit-learn head's C grid."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ._features import Features
from ._sklearn import estimator_proba

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

    from ._estimator import Estimator
    from ._linear_head import LinearHead

__all__ = ["COARSE_GRID", "SKLEARN_C_GRID", "half_decades", "ValSplit", "val_score", "sweep_linear", "sweep_sklearn",
           "fit_sklearn"]

#: Coarse grid of C (inverse L2 strength, scikit-learn's convention) for the linear sweep.
COARSE_GRID = tuple(float(c) for c in np.logspace(-6, 2, 9))
#: Coarse grid of C for a scikit-learn head that has one (SVC, LinearSVC, LogisticRegression): the
#: decades around scikit-learn's default 1.0; the best is then refined by half a decade either side.
SKLEARN_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
_REFINE = (-0.5, 0.5)  # decades around the best coarse C
_SWEEP_MAX_ITER = 150
_SWEEP_TOL = 1e-3  # sweep fits only rank C on val (same choice as 5e-4 on the benchmarks; 2e-3 changed it)
_PATIENCE = 3


def half_decades(grid: Any) -> list[float]:
    """The C values the validation sweep can visit from ``grid``: each, and each moved by :data:`_REFINE`
    decades (as the sweep computes them), sorted, a value that two give kept once (``fit --cv K``'s grid)."""
    out: dict[str, float] = {}
    for c in sorted(float(c) for c in grid):
        for d in (0.0, *_REFINE):
            v = c * 10**d
            out.setdefault(f"{v:.9g}", v)
    return sorted(out.values())


@dataclass
class ValSplit:
    """The rows a head is selected on: training rows, validation rows (``Xv is None``: none), the classes."""

    Xtr: Features
    ytr: np.ndarray
    Xv: Features | None
    yv: np.ndarray | None
    n_classes: int
    balanced: bool = False

    @property
    def has_val(self) -> bool:
        return self.Xv is not None


def val_score(est: Estimator, Xv: Features | np.ndarray, yv: np.ndarray, k: int,
              balanced: bool) -> tuple[float, float, np.ndarray]:
    """(top-1 or balanced accuracy, log loss, probabilities) of a fitted head on validation rows."""
    proba = estimator_proba(est, Xv, k)
    pred = proba.argmax(1)
    if balanced:
        from sklearn.metrics import balanced_accuracy_score

        score = float(balanced_accuracy_score(yv, pred))
    else:
        score = float(np.mean(pred == yv))
    loss = float(-np.mean(np.log(np.clip(proba[np.arange(len(yv)), yv], 1e-15, 1.0))))
    return score, loss, proba


def sweep_linear(head: LinearHead, data: ValSplit,
                 grid: Sequence[float]) -> tuple[float, list[dict[str, Any]], dict[float, tuple]]:
    """The best C of ``grid`` (refined half a decade either side) on validation, each fit warm-started."""
    results: list[dict[str, Any]] = []
    sols: dict[float, tuple] = {}
    k, balanced = data.n_classes, data.balanced

    def run(C: float) -> None:
        if sols:  # warm start from the nearest solution in log C
            near = min(sols, key=lambda c: abs(np.log10(c) - np.log10(C)))
            head.set_solution(*sols[near])
        head.set_params(C=C, warm_start=bool(sols))
        head.fit(data.Xtr, data.ytr)
        sols[C] = head.solution()
        score, loss, _ = val_score(head, data.Xv, data.yv, k, balanced)
        results.append({"C": C, "val_score": score, "val_log_loss": loss, "n_iter": head.n_iter_})

    def best() -> float:
        return max(results, key=lambda r: (round(r["val_score"], 12), -r["val_log_loss"]))["C"]

    # Sweep fits only rank C values, so they stop early (loose tolerance); the refit is exact.
    final = head.get_params()
    head.set_params(max_iter=min(int(final["max_iter"]), _SWEEP_MAX_ITER), tol=max(float(final["tol"]), _SWEEP_TOL))
    worse = 0
    for C in sorted(grid):
        run(float(C))
        # Weak regularisation costs the most iterations, and the validation curve of an L2 sweep
        # has one peak: stop once a step past the best C is worse in both score and log loss, or
        # after _PATIENCE steps with a worse score.
        top = max(results, key=lambda r: (round(r["val_score"], 12), -r["val_log_loss"]))
        last = results[-1]
        if top["C"] < C and last["val_score"] < top["val_score"]:
            worse += 1
            if worse >= _PATIENCE or last["val_log_loss"] > top["val_log_loss"]:
                break
        else:
            worse = 0
    c0 = best()
    for d in _REFINE:
        C = float(c0 * 10**d)
        if not any(np.isclose(C, r["C"], rtol=1e-6) for r in results):
            run(C)
    head.set_params(max_iter=final["max_iter"], tol=final["tol"])
    return best(), sorted(results, key=lambda r: r["C"]), sols


def fit_sklearn(est: Pipeline, X: np.ndarray, y: np.ndarray, class_weight: str | None) -> Pipeline:
    """Fit a scikit-learn head pipeline, as sample weights where its classifier takes no ``class_weight``."""
    kw = {}
    if class_weight is not None and "class_weight" not in est[-1].get_params():
        from sklearn.utils.class_weight import compute_sample_weight

        kw["clf__sample_weight"] = compute_sample_weight(class_weight, y)
    try:
        return est.fit(X, y, **kw)
    except ValueError as e:
        raise ConfigError(f"{type(est[-1]).__name__} could not be fitted: {e}") from None


def sweep_sklearn(est: Pipeline, data: ValSplit, grid: Sequence[float],
                  class_weight: str | None) -> tuple[Pipeline, dict[str, Any], list[dict[str, Any]], np.ndarray]:
    """C of a scikit-learn head chosen on validation: the coarse grid, then half a decade either side of the best.

    Ties go to the smaller C (the stronger regularisation). Returns the estimator fitted on the
    training rows at the chosen C, the choice, the sweep and the validation probabilities.
    """
    Xtr, Xv = data.Xtr.to_array(), data.Xv.to_array()
    step = est.steps[-1][0]
    fits: dict[float, tuple[float, float]] = {}  # C -> (val score, val log loss)
    kept: dict[str, Any] = {}  # the best fit so far: only it is copied, not one estimator per C

    def best() -> float:
        return max(fits, key=lambda c: (round(fits[c][0], 12), -c))

    def fit_at(C: float) -> None:
        if not any(np.isclose(C, c, rtol=1e-6) for c in fits):
            fit_sklearn(est.set_params(**{f"{step}__C": C}), Xtr, data.ytr, class_weight)
            score, loss, proba = val_score(est, Xv, data.yv, data.n_classes, data.balanced)
            fits[C] = (score, loss)
            if best() == C:
                kept.update(est=copy.deepcopy(est), proba=proba)

    for C in grid:
        fit_at(float(C))
    top = best()
    for d in _REFINE:
        fit_at(float(top * 10 ** d))
    sweep = [{"C": c, "val_score": fits[c][0], "val_log_loss": fits[c][1]} for c in sorted(fits)]
    return kept["est"], {"C": best()}, sweep, kept["proba"]
