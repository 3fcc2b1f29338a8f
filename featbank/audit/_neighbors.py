"""Cosine nearest neighbours of every row, block by block, and the near-duplicate pairs among them.

:func:`knn_search` keeps a *resident* slice of the (L2-normalised) rows in memory, streams the
query rows past it in blocks of ``block_rows``, and merges each block's top-k into a running
(N, k) table; when the rows do not fit the memory budget, the resident slice moves on and the
queries are streamed again. Memory is ``resident_rows * D * 4 + block_rows * resident_rows * 4``
bytes plus the (N, k) table, whatever N is. The similarity products run in faiss (exact
``IndexFlatIP``) when it is installed, else in torch (on CUDA when asked for and present).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = ["Neighbors", "knn_search", "plan_blocks", "l2_normalize_rows", "BACKENDS"]

#: Similarity engines: ``auto`` = torch on CUDA when the device is CUDA, else faiss when
#: installed, else torch on CPU.
BACKENDS = ("auto", "torch", "faiss")

#: Reads the feature rows ``rows`` (sorted int64 indices) as a float32 array.
RowReader = Callable[[np.ndarray], np.ndarray]


@dataclass
class Neighbors:
    """The ``k`` most similar other rows of every row: ``index`` (N, k) int64 (-1 where fewer than
    k other rows exist) and ``similarity`` (N, k) float32 cosine, most similar first."""

    index: np.ndarray
    similarity: np.ndarray


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def plan_blocks(n: int, dim: int, max_memory: int) -> tuple[int, int]:
    """(resident_rows, block_rows) for ``n`` rows of ``dim`` floats within ``max_memory`` bytes:
    half the budget for the resident rows, a quarter for one block of similarities."""
    if max_memory <= 0:
        raise ConfigError(f"The memory budget must be positive; got {max_memory!r} bytes.")
    resident = int(max(1, min(n, (max_memory // 2) // (4 * max(1, dim)))))
    block = int(max(1, min(8192, n, (max_memory // 4) // (4 * resident))))
    return resident, block


def _spans(n: int, step: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, step):
        yield s, min(n, s + step)


def _merge(best_i: np.ndarray, best_s: np.ndarray, cand_i: np.ndarray, cand_s: np.ndarray, k: int) -> None:
    """Merge candidates into the running top-k in place; ties broken by the smaller index."""
    all_i = np.concatenate([best_i, cand_i], axis=1)
    all_s = np.concatenate([best_s, cand_s], axis=1)
    filler = all_i < 0
    key_s = np.where(filler, -np.inf, all_s)
    key_i = np.where(filler, np.iinfo(np.int64).max, all_i)
    order = _lexsort_rows(key_s, key_i)[:, :k]
    best_i[:] = np.take_along_axis(all_i, order, axis=1)
    best_s[:] = np.take_along_axis(all_s, order, axis=1)


def _lexsort_rows(key_s: np.ndarray, key_i: np.ndarray) -> np.ndarray:
    """Per row: positions sorted by descending similarity, then ascending index."""
    o1 = np.argsort(key_i, axis=1, kind="stable")
    o2 = np.argsort(-np.take_along_axis(key_s, o1, axis=1), axis=1, kind="stable")
    return np.take_along_axis(o1, o2, axis=1)


class _TorchEngine:
    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def set_resident(self, xr: np.ndarray) -> None:
        self.xr = self.torch.from_numpy(xr).to(self.device)

    def topk(self, xq: np.ndarray, q0: int, r0: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.torch
        s = t.from_numpy(xq).to(self.device) @ self.xr.T
        _mask_self(s, q0, r0)
        kk = min(k, s.shape[1])
        vals, idx = t.topk(s, kk, dim=1)
        idx = (idx + r0).cpu().numpy().astype(np.int64)
        vals = vals.cpu().numpy().astype(np.float32)
        idx[~np.isfinite(vals)] = -1
        return idx, vals


def _mask_self(s, q0: int, r0: int) -> None:  # noqa: ANN001 - a torch tensor
    """Set the similarity of each query row to itself to -inf (query ``q0 + a`` is resident ``r0 + b``)."""
    nq, nr = s.shape
    lo, hi = max(q0, r0), min(q0 + nq, r0 + nr)
    if lo < hi:
        a = np.arange(lo, hi)
        s[a - q0, a - r0] = float("-inf")


class _FaissEngine:
    def __init__(self) -> None:
        import faiss

        self.faiss = faiss

    def set_resident(self, xr: np.ndarray) -> None:
        self.index = self.faiss.IndexFlatIP(xr.shape[1])
        self.index.add(np.ascontiguousarray(xr))
        self.n = xr.shape[0]

    def topk(self, xq: np.ndarray, q0: int, r0: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = min(k + 1, self.n)
        sims, idx = self.index.search(np.ascontiguousarray(xq), kk)
        idx = idx.astype(np.int64)
        own = (idx + r0) == (np.arange(len(xq))[:, None] + q0)
        idx = np.where(idx < 0, -1, idx + r0)
        idx[own] = -1
        sims = np.where(idx < 0, -np.inf, sims).astype(np.float32)
        return idx, sims


def _engine(backend: str, device: str) -> _TorchEngine | _FaissEngine:
    if backend not in BACKENDS:
        raise ConfigError(f"The 'backend' parameter must be one of {BACKENDS}. Got {backend!r} instead.")
    if backend == "faiss" or (backend == "auto" and not device.startswith("cuda")):
        try:
            return _FaissEngine()
        except ImportError:
            if backend == "faiss":
                raise ConfigError("backend='faiss' needs faiss: pip install 'featbank[faiss]' (faiss-cpu).") from None
    return _TorchEngine(device)


def knn_search(read_rows: RowReader, n: int, dim: int, k: int, *, max_memory: int = 1 << 30,
               block_rows: int | None = None, backend: str = "auto", device: str = "cpu") -> Neighbors:
    """The ``k`` nearest other rows of each of ``n`` rows by cosine similarity, exactly.

    Args:
        read_rows: returns the float32 features of sorted row indices (L2-normalised here).
        n, dim: rows and their width.
        k: neighbours per row.
        max_memory: bytes for the resident rows and one block of similarities (see :func:`plan_blocks`).
        block_rows: query rows per block (default: from ``max_memory``); never changes the result.
        backend, device: see :data:`BACKENDS`; ``device`` is a torch device string.
    """
    if k < 1:
        raise ConfigError(f"The 'k' parameter must be at least 1. Got {k!r} instead.")
    resident, block = plan_blocks(n, dim, max_memory)
    if block_rows is not None:
        block = max(1, int(block_rows))
    engine = _engine(backend, device)
    best_i = np.full((n, k), -1, np.int64)
    best_s = np.full((n, k), -np.inf, np.float32)
    for r0, r1 in _spans(n, resident):
        xr = l2_normalize_rows(read_rows(np.arange(r0, r1)))
        engine.set_resident(xr)
        for q0, q1 in _spans(n, block):
            inside = r0 <= q0 and q1 <= r1
            xq = xr[q0 - r0 : q1 - r0] if inside else l2_normalize_rows(read_rows(np.arange(q0, q1)))
            ci, cs = engine.topk(xq, q0, r0, k)
            _merge(best_i[q0:q1], best_s[q0:q1], ci, cs, k)
    best_s[best_i < 0] = np.nan
    return Neighbors(index=best_i, similarity=best_s)
