"""Head families for ``fit --auto``: cross-validated scores with shared work, estimators that deploy."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold

from featbank.errors import ConfigError
from featbank.heads import HEAD_FAMILIES, HeadFamily, estimator_proba, get_head_family


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """400 digits (8x8 images as 64 features), 4 classes, 3 stratified folds."""
    X, y = load_digits(n_class=4, return_X_y=True)
    X, y = X[:400].astype(np.float32), y[:400]
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    return X, y, folds


def _fold_score(est, X: np.ndarray, y: np.ndarray, fit: np.ndarray, held: np.ndarray) -> float:
    """Fit on the fold's rows and score top-1 as featbank does (argmax of estimator_proba)."""
    est.fit(X[fit], y[fit])
    return float(np.mean(estimator_proba(est, X[held]).argmax(1) == y[held]))


def test_registry_names_every_family_and_refuses_an_unknown_one() -> None:
    for name, fam in HEAD_FAMILIES.items():
        assert fam.name == name and isinstance(fam, HeadFamily)
        assert get_head_family(name) is fam
    with pytest.raises(ConfigError, match="Unknown head family 'svm'.*'linear'"):
        get_head_family("svm")


def test_linear_cv_scores_shape_determinism_and_refit_agreement(digits, one_thread) -> None:
    X, y, folds = digits
    fam = get_head_family("linear")
    grid = fam.default_grid(len(X), X.shape[1], 4)
    assert [p["C"] for p in grid] == sorted(p["C"] for p in grid) and len(grid) == 9
    grid = grid[2:7]  # C = 1e-4 .. 1
    s = fam.cv_scores(X, y, folds, grid)
    assert s.shape == (len(grid), len(folds)) and s.dtype == np.float64
    np.testing.assert_array_equal(s, fam.cv_scores(X, y, folds, grid))
    # The strongest regularisation is worse than C = 1 on these digits: the path really refits per C.
    assert s[-1].mean() > s[0].mean() + 0.02
    # Each score is what the estimator build() gives scores when fitted on the fold (within the
    # path's early stop: a loose tolerance may move a row or two).
    for i, p in enumerate(grid):
        for j, (fit, held) in enumerate(folds):
            assert abs(_fold_score(fam.build(p), X, y, fit, held) - s[i, j]) <= 2 / len(held) + 1e-12


def test_linear_family_refuses_what_it_cannot_do(digits) -> None:
    X, y, folds = digits
    fam = get_head_family("linear")
    with pytest.raises(ConfigError, match="no preprocessing 'l2'"):
        fam.cv_scores(X, y, folds, [{"C": 1.0}], preprocess="l2")
    with pytest.raises(ConfigError, match=r"parameters \['C'\]; got \['gamma'\]"):
        fam.build({"gamma": 1.0})
    with pytest.raises(ConfigError, match="empty grid"):
        fam.cv_scores(X, y, folds, [])
    with pytest.raises(ConfigError, match="Fold 0 has 0 fit rows"):
        fam.cv_scores(X, y, [(np.array([], int), folds[0][1])], [{"C": 1.0}])
    assert fam.relative_cost(1000, 100, 9) > fam.relative_cost(100, 100, 9) > 0
