"""What the heads fit on: embedding rows in memory or streamed from a cache, and their statistics.

A :class:`Features` is a set of embedding rows that either sits in memory or is read from an
HDF5 cache chunk by chunk, so the same optimisation code runs on data larger than memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..cache import FeatureCache

__all__ = ["Features", "feature_stats"]


class Features:
    """Embedding rows for training: an in-memory array, or rows of a cache streamed in chunks.

    Args:
        X: an (N, D) array (in memory), or None.
        cache: a :class:`featbank.cache.FeatureCache` to stream from (with ``rows``).
        rows: row indices into the cache; they are sorted (HDF5 reads need ascending rows) and
            ``positions`` of chunks refer to this sorted order.
        chunk_rows: rows read per chunk when streaming.
    """

    def __init__(self, X: np.ndarray | None = None, *, cache: FeatureCache = None, rows: np.ndarray | None = None,
                 chunk_rows: int = 4096):
        if (X is None) == (cache is None):
            raise ValueError("Features needs exactly one of X (an array) or cache (with rows).")
        self.X = None if X is None else np.ascontiguousarray(X, dtype=np.float32)
        self.cache = cache
        self.rows = None if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
        if cache is not None and self.rows is None:
            self.rows = np.arange(cache.n_samples)
        self.chunk_rows = max(1, int(chunk_rows))

    @property
    def streaming(self) -> bool:
        return self.X is None

    @property
    def n_samples(self) -> int:
        return len(self.X) if self.X is not None else len(self.rows)

    @property
    def embed_dim(self) -> int:
        return self.X.shape[1] if self.X is not None else self.cache.embed_dim

    def __len__(self) -> int:
        return self.n_samples

    def chunks(self, chunk_order: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(positions, X_chunk)``; ``chunk_order`` permutes the chunks (for SGD)."""
        n = self.n_samples
        starts = np.arange(0, n, self.chunk_rows)
        if chunk_order is not None:
            starts = starts[chunk_order]
        for s in starts:
            pos = np.arange(s, min(n, s + self.chunk_rows))
            if self.X is not None:
                yield pos, self.X[s : s + self.chunk_rows]
            else:
                idx = self.rows[s : s + self.chunk_rows]
                yield pos, self.cache.load_embeddings(idx, np.float32)

    @property
    def n_chunks(self) -> int:
        return (self.n_samples + self.chunk_rows - 1) // self.chunk_rows

    def subset(self, positions: np.ndarray) -> Features:
        """The rows at ``positions`` (in this object's order), keeping the storage kind."""
        positions = np.asarray(positions)
        if self.X is not None:
            return Features(self.X[positions])
        return Features(cache=self.cache, rows=self.rows[np.sort(positions)], chunk_rows=self.chunk_rows)

    def to_array(self) -> np.ndarray:
        if self.X is not None:
            return self.X
        if not self.n_samples:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate([x for _, x in self.chunks()], axis=0)


def feature_stats(features: Features, l2_normalize: bool, sample_weight: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(Weighted) mean and standard deviation per column (after optional L2 normalisation), in one pass."""
    d = features.embed_dim
    s = np.zeros(d, np.float64)
    s2 = np.zeros(d, np.float64)
    n = 0.0
    for pos, x in features.chunks():
        x = x.astype(np.float64)
        if l2_normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        w = np.ones(len(pos)) if sample_weight is None else sample_weight[pos]
        s += w @ x
        s2 += w @ (x * x)
        n += float(w.sum())
    n = max(n, 1e-12)
    mean = s / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    scale = np.sqrt(var)
    scale[scale < 1e-8 * max(1.0, float(np.abs(mean).max(initial=0.0)))] = 1.0
    return mean.astype(np.float32), scale.astype(np.float32)
