"""Synthetic feature caches written with featbank's own cache writer (real HDF5 files)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from featbank.cache import PartRows, write_cache


def write_synthetic_cache(path: Path, X: np.ndarray, y: np.ndarray, splits: np.ndarray | None = None,
                          classes: list[str] | None = None, key: str = "synthetic-key", backbone: str = "synthetic") -> Path:
    """A featbank cache holding ``X`` as embeddings, ``y`` as labels (``-1`` unlabelled)."""
    n, d = X.shape
    src = path.with_name(path.name + ".src.h5")
    with h5py.File(src, "w") as f:
        f.create_dataset("embeddings", data=X.astype(np.float32))
    classes = classes or [f"c{i}" for i in range(int(y.max()) + 1 if (y >= 0).any() else 0)]
    write_cache(
        path, sources=[("src", src, np.arange(n))], rows=PartRows(
            [f"img_{i:05d}.png" for i in range(n)], np.zeros((n, 2), np.int64), y,
            splits if splits is not None else -np.ones(n, np.int8)), classes=classes, skipped=[],
        embed_dim=d, dtype="float32",
        attrs={"cache_key": key, "backbone": backbone, "weights": "none", "weights_sha256": "0" * 64,
               "transform": {}, "root": str(path.parent), "precision": "float32"},
    )
    src.unlink()
    return path


def blobs(n_per_class: int, d: int, k: int, sep: float, seed: int = 0, noise_labels: float = 0.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (k, d)) * sep
    y = np.repeat(np.arange(k), n_per_class)
    X = centers[y] + rng.normal(0, 1, (len(y), d))
    if noise_labels:
        flip = rng.random(len(y)) < noise_labels
        y = y.copy()
        y[flip] = rng.integers(0, k, flip.sum())
    return X.astype(np.float32), y.astype(np.int64)
