"""Cross-validate a head family's whole grid from one kernel per fold, then build the winner.

    python examples/head_families_cv.py

The families are what `featbank fit --auto` sweeps (linear, svm-rbf, svm-linear, knn, mlp). Each
scores every point of its grid on a fold while sharing the costly work (one Gram matrix for every
C and gamma of the RBF SVM), and builds an ordinary scikit-learn estimator for any point. Runs on
scikit-learn's digits; put cached embeddings in X to do the same on a cache.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold, train_test_split

from featbank.heads import HEAD_FAMILIES, get_head_family


def main() -> None:
    X, y = load_digits(n_class=4, return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X_train, y_train))
    print("families:", ", ".join(HEAD_FAMILIES))
    for name in ("svm-rbf", "knn"):
        family = get_head_family(name)
        grid = family.default_grid(*X_train.shape, 4)
        scores = family.cv_scores(X_train, y_train, folds, grid, preprocess="l2")  # (len(grid), n_folds)
        best = int(scores.mean(1).argmax())
        head = family.build(grid[best], preprocess="l2").fit(X_train, y_train)
        print(f"{name:8s} {len(grid):2d} grid points, best {grid[best]} CV {scores[best].mean():.3f}, "
              f"test {np.mean(head.predict(X_test) == y_test):.3f}")


if __name__ == "__main__":
    main()
