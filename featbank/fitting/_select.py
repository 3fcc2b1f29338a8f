"""Hyperparameter selection on the validation split: the C sweep, head construction, one select-then-refit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError
from ._rows import CacheRows

__all__ = ["COARSE_GRID", "SKLEARN_C_GRID", "HeadSpec", "Selection", "make_head", "select_and_refit"]

#: Coarse grid of C (inverse L2 strength, scikit-learn's convention) for the linear sweep.
COARSE_GRID = tuple(float(c) for c in np.logspace(-6, 2, 9))
#: Coarse grid of C for a scikit-learn head that has one (SVC, LinearSVC, LogisticRegression): the
#: decades around scikit-learn's default 1.0; the best is then refined by half a decade either side.
SKLEARN_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
_REFINE = (-0.5, 0.5)  # decades around the best coarse C
_SWEEP_MAX_ITER = 150
_SWEEP_TOL = 1e-3  # sweep fits only rank C on val (same choice as 5e-4 on the benchmarks; 2e-3 changed it)
_PATIENCE = 3


@dataclass(frozen=True)
class HeadSpec:
    """A head to build and select: its name, parameters, preprocessing and the C grid of the sweep."""

    head: str
    params: dict[str, Any] = field(default_factory=dict)
    standardize: bool = True
    l2_normalize: bool = False
    class_weight: Any = None
    device: str = "auto"
    grid: Sequence[float] | None = None

    @property
    def is_torch(self) -> bool:
        return self.head in ("linear", "mlp")


@dataclass
class Selection:
    """One select-on-val-then-refit: the estimator, its type, the chosen setting and the evidence."""

    estimator: Any
    htype: str  # "linear", "mlp" or "sklearn"
    chosen: dict[str, Any]
    sweep: list[dict[str, Any]]
    val_metrics: dict[str, Any]
    val_proba: np.ndarray | None
    val_view_probas: list[np.ndarray] = field(default_factory=list)


def _val_score(est: Any, Xv: Any, yv: np.ndarray, k: int, balanced: bool) -> tuple[float, float, np.ndarray]:
    from ..heads import estimator_proba

    proba = estimator_proba(est, Xv, k)
    pred = proba.argmax(1)
    if balanced:
        from sklearn.metrics import balanced_accuracy_score

        score = float(balanced_accuracy_score(yv, pred))
    else:
        score = float(np.mean(pred == yv))
    loss = float(-np.mean(np.log(np.clip(proba[np.arange(len(yv)), yv], 1e-15, 1.0))))
    return score, loss, proba


def _sweep_linear(head: Any, Xtr: Any, ytr: np.ndarray, Xv: Any, yv: np.ndarray, k: int, balanced: bool,
                  grid: Sequence[float]) -> tuple[float, list[dict[str, Any]], dict[float, tuple]]:
    results: list[dict[str, Any]] = []
    sols: dict[float, tuple] = {}

    def run(C: float) -> None:
        if sols:  # warm start from the nearest solution in log C
            near = min(sols, key=lambda c: abs(np.log10(c) - np.log10(C)))
            head.set_solution(*sols[near])
        head.set_params(C=C, warm_start=bool(sols))
        head.fit(Xtr, ytr)
        sols[C] = head.solution()
        score, loss, _ = _val_score(head, Xv, yv, k, balanced)
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


def make_head(spec: HeadSpec, seed: int) -> tuple[Any, str]:
    """An unfitted estimator for ``spec`` and its type; every parameter is checked here, before any work.

    Raises:
        ConfigError: unknown head or parameter, a parameter value the head refuses, a class weight
            the classifier cannot take.
    """
    from ..heads import LinearHead, MLPHead, make_sklearn_head
    from ..heads._torch_head import validate_head_params

    def build(cls: type, extra: dict[str, Any]) -> Any:
        valid = cls().get_params()
        bad = [k for k in spec.params if k not in valid]
        if bad:
            raise ConfigError(
                f"The {spec.head} head has no parameter {', '.join(map(repr, bad))}. Its parameters are: "
                f"{', '.join(sorted(valid))}."
            )
        kw = {"standardize": spec.standardize, "l2_normalize": spec.l2_normalize, "class_weight": spec.class_weight,
              "device": spec.device, **extra, **spec.params}
        est = cls(**kw)
        validate_head_params(est)  # now, not at the end of a sweep
        return est

    if spec.head == "linear":
        return build(LinearHead, {}), "linear"
    if spec.head == "mlp":
        return build(MLPHead, {"random_state": seed}), "mlp"
    est = make_sklearn_head(spec.head, spec.params, standardize=spec.standardize, l2_normalize=spec.l2_normalize,
                            random_state=seed)
    if spec.class_weight is not None:
        if "class_weight" in est[-1].get_params():
            est.set_params(clf__class_weight=spec.class_weight)
        else:
            import inspect

            if "sample_weight" not in inspect.signature(est[-1].fit).parameters:
                raise ConfigError(
                    f"{type(est[-1]).__name__} takes neither class_weight nor sample weights; drop --class-weight."
                )
    return est, "sklearn"


def _fit_sklearn(est: Any, X: np.ndarray, y: np.ndarray, class_weight: Any) -> Any:
    kw = {}
    if class_weight is not None and "class_weight" not in est[-1].get_params():
        from sklearn.utils.class_weight import compute_sample_weight

        kw["clf__sample_weight"] = compute_sample_weight(class_weight, y)
    try:
        return est.fit(X, y, **kw)
    except ValueError as e:
        raise ConfigError(f"{type(est[-1]).__name__} could not be fitted: {e}") from None


def select_and_refit(cache: Any, source: CacheRows, spec: HeadSpec, seed: int, train: np.ndarray, val: np.ndarray,
                     refit_rows: np.ndarray, val_views: Sequence[np.ndarray] = ()) -> Selection:
    """Select the head's setting on ``val`` (C sweep, MLP early stopping), then refit on ``refit_rows``.

    ``val_views``: rows of the augmented views of ``val`` (one array per view); their probabilities
    under the head fitted on ``train`` (before the refit) go to ``Selection.val_view_probas``, for the
    test-time augmentation choice.
    """
    from ..heads import estimator_proba
    from ..report import compute_metrics

    k = len(cache.classes)
    est, htype = make_head(spec, seed)
    Xtr, ytr = source(train), cache.labels[np.sort(train)]
    has_val = len(val) > 0
    Xv, yv = (source(val), cache.labels[np.sort(val)]) if has_val else (None, None)
    chosen: dict[str, Any] = {}
    sweep: list[dict[str, Any]] = []
    val_proba = None
    if htype == "linear":
        if has_val and "C" not in spec.params:
            C, sweep, sols = _sweep_linear(est, Xtr, ytr, Xv, yv, k, spec.class_weight == "balanced",
                                           spec.grid or COARSE_GRID)
            est.set_params(C=C, warm_start=False)
            est.set_solution(*sols[C])
        else:
            C = float(spec.params.get("C", est.C))
            est.set_params(C=C).fit(Xtr, ytr)
        chosen = {"C": C}
        if has_val:
            val_proba = estimator_proba(est, Xv, k)
    elif htype == "mlp":
        if has_val:
            est.fit(Xtr, ytr, eval_set=(Xv, yv))
            chosen = {"epochs": int(est.best_epoch_), "best_val_loss": float(est.best_val_loss_)}
            val_proba = estimator_proba(est, Xv, k)
        else:
            est.fit(Xtr, ytr)
            chosen = {"epochs": int(est.n_epochs_)}
    elif has_val and "C" in est[-1].get_params() and "C" not in spec.params:
        est, chosen, sweep, val_proba = _sweep_sklearn(est, Xtr.to_array(), ytr, Xv.X, yv, k, spec)
    else:
        _fit_sklearn(est, Xtr.to_array(), ytr, spec.class_weight)
        if has_val:
            val_proba = estimator_proba(est, Xv.X, k)
    val_metrics = compute_metrics(yv, val_proba, cache.classes) if val_proba is not None else {}
    view_probas = []
    if val_proba is not None:
        for rows in val_views:
            Xw = source(rows)
            view_probas.append(estimator_proba(est, Xw.X if htype == "sklearn" else Xw, k))
    if len(refit_rows) != len(train) or not np.array_equal(np.sort(refit_rows), np.sort(train)):
        _refit(est, htype, chosen, source(refit_rows), cache.labels[np.sort(refit_rows)], spec.class_weight)
    return Selection(est, htype, chosen, sweep, val_metrics, val_proba, view_probas)


def _sweep_sklearn(est: Any, Xtr: np.ndarray, ytr: np.ndarray, Xv: np.ndarray, yv: np.ndarray, k: int,
                   spec: HeadSpec) -> tuple[Any, dict[str, Any], list[dict[str, Any]], np.ndarray]:
    """C of a scikit-learn head chosen on validation: the coarse grid, then half a decade either side of the best.

    Ties go to the smaller C (the stronger regularisation). Returns the estimator fitted on the
    training rows at the chosen C, the choice, the sweep and the validation probabilities.
    """
    import copy

    balanced = spec.class_weight == "balanced"
    step = est.steps[-1][0]
    fits: dict[float, tuple[float, float]] = {}  # C -> (val score, val log loss)
    kept: dict[str, Any] = {}  # the best fit so far: only it is copied, not one estimator per C

    def best() -> float:
        return max(fits, key=lambda c: (round(fits[c][0], 12), -c))

    def fit_at(C: float) -> None:
        if not any(np.isclose(C, c, rtol=1e-6) for c in fits):
            _fit_sklearn(est.set_params(**{f"{step}__C": C}), Xtr, ytr, spec.class_weight)
            score, loss, proba = _val_score(est, Xv, yv, k, balanced)
            fits[C] = (score, loss)
            if best() == C:
                kept.update(est=copy.deepcopy(est), proba=proba)

    for C in spec.grid or SKLEARN_C_GRID:
        fit_at(float(C))
    top = best()
    for d in _REFINE:
        fit_at(float(top * 10 ** d))
    sweep = [{"C": c, "val_score": fits[c][0], "val_log_loss": fits[c][1]} for c in sorted(fits)]
    return kept["est"], {"C": best()}, sweep, kept["proba"]


def _refit(est: Any, htype: str, chosen: dict[str, Any], X: Any, y: np.ndarray, class_weight: Any) -> None:
    """Refit with the chosen setting (train+val): warm-started L-BFGS, or the MLP for its best epochs."""
    if htype == "linear":
        est.set_params(warm_start=True)
        est.fit(X, y)
        est.set_params(warm_start=False)
    elif htype == "mlp":
        est.set_params(max_epochs=max(1, chosen["epochs"]), early_stopping=False)
        est.fit(X, y)
    else:
        _fit_sklearn(est, X.to_array(), y, class_weight)
