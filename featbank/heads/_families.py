"""Head families: what ``fit --auto`` sweeps, scored by K-fold cross-validation with shared work.

A :class:`HeadFamily` is a kind of head (``linear``, ``svm-rbf``, ``svm-linear``, ``knn``, ``mlp``)
with a default hyperparameter grid, a cross-validated score for every grid point that shares the
expensive work across the grid (a warm-started C path for ``linear``; one Gram matrix per fold for
the SVMs and ``knn``, shared across those families through a :class:`~featbank.heads.FoldKernels`
when the caller passes one), an unfitted estimator for any grid point that
featbank's bundles save and its ONNX export converts, and a rough cost for planning a time budget.

Preprocessing (``preprocess``, :mod:`featbank.heads._preprocess`): ``"standardize"`` (each feature
centred and scaled with the fit rows' mean and standard deviation), ``"l2"`` (centred on the fit
rows' mean, then each row L2-normalised) or ``"sqrt"`` (the signed square root of each entry, then
standardised). Each is fitted on a fold's fit rows only, and is part of the estimator ``build``
gives. A family lists the preprocessings it supports in ``preprocesses``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ConfigError
from ._estimator import Estimator, pipeline_steps
from ._features import Features
from ._gram import FoldGram, FoldKernels, fold_gram, fold_rows
from ._kernel_svc import KernelSVC, gamma_of, rbf_from_gram
from ._linear_head import LinearHead
from ._mlp_head import MLPHead
from ._preprocess import PREPROCESSES, prep_steps

__all__ = ["Folds", "HeadFamily", "HEAD_FAMILIES", "PREPROCESSES", "get_head_family", "LinearFamily", "SVMFamily", "KNNFamily",
           "MLPFamily", "family_mismatch", "searched_as_spec"]

#: ``(fit_rows, held_out_rows)`` per fold: integer index arrays into ``X``.
Folds = Sequence[tuple[np.ndarray, np.ndarray]]


@runtime_checkable
class HeadFamily(Protocol):
    """A kind of head that ``fit --auto`` can sweep and deploy.

    Attributes:
        name: ``"linear"``, ``"svm-rbf"``, ``"svm-linear"``, ``"knn"`` or ``"mlp"``.
        preprocesses: the values of ``preprocess`` it supports (a subset of :data:`PREPROCESSES`).
        exportable: whether every estimator ``build`` gives exports to ONNX with the parity check;
            ``reason`` says why not when it is ``False``.
        when_budget_allows (optional, ``False`` when absent): ``fit --auto`` tries the family's
            candidates on round 1 only after every other candidate was scored or skipped (the MLP).
        holds_gram (optional, ``False`` when absent): its fits hold an n x n kernel of their rows in
            memory (the SVMs), so ``fit --auto`` leaves it out where that is over the memory bound.

    A family that works from a fold's Gram matrix (``svm-rbf``, ``svm-linear``, ``knn``) also has
    ``kernel_cost(n_samples, n_features)`` (the matrix's part of ``relative_cost``) and takes a
    ``kernels=`` :class:`~featbank.heads.FoldKernels` in ``cv_scores`` to share it with the others.
    """

    name: str
    preprocesses: tuple[str, ...]
    exportable: bool
    reason: str

    def default_grid(self, n_samples: int, n_features: int, n_classes: int) -> list[dict[str, Any]]:
        """The hyperparameter settings the family sweeps."""
        ...

    def cv_scores(self, X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict[str, Any]], *,
                  preprocess: str = "standardize", device: str = "cpu") -> np.ndarray:
        """(len(grid), len(folds)) top-1 accuracy on each fold's held-out rows."""
        ...

    def build(self, params: dict[str, Any], *, preprocess: str = "standardize", seed: int = 0,
              device: str = "cpu") -> Any:
        """An unfitted estimator for one grid point (preprocessing included); ``device`` for its fit."""
        ...

    def relative_cost(self, n_samples: int, n_features: int, n_grid: int) -> float:
        """Rough seconds per fold for the whole grid on this machine's CPU."""
        ...


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _check_inputs(family: HeadFamily, X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict[str, Any]],
                  preprocess: str) -> tuple[np.ndarray, np.ndarray]:
    _check_preprocess(family, preprocess)
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or len(X) != len(y):
        raise ConfigError(f"cv_scores needs an (N, D) X and N labels; got X {X.shape} and y {y.shape}.")
    if not grid:
        raise ConfigError(f"The {family.name} head family was given an empty grid.")
    for i, (fit, held) in enumerate(folds):
        if len(fit) == 0 or len(held) == 0:
            raise ConfigError(f"Fold {i} has {len(fit)} fit rows and {len(held)} held-out rows; both must be > 0.")
    return X, y


