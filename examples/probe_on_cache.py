"""Fit featbank's LinearHead and scikit-learn heads side by side on a cache's embeddings.

    python examples/probe_on_cache.py [CACHE]      # default: runs/elpv.h5 (featbank extract data/elpv --out runs/elpv.h5)

The cache is read lazily (only the rows asked for are loaded); the heads are plain scikit-learn
estimators, so any scikit-learn tool (pipelines, cross-validation, metrics) works on them. C is
chosen on a validation split of train, then the chosen head is scored once on test.
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

import featbank


def main(cache_path: str = "runs/elpv.h5") -> None:
    with featbank.open_cache(cache_path) as cache:
        train, test = cache.split_mask("train"), cache.split_mask("test")
        X, y = cache.load_embeddings(train), cache.labels[train]
        X_test, y_test = cache.load_embeddings(test), cache.labels[test]
        print(f"{cache_path}: {X.shape[0]} train / {X_test.shape[0]} test rows, {X.shape[1]}-d, classes {cache.classes}")
    X_fit, X_val, y_fit, y_val = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)

    scores = {C: featbank.LinearHead(C=C).fit(X_fit, y_fit).score(X_val, y_val) for C in np.logspace(-3, 1, 5)}
    best_c = max(scores, key=scores.get)  # the first of equal scores: the smallest C
    heads = {
        f"LinearHead(C={best_c:g})": featbank.LinearHead(C=best_c),
        "cosine 5-NN": make_pipeline(Normalizer(), KNeighborsClassifier(min(5, len(y) - 1))),
    }
    for name, head in heads.items():
        pred = head.fit(X, y).predict(X_test)  # refit on all of train, score once on test
        print(f"{name:24s} test top-1 {np.mean(pred == y_test):.3f}  "
              f"balanced {balanced_accuracy_score(y_test, pred):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
