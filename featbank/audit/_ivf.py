"""Approximate cosine neighbours for large caches: faiss IVF over a PCA projection, streamed.

The exact search (:func:`~featbank.audit.knn_search`) does N x N x D work: 10^6 images of 1280
values is hours on two cores. :func:`ivf_search` trains a PCA projection to ``reduce_dim`` values
and an inverted-file index (``nlist`` k-means cells) on an evenly spaced sample of at most
``train_rows`` rows, adds every row block by block, then searches each block of rows in its
``nprobe`` nearest cells. Memory: the index holds ``N * reduce_dim * 4`` bytes (512 MB for 10^6
rows at 128) plus one block of features; the (N, k) table as for the exact search. The result is
approximate: pairs it proposes are re-scored exactly (:func:`rescore_pairs`) before any threshold is
applied, so a reported similarity is always the true cosine; what may be missed is a pair whose
rows fall in cells ``nprobe`` does not reach (``scripts/bench_audit.py scale`` measures the recall
of planted pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ._neighbors import Neighbors, RowReader, l2_normalize_rows

__all__ = ["IvfSettings", "ivf_search"]


@dataclass
class IvfSettings:
    """Knobs of :func:`ivf_search` (defaults measured in ``scripts/bench_audit.py scale``).

    Attributes:
        reduce_dim: PCA components kept (the rows' own dimension when smaller).
        nlist: k-means cells; ``None`` = ``4 * sqrt(N)`` rounded, at most 16384.
        nprobe: cells searched per row.
        train_rows: rows (evenly spaced) that train the PCA and the cells.
        block_rows: rows read, added and searched at once.
    """

    reduce_dim: int = 128
    nlist: int | None = None
    nprobe: int = 16
    train_rows: int = 50_000
    block_rows: int = 20_000


def _faiss():  # noqa: ANN202 - the faiss module
    try:
        import faiss
    except ImportError:
        raise ConfigError("The approximate search (--search ivf) needs faiss: pip install 'featbank[faiss]' "
                          "(faiss-cpu), or use --search exact.") from None
    return faiss


def _pca(x: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, (dim, d) projection onto the top ``d`` principal axes) of the rows ``x``."""
    mean = x.mean(axis=0, dtype=np.float64)
    cov = (x.T.astype(np.float64) @ x) / len(x) - np.outer(mean, mean)
    _, vecs = np.linalg.eigh(cov)
    return mean.astype(np.float32), np.ascontiguousarray(vecs[:, ::-1][:, :d], np.float32)


class _Projector:
    """L2-normalise, centre, project, L2-normalise: cosine in the PCA space."""

    def __init__(self, mean: np.ndarray, axes: np.ndarray):
        self.mean, self.axes = mean, axes

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize_rows((l2_normalize_rows(x) - self.mean) @ self.axes)


def _train(faiss, read_rows: RowReader, n: int, dim: int, s: IvfSettings):  # noqa: ANN001, ANN202
    rows = np.unique(np.linspace(0, n - 1, min(n, s.train_rows)).astype(np.int64))
    x = l2_normalize_rows(read_rows(rows))
    project = _Projector(*_pca(x, min(s.reduce_dim, dim)))
    d = project.axes.shape[1]
    nlist = s.nlist or int(min(16384, max(1, round(4 * np.sqrt(n)))))
    nlist = max(1, min(nlist, len(rows) // 39 or 1))  # faiss wants >= 39 training points per cell
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(project(x))
    index.nprobe = min(s.nprobe, nlist)
    return project, index


def ivf_search(read_rows: RowReader, n: int, dim: int, k: int, settings: IvfSettings | None = None) -> Neighbors:
    """The ``k`` approximately nearest other rows of each of ``n`` rows (cosine in the PCA space).

    Args:
        read_rows: returns the float32 features of sorted row indices.
        n, dim: rows and their width.
        k: neighbours per row.
        settings: :class:`IvfSettings`.
    """
    s = settings or IvfSettings()
    if k < 1 or s.nprobe < 1 or s.reduce_dim < 1 or s.block_rows < 1:
        raise ConfigError(f"k, nprobe, reduce_dim and block_rows must be at least 1; got {k}, {s.nprobe}, "
                          f"{s.reduce_dim}, {s.block_rows}.")
    faiss = _faiss()
    project, index = _train(faiss, read_rows, n, dim, s)
    spans = [(a, min(n, a + s.block_rows)) for a in range(0, n, s.block_rows)]
    for a, b in spans:
        index.add(project(read_rows(np.arange(a, b))))
    best_i = np.full((n, k), -1, np.int64)
    best_s = np.full((n, k), np.nan, np.float32)
    for a, b in spans:
        q = project(read_rows(np.arange(a, b)))
        sims, idx = index.search(q, min(k + 1, n))
        idx = idx.astype(np.int64)
        idx[idx == np.arange(a, b)[:, None]] = -1  # the row itself
        order = np.argsort(idx < 0, axis=1, kind="stable")[:, :k]  # real neighbours first, order kept
        best_i[a:b, : order.shape[1]] = np.take_along_axis(idx, order, axis=1)
        best_s[a:b, : order.shape[1]] = np.take_along_axis(sims, order, axis=1)
    best_s[best_i < 0] = np.nan
    return Neighbors(index=best_i, similarity=best_s)