def _pipeline(preprocess: str, clf: Any) -> Any:
    from sklearn.pipeline import Pipeline

    return Pipeline([*prep_steps(preprocess), ("clf", clf)])


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(y)))


# --------------------------------------------------------------------------------------------
# linear: featbank's LinearHead, a warm-started C path per fold
# --------------------------------------------------------------------------------------------

#: C grid of the linear family (LinearHead's, i.e. scikit-learn's multinomial convention).
LINEAR_C_GRID = tuple(float(c) for c in np.logspace(-6, 2, 9))
#: The path's fits only rank C values: they stop early, like fit's validation sweep; the refit is exact.
_PATH_MAX_ITER = 150
_PATH_TOL = 1e-3


class LinearFamily:
    """Multinomial logistic regression (:class:`LinearHead`, L-BFGS) over a grid of C.

    ``cv_scores`` fits the grid in increasing C on each fold, each fit warm-started from the one
    before and stopped at a loose tolerance (as ``fit``'s validation sweep does); the features are
    standardised once per fold. ``build`` gives a ``LinearHead`` at the exact tolerance, which
    featbank saves as safetensors and exports as one linear layer.

    Only ``preprocess="standardize"`` (LinearHead's own standardisation): LinearHead has no
    centring before its L2 normalisation, so ``"l2"`` (centre, then L2) is not offered.
    """

    name = "linear"
    preprocesses: tuple[str, ...] = ("standardize",)
    exportable = True
    reason = ""

    def default_grid(self, n_samples: int, n_features: int, n_classes: int) -> list[dict[str, Any]]:
        """C = 1e-6, 1e-5, ..., 1e2 (fit's coarse grid)."""
        return [{"C": c} for c in LINEAR_C_GRID]

    def build(self, params: dict[str, Any], *, preprocess: str = "standardize", seed: int = 0,
              device: str = "cpu") -> LinearHead:
        from ._torch_head import validate_head_params

        _check_params(self.name, params, {"C"})
        _check_preprocess(self, preprocess)
        head = LinearHead(C=params["C"], standardize=True, device=device)
        validate_head_params(head)
        return head

    def cv_scores(self, X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict[str, Any]], *,
                  preprocess: str = "standardize", device: str = "cpu") -> np.ndarray:
        X, y = _check_inputs(self, X, y, folds, grid, preprocess)
        Cs = np.array([float(self.build(p).C) for p in grid])  # every setting checked before any work
        out = np.zeros((len(grid), len(folds)))
        for j, (fit, held) in enumerate(folds):
            out[:, j] = self._path(X, y, np.asarray(fit), np.asarray(held), Cs, device)
        return out

    def _path(self, X: np.ndarray, y: np.ndarray, fit: np.ndarray, held: np.ndarray, Cs: np.ndarray,
              device: str) -> np.ndarray:
        """Held-out top-1 of every C on one fold: increasing C, each fit warm-started from the last."""
        feats = Features(X[fit])  # one object: LinearHead keeps its standardised copy across the path
        head = LinearHead(standardize=True, max_iter=_PATH_MAX_ITER, tol=_PATH_TOL, device=device)
        scores = np.zeros(len(Cs))
        done = False
        for i in np.argsort(Cs, kind="stable"):
            head.set_params(C=float(Cs[i]), warm_start=done)
            head.fit(feats, y[fit])
            done = True
            scores[i] = _accuracy(head.predict(X[held]), y[held])
        return scores

    def relative_cost(self, n_samples: int, n_features: int, n_grid: int) -> float:
        """~40 L-BFGS steps per C, each two (n x d) products at ~2 GFLOP/s plus ~1 ms of overhead: crude,
        from fit's benchmarks (digits, 1,197 x 64, 9 C: 0.3 s per fold measured, 0.4 s estimated)."""
        return n_grid * 40 * (4.0 * n_samples * n_features / 2e9 + 1e-3)


