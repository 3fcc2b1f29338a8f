"""Findings from neighbours and probabilities: duplicate pairs and outliers, as plain arrays."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._neighbors import Neighbors, RowReader, l2_normalize_rows

__all__ = ["Pairs", "find_pairs", "rescore_pairs", "best_match", "mark_exact", "knn_outlier_scores", "flag_high", "same_file",
           "EXACT_SIMILARITY"]

#: Pairs at or above this cosine are checked for identical embeddings (float32 rounding of a
#: product of identical unit vectors stays within ~1e-6 of 1).
EXACT_SIMILARITY = 1.0 - 1e-5


@dataclass
class Pairs:
    """Pairs of rows (``a < b``) at or above the threshold, most similar first; ``exact`` where the
    embeddings are identical; ``pixel`` the thumbnail correlation when pairs were verified on pixels
    (NaN where an image could not be read), else None."""

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray
    exact: np.ndarray
    pixel: np.ndarray | None = None

    def take(self, keep: np.ndarray) -> Pairs:
        """The pairs at ``keep`` (a boolean mask or indices), in that order."""
        return Pairs(self.a[keep], self.b[keep], self.similarity[keep], self.exact[keep],
                     None if self.pixel is None else self.pixel[keep])

    def __len__(self) -> int:
        return len(self.a)


def find_pairs(nb: Neighbors, threshold: float) -> Pairs:
    """Unique pairs (i, j) with j among the neighbours of i (or i among j's) and cosine >= threshold."""
    n, k = nb.index.shape
    i = np.repeat(np.arange(n, dtype=np.int64), k)
    j = nb.index.ravel()
    s = nb.similarity.ravel()
    keep = (j >= 0) & (np.nan_to_num(s, nan=-np.inf) >= threshold)
    a, b, s = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep]), s[keep]
    key, first = np.unique(a * n + b, return_index=True)
    a, b, s = a[first], b[first], s[first]
    order = np.lexsort((b, a, -s))
    return Pairs(a=a[order], b=b[order], similarity=s[order].astype(np.float32), exact=np.zeros(len(order), bool))


def best_match(a: np.ndarray, b: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Mask of the mutual best matches: pairs that score highest both among the pairs of ``a`` and among
    those of ``b`` (ties kept; NaN never wins). Measured on ELPV with planted copies: the same recall
    as keeping each image's best match, with a third fewer other pairs (scripts/bench_audit.py dups)."""
    s = np.nan_to_num(np.asarray(score, np.float64), nan=-np.inf)
    n = int(max(a.max(initial=-1), b.max(initial=-1))) + 1
    best = np.full(n, -np.inf)
    np.maximum.at(best, a, s)
    np.maximum.at(best, b, s)
    return np.isfinite(s) & ((s >= best[a]) & (s >= best[b]))


def rescore_pairs(pairs: Pairs, read_rows: RowReader, threshold: float, chunk: int = 4096) -> Pairs:
    """The pairs whose exact cosine (features read back with ``read_rows``) is at or above ``threshold``,
    with that cosine, most similar first (for candidates proposed by an approximate search)."""
    sims = np.zeros(len(pairs), np.float32)
    for s in range(0, len(pairs), chunk):
        a, b = pairs.a[s : s + chunk], pairs.b[s : s + chunk]
        rows = np.unique(np.concatenate([a, b]))
        x = l2_normalize_rows(read_rows(rows))
        sims[s : s + chunk] = (x[np.searchsorted(rows, a)] * x[np.searchsorted(rows, b)]).sum(axis=1)
    keep = sims >= threshold
    a, b, sims = pairs.a[keep], pairs.b[keep], sims[keep]
    order = np.lexsort((b, a, -sims))
    return Pairs(a=a[order], b=b[order], similarity=sims[order], exact=np.zeros(len(order), bool))


def mark_exact(pairs: Pairs, read_rows: RowReader, chunk: int = 4096) -> None:
    """Set ``pairs.exact`` where the two stored embeddings are equal, value for value."""
    cand = np.flatnonzero(pairs.similarity >= EXACT_SIMILARITY)
    for s in range(0, len(cand), chunk):
        c = cand[s : s + chunk]
        rows = np.unique(np.concatenate([pairs.a[c], pairs.b[c]]))
        x = read_rows(rows)
        xa, xb = x[np.searchsorted(rows, pairs.a[c])], x[np.searchsorted(rows, pairs.b[c])]
        pairs.exact[c] = (xa == xb).all(axis=1)


def same_file(path_a: Path, path_b: Path, size_a: int, size_b: int) -> bool | None:
    """True when both files have identical bytes (SHA-256), False when not, None when unreadable."""
    if size_a != size_b:
        return False
    try:
        digests = []
        for p in (path_a, path_b):
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023 - fh is bound per file
                    h.update(block)
            digests.append(h.digest())
    except OSError:
        return None
    return digests[0] == digests[1]


def knn_outlier_scores(nb: Neighbors) -> np.ndarray:
    """Mean cosine distance (1 - similarity) to the k nearest other rows (NaN with no neighbour)."""
    d = 1.0 - nb.similarity.astype(np.float64)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(d)
        total = np.where(valid, d, 0.0).sum(axis=1)
        count = valid.sum(axis=1)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def flag_high(score: np.ndarray, percentile: float) -> tuple[np.ndarray, float]:
    """(rows whose score is above the ``percentile``-th percentile, most extreme first; the cut)."""
    finite = np.isfinite(score)
    if not finite.any():
        return np.zeros(0, np.int64), float("nan")
    cut = float(np.percentile(score[finite], percentile))
    rows = np.flatnonzero(finite & (score > cut))
    return rows[np.lexsort((rows, -score[rows]))], cut
