"""For each test image, its most similar training image: a first look for train/test leakage.

    python examples/nearest_across_splits.py [CACHE] [TOP]    # default: runs/elpv.h5, 5 pairs

Cosine similarity of the cached embeddings, computed in blocks so memory stays bounded on a large
cache. `featbank audit CACHE` does this (and label errors, outliers, a report) at any size; this is
the idea in twenty lines.
"""

from __future__ import annotations

import sys

import numpy as np

import featbank


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def main(cache_path: str = "runs/elpv.h5", top: str = "5") -> None:
    with featbank.open_cache(cache_path) as cache:
        train_rows = np.flatnonzero(cache.split_mask("train"))
        test_rows = np.flatnonzero(cache.split_mask("test"))
        train = unit_rows(cache.load_embeddings(train_rows))
        best = np.full(len(test_rows), -np.inf)
        match = np.zeros(len(test_rows), dtype=np.int64)
        for start in range(0, len(test_rows), 1024):  # one block of test rows at a time
            block = unit_rows(cache.load_embeddings(test_rows[start:start + 1024])) @ train.T
            match[start:start + len(block)] = block.argmax(1)
            best[start:start + len(block)] = block.max(1)
        print(f"{len(test_rows)} test images against {len(train_rows)} training images ({cache_path})")
        for i in np.argsort(-best)[: int(top)]:
            a, b = test_rows[i], train_rows[match[i]]
            print(f"{best[i]:.4f}  {cache.paths[a]}  <->  {cache.paths[b]}")


if __name__ == "__main__":
    main(*sys.argv[1:])
