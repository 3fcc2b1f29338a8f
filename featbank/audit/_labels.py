"""Likely label errors: out-of-fold probabilities from featbank's LinearHead, then confident learning.

Confident learning (Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty in
Dataset Labels", JAIR 70, 2021), implemented here from the paper:

1. per-class thresholds ``t_j`` = the mean out-of-fold probability of class ``j`` over the
   examples labelled ``j``;
2. the confident joint ``C[i][j]`` counts the examples labelled ``i`` whose probability of ``j`` is
   at least ``t_j`` (the most probable such ``j`` when several are);
3. ``prune_by_noise_rate`` (the paper's Cleanlab default): calibrate ``C`` so each row sums to the
   number of examples labelled ``i``, and flag, for every off-diagonal ``(i, j)``, the
   ``round(C[i][j])`` examples labelled ``i`` with the largest margin ``p_j - p_i``;
   ``confident_joint``: flag the examples that fall off the diagonal of ``C``.

An example whose most probable class is its given label is never flagged. Flagged examples are
ranked by self-confidence (the probability of the given label), lowest first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = ["LabelIssues", "out_of_fold_proba", "find_label_issues", "confident_joint", "METHODS", "C_GRID"]

METHODS = ("prune_by_noise_rate", "confident_joint")
#: C values of the LinearHead tried on the first fold (the one with the lowest held-out log loss is used).
C_GRID = (0.001, 0.01, 0.1, 1.0)

#: Fits a probe on rows (positions into the labelled rows) and returns probabilities of other rows.
FoldFitter = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


@dataclass
class LabelIssues:
    """Per labelled example (positions into the arrays given): ``flagged`` (bool), ``suggested``
    (class index), ``self_confidence`` (probability of the given label), ``margin`` (normalised
    margin: p_given - max other p; negative = another class is more probable); ``thresholds``
    ``t_j``; ``joint`` the confident joint; ``order`` the flagged positions, most suspect first."""

    flagged: np.ndarray
    suggested: np.ndarray
    self_confidence: np.ndarray
    margin: np.ndarray
    thresholds: np.ndarray
    joint: np.ndarray
    order: np.ndarray


def stratified_folds(y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold number of each example, stratified by class (every class spread over the folds)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    offset = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + offset) % n_folds
        offset += len(idx)
    return fold


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))


def out_of_fold_proba(fit_predict: FoldFitter, y: np.ndarray, n_classes: int, *, n_folds: int = 5, seed: int = 0,
                      c_grid: tuple[float, ...] = C_GRID) -> tuple[np.ndarray, float]:
    """Out-of-fold class probabilities of every example and the C used.

    ``fit_predict(train_pos, test_pos, C)`` fits a probe on ``train_pos`` and returns the (len(test_pos),
    n_classes) probabilities of ``test_pos``. C is chosen on the first fold by held-out log loss;
    folds are stratified by class and each example (with all of its rows) lies in exactly one.
    """
    counts = np.bincount(y, minlength=n_classes)
    if n_folds < 2 or (counts[counts > 0] < n_folds).any():
        raise ConfigError(f"{n_folds}-fold probabilities need at least {n_folds} examples of each class; the smallest "
                          f"class has {int(counts[counts > 0].min())}. Use fewer folds (--folds).")
    fold = stratified_folds(y, n_folds, seed)
    tr, te = np.flatnonzero(fold != 0), np.flatnonzero(fold == 0)
    losses = {c: _log_loss(fit_predict(tr, te, c), y[te]) for c in c_grid}
    best_c = min(c_grid, key=lambda c: (losses[c], c))
    proba = np.zeros((len(y), n_classes), np.float64)
    for f in range(n_folds):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        proba[te] = fit_predict(tr, te, best_c)
    return proba, best_c


def confident_joint(labels: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds t_j, confident joint C (K x K), confident class per example or -1)."""
    k = proba.shape[1]
    thresholds = np.array([proba[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])
    above = proba >= thresholds[None, :] - 1e-12
    masked = np.where(above, proba, -np.inf)
    confident = np.where(above.any(axis=1), masked.argmax(axis=1), -1)
    joint = np.zeros((k, k), np.int64)
    ok = confident >= 0
    np.add.at(joint, (labels[ok], confident[ok]), 1)
    return thresholds, joint, confident


def _prune_by_noise_rate(labels: np.ndarray, proba: np.ndarray, joint: np.ndarray) -> np.ndarray:
    k = proba.shape[1]
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    row = joint.sum(axis=1).astype(np.float64)
    calibrated = joint / np.maximum(row, 1)[:, None] * counts[:, None]
    flagged = np.zeros(len(labels), bool)
    for i in range(k):
        members = np.flatnonzero(labels == i)
        for j in range(k):
            n_remove = int(round(calibrated[i, j])) if i != j else 0
            n_remove = min(n_remove, max(0, len(members) - 1))
            if n_remove <= 0:
                continue
            margin = proba[members, j] - proba[members, i]
            flagged[members[np.argsort(-margin, kind="stable")[:n_remove]]] = True
    return flagged


def find_label_issues(labels: np.ndarray, proba: np.ndarray, method: str = "prune_by_noise_rate") -> LabelIssues:
    """Confident learning on out-of-fold probabilities (see the module docstring)."""
    if method not in METHODS:
        raise ConfigError(f"The 'method' parameter must be one of {METHODS}. Got {method!r} instead.")
    labels = np.asarray(labels, np.int64)
    thresholds, joint, confident = confident_joint(labels, proba)
    if method == "confident_joint":
        flagged = (confident >= 0) & (confident != labels)
    else:
        flagged = _prune_by_noise_rate(labels, proba, joint)
    predicted = proba.argmax(axis=1)
    flagged &= predicted != labels
    n = np.arange(len(labels))
    self_conf = proba[n, labels]
    others = proba.copy()
    others[n, labels] = -np.inf
    margin = self_conf - others.max(axis=1)
    suggested = np.where(confident >= 0, confident, predicted)
    suggested = np.where(suggested == labels, others.argmax(axis=1), suggested)
    pos = np.flatnonzero(flagged)
    order = pos[np.lexsort((pos, margin[pos], self_conf[pos]))]
    return LabelIssues(flagged=flagged, suggested=suggested, self_confidence=self_conf, margin=margin,
                       thresholds=thresholds, joint=joint, order=order)