def _check_params(family: str, params: dict[str, Any], keys: set[str]) -> None:
    if not isinstance(params, dict) or set(params) != keys:
        got = sorted(params) if isinstance(params, dict) else repr(params)
        raise ConfigError(f"The {family} head family takes parameters {sorted(keys)}; got {got}.")


# --------------------------------------------------------------------------------------------
# svm-rbf, svm-linear: one Gram matrix per fold for every C (and every RBF width)
# --------------------------------------------------------------------------------------------

#: C grid of the RBF SVM: half decades around scikit-learn's default 1.
RBF_C_GRID = tuple(float(c) for c in np.logspace(-1, 2, 7))
#: RBF widths: multiples of scikit-learn's ``gamma="scale"`` (1 / (n_features * variance)).
RBF_GAMMA_SCALES = (0.5, 1.0, 2.0)
#: C grid of the linear SVM (decades: on wide embeddings the classes are often separable, so
#: only small C regularise).
LINEAR_SVM_C_GRID = tuple(float(c) for c in np.logspace(-5, 1, 7))


class SVMFamily:
    """Kernel SVM (scikit-learn's libsvm ``SVC``, one-vs-one) with an RBF or a linear kernel.

    ``cv_scores`` computes per fold one Gram matrix of the preprocessed rows with BLAS (numpy; torch
    on CUDA) and fits ``SVC(kernel="precomputed")`` on it for every C, one thread per core; RBF
    kernels of every width come from the same Gram matrix and squared norms. ``build`` gives a ``Pipeline`` of the
    preprocessing and a :class:`KernelSVC`, which fits the same way and then predicts as
    ``SVC(kernel="rbf" | "linear")``; featbank saves it as skops and exports it as one graph (the
    kernel against the support vectors, the one-vs-one votes, the softmax of scikit-learn's
    one-vs-rest decision function).
    """

    preprocesses: tuple[str, ...] = PREPROCESSES
    exportable = True
    reason = ""
    holds_gram = True  # libsvm fits on the precomputed n x n kernel (kNN's own search is chunked: it does not)

    def __init__(self, kernel: str):
        self.kernel = kernel
        self.name = f"svm-{kernel}"
        self._keys = {"C", "gamma_scale"} if kernel == "rbf" else {"C"}

    def default_grid(self, n_samples: int, n_features: int, n_classes: int) -> list[dict[str, Any]]:
        """RBF: C = 0.1 .. 100 (half decades) x gamma_scale 0.5, 1, 2; linear: C = 1e-5 .. 10 (decades)."""
        if self.kernel == "rbf":
            return [{"C": c, "gamma_scale": g} for g in RBF_GAMMA_SCALES for c in RBF_C_GRID]
        return [{"C": c} for c in LINEAR_SVM_C_GRID]

    def build(self, params: dict[str, Any], *, preprocess: str = "standardize", seed: int = 0,
              device: str = "cpu") -> Any:
        _check_params(self.name, params, self._keys)
        _check_preprocess(self, preprocess)
        clf = KernelSVC(C=params["C"], kernel=self.kernel, gamma_scale=params.get("gamma_scale", 1.0),
                        random_state=seed, device=device)
        clf._check_own_params()
        return _pipeline(preprocess, clf)

    def cv_scores(self, X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict[str, Any]], *,
                  preprocess: str = "standardize", device: str = "cpu",
                  kernels: FoldKernels | None = None) -> np.ndarray:
        """(len(grid), len(folds)) held-out top-1; with ``kernels``, each fold's Gram matrix comes from
        (and goes into) that shared store, else it is computed here."""
        X, y = _check_inputs(self, X, y, folds, grid, preprocess)
        for p in grid:
            self.build(p, preprocess=preprocess)  # every setting checked before any work
        out = np.zeros((len(grid), len(folds)))
        for j, (fit, held) in enumerate(folds):
            fit, held = np.asarray(fit), np.asarray(held)
            fg = kernels.get(X, fit, held, preprocess, device) if kernels is not None else None
            if fg is None:
                fg = fold_gram(*fold_rows(X, fit, held, preprocess), device)
            out[:, j] = self._fold(fg, y[fit], y[held], grid)
        return out

    def _fold(self, fg: FoldGram, y_fit: np.ndarray, y_held: np.ndarray, grid: list[dict[str, Any]]) -> np.ndarray:
        """Held-out top-1 of every setting on one fold, from its Gram matrix (the fit block as
        KernelSVC.fit multiplies it: same shapes, same BLAS call, same numbers; summed from column
        blocks under ``fit --auto``, the same to rounding, see :mod:`featbank.heads._gram`)."""
        G_ff, G_hf = fg.G_ff, fg.G_hf
        scores = np.zeros(len(grid))
        widths = sorted({float(p.get("gamma_scale", 1.0)) for p in grid})
        for w in widths:
            if self.kernel == "rbf":
                gamma = gamma_of(fg.var_f, fg.n_features, w)  # scale_gamma of the fit rows
                sf, sh = fg.sq_f, fg.sq_h
                K_ff, K_hf = rbf_from_gram(G_ff, sf, sf, gamma), rbf_from_gram(G_hf, sh, sf, gamma)
            else:
                K_ff, K_hf = G_ff, G_hf
            todo = [i for i, p in enumerate(grid) if float(p.get("gamma_scale", 1.0)) == w]
            # libsvm runs without the GIL: the settings of one kernel fit side by side, one per core.
            with ThreadPoolExecutor(max_workers=_n_workers(len(todo))) as pool:
                Cs = [float(grid[i]["C"]) for i in todo]
                n = len(todo)
                done = pool.map(_svc_score, [K_ff] * n, [y_fit] * n, [K_hf] * n, [y_held] * n, Cs)
                for i, score in zip(todo, done, strict=True):
                    scores[i] = score
        return scores

    def relative_cost(self, n_samples: int, n_features: int, n_grid: int) -> float:
        """One Gram matrix (:meth:`kernel_cost`) plus one libsvm fit on the kernel per setting (~2e-8 s
        per kernel entry, measured on digits and random 2,000-row kernels)."""
        return self.kernel_cost(n_samples, n_features) + n_grid * 2e-8 * n_samples**2

    def kernel_cost(self, n_samples: int, n_features: int) -> float:
        """The part of :meth:`relative_cost` a shared Gram matrix saves: 2 n^2 d flops at ~10 GFLOP/s
        in float64 on 2 busy cores."""
        return 2.0 * n_samples**2 * n_features / 1e10


