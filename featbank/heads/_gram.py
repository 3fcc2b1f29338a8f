"""One kernel matrix per fold, shared by every head family that works from it.

The ``svm-rbf`` and ``svm-linear`` families and ``knn`` all start from the same numbers on a fold:
the Gram matrix of the fold's preprocessed rows (fit rows against fit rows, held-out rows against
fit rows) and the rows' squared norms. An RBF kernel of any width is ``exp(-gamma * d2)`` with
``d2 = |a|^2 + |b|^2 - 2 a.b``; the linear kernel is the Gram matrix itself; the Euclidean
neighbours of ``knn`` (cosine neighbours after the ``l2`` preprocessing) are the smallest ``d2``.
:class:`FoldKernels` computes that once per (feature matrix, preprocessing, fold) and hands it to
each family, so an (features, views, preprocessing) route costs one matrix product per fold
whatever the number of families and settings scored on it.

It is bounded in memory: it keeps the most recently used entries up to ``max_bytes`` and drops the
least recently used ones beyond it; a fold whose matrices alone exceed the bound is not stored at
all (:meth:`FoldKernels.get` returns ``None``) and the families compute what they need themselves,
as without sharing.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ._preprocess import prep_steps

__all__ = ["FoldGram", "FoldKernels", "KERNEL_BYTES", "fold_gram", "fold_rows"]

#: Default bound of :class:`FoldKernels`: 1 GiB (on ELPV 4-class, 1,836 train+val images, one fold's
#: matrices take 22 MB whatever the width of the features; on Fashion-MNIST 10k, 7,000, 314 MB).
KERNEL_BYTES = 1 << 30


@dataclass(frozen=True)
class FoldGram:
    """The shared numbers of one fold: Gram blocks and squared norms of the preprocessed rows (float64).

    Attributes:
        G_ff: fit rows x fit rows.
        G_hf: held-out rows x fit rows.
        sq_f, sq_h: squared norms of the fit and held-out rows.
        var_f: the variance of every entry of the fit rows (scikit-learn's ``gamma="scale"`` divides by it).
        n_features: columns of the rows.
    """

    G_ff: np.ndarray
    G_hf: np.ndarray
    sq_f: np.ndarray
    sq_h: np.ndarray
    var_f: float
    n_features: int

    @property
    def nbytes(self) -> int:
        return int(self.G_ff.nbytes + self.G_hf.nbytes + self.sq_f.nbytes + self.sq_h.nbytes)

    def sq_distances(self) -> np.ndarray:
        """Squared Euclidean distances, held-out rows x fit rows (clamped at 0)."""
        d2 = self.sq_h[:, None] + self.sq_f[None, :] - 2.0 * self.G_hf
        return np.maximum(d2, 0.0, out=d2)


def fold_gram(Xf: np.ndarray, Xh: np.ndarray, device: str = "cpu") -> FoldGram:
    """The :class:`FoldGram` of preprocessed fit rows ``Xf`` and held-out rows ``Xh``: the same BLAS
    products (so the same numbers) :class:`~featbank.heads.KernelSVC` computes when fitted on ``Xf``."""
    from ._kernel_svc import gram, sq_norms

    Xf, Xh = np.asarray(Xf, np.float64), np.asarray(Xh, np.float64)
    return FoldGram(gram(Xf, Xf, device), gram(Xh, Xf, device), sq_norms(Xf), sq_norms(Xh), float(Xf.var()),
                    int(Xf.shape[1]))


def fold_rows(X: np.ndarray, fit: np.ndarray, held: np.ndarray, preprocess: str) -> tuple[np.ndarray, np.ndarray]:
    """The fold's fit and held-out rows preprocessed with statistics of the fit rows: the very steps
    (and so the very numbers) a family's ``build`` pipeline computes when fitted on these rows."""
    from sklearn.pipeline import Pipeline

    pre = Pipeline(prep_steps(preprocess))
    return pre.fit_transform(X[fit]), pre.transform(X[held])


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a, np.int64).tobytes(), digest_size=16).hexdigest()


class FoldKernels:
    """A memory-bounded store of :class:`FoldGram` by (feature matrix, preprocessing, fold).

    A feature matrix is known by its identity (the store keeps a reference to it, so the identity
    cannot be reused while the entry lives); a fold by a digest of its fit and held-out rows.

    Args:
        max_bytes: the most the stored matrices may take; least recently used entries go first.

    Attributes:
        computed, reused, refused: folds computed and stored, folds handed out again, folds too
            large to store (computed by the family itself).
    """

    def __init__(self, max_bytes: int = KERNEL_BYTES):
        self.max_bytes = int(max_bytes)
        self._store: OrderedDict[tuple[int, str, str, str], tuple[np.ndarray, FoldGram]] = OrderedDict()
        self.computed = self.reused = self.refused = 0

    @staticmethod
    def fold_bytes(n_fit: int, n_held: int) -> int:
        """Bytes of one fold's matrices (float64 Gram blocks and norms)."""
        return 8 * (n_fit + n_held) * (n_fit + 1)

    def _key(self, X: np.ndarray, fit: np.ndarray, held: np.ndarray, preprocess: str) -> tuple[int, str, str, str]:
        return (id(X), preprocess, _digest(fit), _digest(held))

    def has(self, X: np.ndarray, fit: np.ndarray, held: np.ndarray, preprocess: str) -> bool:
        """Whether this fold of ``X`` under ``preprocess`` is stored (nothing is computed)."""
        return self._key(X, fit, held, preprocess) in self._store

    def get(self, X: np.ndarray, fit: np.ndarray, held: np.ndarray, preprocess: str,
            device: str = "cpu") -> FoldGram | None:
        """The fold's :class:`FoldGram`, stored or computed now (and stored); ``None`` when one fold's
        matrices exceed ``max_bytes`` (the caller computes what it needs without the store)."""
        key = self._key(X, fit, held, preprocess)
        if key in self._store:
            self._store.move_to_end(key)
            self.reused += 1
            return self._store[key][1]
        if self.fold_bytes(len(fit), len(held)) > self.max_bytes:
            self.refused += 1
            return None
        Xf, Xh = fold_rows(X, np.asarray(fit), np.asarray(held), preprocess)
        fg = fold_gram(Xf, Xh, device)
        while self._store and self.nbytes + fg.nbytes > self.max_bytes:
            self._store.popitem(last=False)
        self._store[key] = (X, fg)
        self.computed += 1
        return fg

    @property
    def nbytes(self) -> int:
        return sum(fg.nbytes for _, fg in self._store.values())

    def clear(self) -> None:
        self._store.clear()

    def stats(self) -> dict[str, int]:
        return {"computed": self.computed, "reused": self.reused, "refused": self.refused, "max_bytes": self.max_bytes}