def _n_workers(n_tasks: int) -> int:
    """Threads for ``n_tasks`` independent libsvm fits: the cores this process may use, at most."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(n_tasks, cores))


def _svc_score(K_ff: np.ndarray, y_fit: np.ndarray, K_hf: np.ndarray, y_held: np.ndarray, C: float) -> float:
    """Held-out top-1 of ``SVC(kernel="precomputed", C)``, scored as featbank scores (argmax of estimator_proba)."""
    from sklearn.svm import SVC

    from ._sklearn import estimator_proba

    svc = SVC(C=C, kernel="precomputed").fit(K_ff, y_fit)
    return _accuracy(svc.classes_[estimator_proba(svc, K_hf).argmax(1)], y_held)


def _check_preprocess(family: HeadFamily, preprocess: str) -> None:
    if preprocess not in family.preprocesses:
        raise ConfigError(
            f"The {family.name} head family has no preprocessing {preprocess!r}; it supports "
            f"{', '.join(map(repr, family.preprocesses))}."
        )


# --------------------------------------------------------------------------------------------
# knn: one neighbour search per fold for every k
# --------------------------------------------------------------------------------------------

#: Neighbour counts of the kNN family (those above the fold's fit rows are dropped).
KNN_K_GRID = (1, 3, 5, 10, 20, 50)


class KNNFamily:
    """k nearest neighbours (scikit-learn's ``KNeighborsClassifier``, Euclidean, uniform votes).

    With ``preprocess="l2"`` (centre, then L2-normalise) the Euclidean ranking is the cosine ranking.
    ``cv_scores`` finds each held-out row's ``max(k)`` nearest fit rows once per fold (one
    distance matrix, scikit-learn's brute-force search) and votes over the first k for every k;
    ties go to the lowest class, as ``KNeighborsClassifier.predict_proba``'s argmax does.
    ``build`` gives the ``Pipeline`` (brute force), which featbank saves as skops and exports
    through skl2onnx.
    """

    name = "knn"
    preprocesses: tuple[str, ...] = PREPROCESSES
    exportable = True
    reason = ""

    def default_grid(self, n_samples: int, n_features: int, n_classes: int) -> list[dict[str, Any]]:
        """k = 1, 3, 5, 10, 20, 50, those at most half the rows (a fold fits on at least half)."""
        return [{"k": k} for k in KNN_K_GRID if k <= max(1, n_samples // 2)]

    def build(self, params: dict[str, Any], *, preprocess: str = "standardize", seed: int = 0,
              device: str = "cpu") -> Any:
        from sklearn.neighbors import KNeighborsClassifier

        _check_params(self.name, params, {"k"})
        _check_preprocess(self, preprocess)
        k = params["k"]
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"The knn head family's 'k' must be an int >= 1. Got {k!r} instead.")
        return _pipeline(preprocess, KNeighborsClassifier(n_neighbors=int(k), algorithm="brute"))

    def cv_scores(self, X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict[str, Any]], *,
                  preprocess: str = "standardize", device: str = "cpu",
                  kernels: FoldKernels | None = None) -> np.ndarray:
        """(len(grid), len(folds)) held-out top-1; with ``kernels``, each fold's neighbours are ranked by
        the squared distances of that shared store's Gram matrix, else by scikit-learn's search."""
        X, y = _check_inputs(self, X, y, folds, grid, preprocess)
        ks = [int(self.build(p, preprocess=preprocess)[-1].n_neighbors) for p in grid]
        smallest = min(len(f) for f, _ in folds)
        if max(ks) > smallest:
            raise ConfigError(f"The knn grid asks for k = {max(ks)} neighbours but a fold fits on {smallest} rows; "
                              "drop the larger k.")
        out = np.zeros((len(grid), len(folds)))
        for j, (fit, held) in enumerate(folds):
            fit, held = np.asarray(fit), np.asarray(held)
            fg = kernels.get(X, fit, held, preprocess, device) if kernels is not None else None
            order = _neighbours(X, fit, held, preprocess, max(ks), fg)
            classes, codes = np.unique(y[fit], return_inverse=True)
            votes = codes[order]
            for i, k in enumerate(ks):
                counts = np.zeros((len(held), len(classes)), np.int64)
                np.add.at(counts, (np.arange(len(held))[:, None], votes[:, :k]), 1)
                out[i, j] = _accuracy(classes[counts.argmax(1)], y[held])
        return out

    def relative_cost(self, n_samples: int, n_features: int, n_grid: int) -> float:
        """One distance matrix (:meth:`kernel_cost`); the votes are ~free (a sort of each row's distances)."""
        return self.kernel_cost(n_samples, n_features) + 1e-8 * n_samples**2

    def kernel_cost(self, n_samples: int, n_features: int) -> float:
        """2 n^2 d flops at ~10 GFLOP/s: what a shared Gram matrix saves."""
        return 2.0 * n_samples**2 * n_features / 1e10


def _neighbours(X: np.ndarray, fit: np.ndarray, held: np.ndarray, preprocess: str, k: int,
                fg: FoldGram | None) -> np.ndarray:
    """The ``k`` nearest fit rows of each held-out row, nearest first: from the fold's shared Gram
    matrix when there is one, else scikit-learn's brute-force search."""
    if fg is not None:
        d2 = fg.sq_distances()
        if k >= d2.shape[1]:
            return np.argsort(d2, axis=1, kind="stable")
        near = np.argpartition(d2, k - 1, axis=1)[:, :k]
        rows = np.arange(len(d2))[:, None]
        return near[rows, np.argsort(d2[rows, near], axis=1, kind="stable")]
    from sklearn.neighbors import NearestNeighbors

    Xf, Xh = fold_rows(X, fit, held, preprocess)
    return NearestNeighbors(n_neighbors=k, algorithm="brute").fit(Xf).kneighbors(Xh, return_distance=False)


# --------------------------------------------------------------------------------------------
# mlp: featbank's MLPHead, one training per setting and fold
# --------------------------------------------------------------------------------------------

#: The MLP settings swept: a narrow and a wide hidden layer, light and strong regularisation.
MLP_GRID = (
    {"hidden_sizes": 256, "dropout": 0.2, "weight_decay": 1e-4},
    {"hidden_sizes": 1024, "dropout": 0.5, "weight_decay": 1e-4},
    {"hidden_sizes": 1024, "dropout": 0.5, "weight_decay": 1e-2},
)


class MLPFamily:
    """A one-hidden-layer MLP (:class:`MLPHead`: AdamW, early stopping on 10% of the fit rows).

    The expensive family: ``cv_scores`` trains one MLP per setting and fold (no work is shared).
    Training is seeded (``seed`` 0 in ``cv_scores``, as ``build``'s default), so a score is what
    ``build(params)`` fitted on the fold scores. ``build`` gives an ``MLPHead`` with its own
    standardisation, which featbank saves as safetensors and exports as a torch graph. Only
    ``preprocess="standardize"`` (MLPHead cannot centre before an L2 normalisation).
    """

    name = "mlp"
    preprocesses: tuple[str, ...] = ("standardize",)
    exportable = True
    reason = ""
    #: tried last on round 1: it shares no work across settings or folds, and its 5-fold CV trailed the best
    #: family by 1.7-5 points on ELPV 4-class (0.75-0.78 vs 0.80), digits (0.97 vs 0.987) and lfw_subset (0.98 vs 1.0)
    when_budget_allows = True

    def default_grid(self, n_samples: int, n_features: int, n_classes: int) -> list[dict[str, Any]]:
        """Hidden 256 (dropout 0.2, weight decay 1e-4); hidden 1024 (dropout 0.5, weight decay 1e-4 and 1e-2)."""
        return [dict(p) for p in MLP_GRID]

    def build(self, params: dict[str, Any], *, preprocess: str = "standardize", seed: int = 0,
              device: str = "cpu") -> MLPHead:
        from ._torch_head import validate_head_params

        _check_params(self.name, params, {"hidden_sizes", "dropout", "weight_decay"})
        _check_preprocess(self, preprocess)
        h = params["hidden_sizes"]
        head = MLPHead(hidden_sizes=tuple(h) if isinstance(h, list) else h, dropout=params["dropout"],
                       weight_decay=params["weight_decay"], early_stopping=True, standardize=True,
                       random_state=seed, device=device)
        validate_head_params(head)
        return head

    def cv_scores(self, X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict[str, Any]], *,
                  preprocess: str = "standardize", device: str = "cpu") -> np.ndarray:
        X, y = _check_inputs(self, X, y, folds, grid, preprocess)
        heads = [self.build(p, preprocess=preprocess, device=device) for p in grid]
        out = np.zeros((len(grid), len(folds)))
        for j, (fit, held) in enumerate(folds):
            for i, head in enumerate(heads):
                head.fit(X[fit], y[fit])
                out[i, j] = _accuracy(head.predict(X[held]), y[held])
        return out

    def relative_cost(self, n_samples: int, n_features: int, n_grid: int) -> float:
        """~20 epochs (early stopping, patience 10) of forward + backward (6 flops per weight and row)
        through the grid's mean hidden width (768) at ~100 GFLOP/s (float32 BLAS, 2 cores), plus ~10 ms
        per minibatch of 256. Measured on one fold of the 3 settings (7 Dec 2026, 2 cores), against this
        estimate: ELPV 4-class ``all`` pooled (1,469 x 13,280) 55 s / 59 s; ``final`` plain (1,469 x
        1,280) 3.2 s / 9.8 s; digits ``all`` pooled (1,005 x 13,280) 23 s / 41 s; lfw ``final`` plain
        (112 x 1,280) 2.1 s / 1.8 s. (The estimate before assumed 60 epochs at 5 GFLOP/s: 50-140x too
        high, so no default budget ever scored an MLP.)"""
        hidden = float(np.mean([p["hidden_sizes"] for p in MLP_GRID]))
        per_epoch = 6.0 * n_samples * n_features * hidden / 1e11 + (n_samples / 256 + 2) * 0.01
        return n_grid * _MLP_EPOCHS * per_epoch


#: Epochs an MLP fit takes with early stopping, for :meth:`MLPFamily.relative_cost`.
_MLP_EPOCHS = 20


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

#: Every head family by name.
HEAD_FAMILIES: dict[str, HeadFamily] = {
    f.name: f for f in (LinearFamily(), SVMFamily("rbf"), SVMFamily("linear"), KNNFamily(), MLPFamily())
}


def get_head_family(name: str) -> HeadFamily:
    """The family called ``name``.

    Raises:
        ConfigError: no such family (the message names the valid ones).
    """
    try:
        return HEAD_FAMILIES[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"Unknown head family {name!r}; the head families are {', '.join(map(repr, HEAD_FAMILIES))}."
        ) from None


#: Parameters a family's ``build`` sets that do not change what the head computes once fitted.
_FREE_PARAMS = frozenset({"random_state", "device", "verbose", "n_jobs", "copy"})


def searched_as_spec(head: str, has_params: bool, *, auto: bool = False, families: Any = None) -> bool:
    """Whether a search runs ``head`` as one spec (``fit --cv`` of a ``--head`` given ``--param`` values, or of
    a head that is not a family of ``families``, :data:`HEAD_FAMILIES` by default) rather than as its family's
    grid. ``--auto`` searches families. The one rule for the search (``fitting``) and the bundle's check of
    the head it saved (:func:`family_mismatch`'s ``spec``)."""
    return not auto and (has_params or head not in (HEAD_FAMILIES if families is None else families))


def family_mismatch(est: Estimator, family: str, params: dict[str, Any], preprocess: str, *, spec: bool = False) -> str | None:
    """Why the fitted ``est`` is not the head a search says it chose, or None.

    A family of :data:`HEAD_FAMILIES` (``spec=False``): ``est`` must be what
    ``build(params, preprocess=...)`` fits: steps of the same classes, in order, with the same
    constructor parameters (those of :data:`_FREE_PARAMS` aside). One ``--head`` searched by
    ``fit --cv`` (``spec=True``; ``family`` is the ``--head``, ``params`` its setting): the classifier
    must be of that head (its kind's name or its class's) and have every one of ``params``.
    """
    if spec:
        return _spec_mismatch(pipeline_steps(est)[-1], family, params)
    try:
        built = get_head_family(family).build(dict(params), preprocess=preprocess)
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        return f"family {family!r} builds no head from parameters {params!r} and preprocessing {preprocess!r} ({e})"
    want, have = pipeline_steps(built), pipeline_steps(est)
    if [type(w) for w in want] != [type(h) for h in have]:
        return (f"family {family!r} with preprocessing {preprocess!r} builds "
                f"{[type(w).__name__ for w in want]}, but the head is {[type(h).__name__ for h in have]}")
    for w, h in zip(want, have, strict=True):
        why = _params_mismatch(h, {k: v for k, v in w.get_params(deep=False).items() if k not in _FREE_PARAMS})
        if why is not None:
            return why
    return None


def _spec_mismatch(clf: Any, head: str, params: dict[str, Any]) -> str | None:
    from .kinds import kind_of

    try:
        names = {type(clf).__name__, kind_of(clf).name}
    except ConfigError:
        names = {type(clf).__name__}
    if head not in names:
        return f"the head is a {type(clf).__name__}, not a {head!r}"
    return _params_mismatch(clf, params)


def _params_mismatch(step: Any, want: dict[str, Any]) -> str | None:
    have = step.get_params(deep=False)
    for key, value in want.items():
        if not _same(have.get(key, _MISSING), value):
            return f"the head's {type(step).__name__} has {key}={have.get(key, '(none)')!r}, not {value!r}"
    return None


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b))) if isinstance(a, (list, tuple, np.ndarray)) else bool(a == b)
    except (TypeError, ValueError):
        return False
