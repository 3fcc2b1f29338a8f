"""One kernel matrix per fold, shared by every head family that works from it.

The ``svm-rbf`` and ``svm-linear`` families and ``knn`` all start from the same numbers on a fold:
the Gram matrix of the fold's preprocessed rows (fit rows against fit rows, held-out rows against
fit rows) and the rows' squared norms. An RBF kernel of any width is ``exp(-gamma * d2)`` with
``d2 = |a|^2 + |b|^2 - 2 a.b``; the linear kernel is the Gram matrix itself; the Euclidean
neighbours of ``knn`` (cosine neighbours after the ``l2`` preprocessing) are the smallest ``d2``.
:class:`FoldKernels` computes that once per (feature matrix, preprocessing, fold) and hands it to
each family, so an (features, views, preprocessing) route costs one matrix product per fold
whatever the number of families and settings scored on it.

Feature sets that share columns share their cost too. A matrix registered with its column blocks
(:meth:`FoldKernels.register`; ``fit --auto`` registers each layer under each view handling) has its
fold Gram matrix summed from one per block: every preprocessing acts on each column alone (``l2``'s
centring too; its division by the row norms comes after the sum, from the summed squared norms), so a
Gram matrix is the sum of its blocks' Gram matrices. A block computed for ``all`` layers then serves
``final``, ``last4`` and the greedy selection on the same fold: on ELPV 4-class, five feature sets cost
one product of all the layers' columns instead of 2.8 of them. The sum differs from one product in
rounding only: about 1e-15 relative, and for ``l2`` about 1e-7 (float32 features: the pipeline divides
the float32 rows by their norms, the blocks' sum is divided in float64).

It is bounded in memory: it keeps the most recently used entries up to ``max_bytes`` and drops the
least recently used ones beyond it; a fold whose matrices alone exceed the bound is not stored at
all (:meth:`FoldKernels.get` returns ``None``) and the families compute what they need themselves,
as without sharing. Blocks are used only where one fold's blocks of the widest registered matrix and
their sum fit in the bound together; else every Gram matrix is one product, as without blocks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from ._preprocess import prep_steps

__all__ = ["Block", "FoldGram", "FoldKernels", "KERNEL_BYTES", "fold_gram", "fold_rows"]

#: Default bound of :class:`FoldKernels`: 1 GiB (on ELPV 4-class, 1,836 train+val images, one fold's
#: matrices take 22 MB whatever the width of the features; on Fashion-MNIST 10k, 7,000, 314 MB).
KERNEL_BYTES = 1 << 30

#: One block of a feature matrix's columns: ``(name, column indices)``. A name stands for the same
#: numbers in every matrix registered with it (``fit --auto``: a layer under one view handling).
Block = tuple[Hashable, np.ndarray]


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
    return _fit_rows(prep_steps(preprocess), X, fit, held)


def _fit_rows(steps: list, X: np.ndarray, fit: np.ndarray, held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.pipeline import Pipeline

    pre = Pipeline(steps)
    return pre.fit_transform(X[fit]), pre.transform(X[held])


@dataclass(frozen=True)
class _Part:
    """One column block's share of a fold's :class:`FoldGram`: its Gram blocks, squared norms and the
    fit rows' sums, of the block's columns preprocessed column by column (``l2``: centred only), and
    the dtype those rows had (the precision scikit-learn's ``Normalizer`` works in)."""

    G_ff: np.ndarray
    G_hf: np.ndarray
    sq_f: np.ndarray
    sq_h: np.ndarray
    sum_f: np.ndarray
    n_features: int
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(self.G_ff.nbytes + self.G_hf.nbytes + self.sq_f.nbytes + self.sq_h.nbytes + self.sum_f.nbytes)


def _block_part(X: np.ndarray, cols: np.ndarray, fit: np.ndarray, held: np.ndarray, preprocess: str,
                device: str) -> _Part:
    """The :class:`_Part` of columns ``cols`` of ``X`` on one fold: the per-column steps of ``preprocess``
    (all but ``l2``'s row normalisation, :func:`_row_step`), fitted on the fold's fit rows."""
    from ._kernel_svc import gram, sq_norms

    steps = [(name, step) for name, step in prep_steps(preprocess) if not _row_step(step)]
    Xf, Xh = _fit_rows(steps, X[:, cols], fit, held)
    dtype = np.asarray(Xf).dtype
    Xf, Xh = np.asarray(Xf, np.float64), np.asarray(Xh, np.float64)
    return _Part(gram(Xf, Xf, device), gram(Xh, Xf, device), sq_norms(Xf), sq_norms(Xh), Xf.sum(axis=1),
                 int(Xf.shape[1]), dtype)


def _row_step(step: object) -> bool:
    """Whether a preprocessing step acts on whole rows (``Normalizer``); every other step of
    :func:`~featbank.heads._preprocess.prep_steps` acts on each column alone, and the row step is last."""
    from sklearn.preprocessing import Normalizer

    return isinstance(step, Normalizer)


def _sum_parts(parts: Sequence[_Part], l2: bool) -> FoldGram:
    """The :class:`FoldGram` of the blocks' columns side by side: the sum of the parts, then for ``l2``
    each row divided by its norm (norms below 10 eps of the rows' dtype left as 1, as scikit-learn's
    ``Normalizer`` does). One part without ``l2`` is handed out as it is (no copy)."""
    first, rest = parts[0], parts[1:]
    copy = bool(rest) or l2
    G_ff, G_hf = (first.G_ff.copy(), first.G_hf.copy()) if copy else (first.G_ff, first.G_hf)
    sq_f, sq_h, sum_f = (first.sq_f.copy(), first.sq_h.copy(), first.sum_f.copy()) if copy else (
        first.sq_f, first.sq_h, first.sum_f)
    for p in rest:
        G_ff += p.G_ff
        G_hf += p.G_hf
        sq_f += p.sq_f
        sq_h += p.sq_h
        sum_f += p.sum_f
    d = sum(p.n_features for p in parts)
    if l2:
        eps = 10 * np.finfo(first.dtype if np.issubdtype(first.dtype, np.floating) else np.float64).eps
        norm_f, norm_h = _row_norms(sq_f, eps), _row_norms(sq_h, eps)
        G_ff /= norm_f[:, None]
        G_ff /= norm_f[None, :]
        G_hf /= norm_h[:, None]
        G_hf /= norm_f[None, :]
        sq_f /= norm_f**2
        sq_h /= norm_h**2
        sum_f /= norm_f
    n = len(sq_f) * d
    mean = float(sum_f.sum()) / n
    return FoldGram(G_ff, G_hf, sq_f, sq_h, max(float(sq_f.sum()) / n - mean * mean, 0.0), d)


def _row_norms(sq: np.ndarray, eps: float) -> np.ndarray:
    norms = np.sqrt(sq)
    norms[norms < eps] = 1.0  # sklearn's _handle_zeros_in_scale
    return norms


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a, np.int64).tobytes(), digest_size=16).hexdigest()


class FoldKernels:
    """A memory-bounded store of :class:`FoldGram` by (feature matrix, preprocessing, fold).

    A feature matrix is known by its identity (the store keeps a reference to it, so the identity
    cannot be reused while the entry lives); a fold by a digest of its fit and held-out rows. A matrix
    registered with its column blocks (:meth:`register`) has its Gram matrix summed from one per
    block, and the blocks' are stored too, by (block name, preprocessing, fold), for every matrix that
    holds the same blocks.

    Args:
        max_bytes: the most the stored matrices may take; least recently used entries go first.

    Attributes:
        computed, reused, refused: fold Gram matrices that took a product (of the whole matrix or of
            a block), that took none (stored, or summed from stored blocks), and folds too large to
            store (computed by the family itself).
        blocks_computed, blocks_reused: column blocks' Gram matrices computed, and taken from the store.
    """

    def __init__(self, max_bytes: int = KERNEL_BYTES):
        self.max_bytes = int(max_bytes)
        self._store: OrderedDict[tuple, tuple[np.ndarray | None, FoldGram | _Part]] = OrderedDict()
        self._blocks: dict[int, tuple[np.ndarray, list[Block]]] = {}
        self._users: dict[Hashable, int] = {}  # block name -> registered matrices holding it
        self.computed = self.reused = self.refused = self.blocks_computed = self.blocks_reused = 0

    @staticmethod
    def fold_bytes(n_fit: int, n_held: int) -> int:
        """Bytes of one fold's matrices (float64 Gram blocks and norms)."""
        return 8 * (n_fit + n_held) * (n_fit + 1)

    def register(self, X: np.ndarray, blocks: Sequence[Block]) -> None:
        """Declare ``X``'s columns as ``blocks`` (each column in exactly one; see :data:`Block`).

        Raises:
            ValueError: the blocks do not cover every column of ``X`` exactly once, or repeat a name.
        """
        blocks = [(name, np.asarray(cols, np.intp)) for name, cols in blocks]
        every = np.sort(np.concatenate([c for _, c in blocks])) if blocks else np.zeros(0, np.intp)
        if not np.array_equal(every, np.arange(X.shape[1])) or len({n for n, _ in blocks}) != len(blocks):
            raise ValueError(f"column blocks must cover the {X.shape[1]} columns exactly once, under distinct names")
        for name, _ in self._blocks.pop(id(X), (None, []))[1]:
            self._users[name] -= 1
        self._blocks[id(X)] = (X, blocks)
        for name, _ in blocks:
            self._users[name] = self._users.get(name, 0) + 1

    def _key(self, X: np.ndarray, fit: np.ndarray, held: np.ndarray, preprocess: str) -> tuple[int, str, str, str]:
        return (id(X), preprocess, _digest(fit), _digest(held))

    def has(self, X: np.ndarray, fit: np.ndarray, held: np.ndarray, preprocess: str) -> bool:
        """Whether this fold of ``X`` under ``preprocess`` needs no product: it is stored, or all of its
        blocks are (nothing is computed)."""
        return self.stored_share(X, fit, held, preprocess) == 1.0

    def stored_share(self, X: np.ndarray, fit: np.ndarray, held: np.ndarray, preprocess: str) -> float:
        """The share of the work of :meth:`get` already done: 1 when the fold is stored, else the share of
        ``X``'s columns whose blocks are stored for this fold (0 without blocks); nothing is computed."""
        key = self._key(X, fit, held, preprocess)
        if key in self._store:
            return 1.0
        blocks = self._usable_blocks(X, len(fit), len(held))
        if not blocks:
            return 0.0
        done = sum(len(c) for name, c in blocks if ("block", name, *key[1:]) in self._store)
        return done / max(X.shape[1], 1)

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
        fit, held = np.asarray(fit), np.asarray(held)
        blocks = self._usable_blocks(X, len(fit), len(held))
        l2 = any(_row_step(step) for _, step in prep_steps(preprocess))
        if blocks:
            parts, made = self._parts(X, blocks, fit, held, preprocess, device, key[1:])
            fg = _sum_parts(parts, l2)
        else:
            fg, made = fold_gram(*fold_rows(X, fit, held, preprocess), device), 1
        if made:
            self.computed += 1
        else:  # summed from stored blocks alone
            self.reused += 1
        if len(blocks) == 1 and not l2 and self._users[blocks[0][0]] > 1:
            return fg  # the stored block's own arrays: stored again, they would be counted twice
        self._put(key, X, fg)
        return fg

    def _usable_blocks(self, X: np.ndarray, n_fit: int, n_held: int) -> list[Block]:
        """``X``'s registered blocks where the blocks of the widest registered matrix and their sum fit in
        the bound together on one fold (so a block is kept until the matrices that share it are summed),
        else [] (and no matrix is split)."""
        X_blocks = self._blocks.get(id(X))  # it holds X, so the id is X's while registered
        if X_blocks is None:
            return []
        widest = max(len(b) for _, b in self._blocks.values())
        part = self.fold_bytes(n_fit, n_held) + 8 * n_fit
        return X_blocks[1] if (widest + 1) * part <= self.max_bytes else []

    def _parts(self, X: np.ndarray, blocks: list[Block], fit: np.ndarray, held: np.ndarray, preprocess: str,
               device: str, fold_key: tuple) -> tuple[list[_Part], int]:
        """``X``'s blocks on one fold: the stored ones taken first (so computing the others cannot evict
        them), then the others computed, and stored where another registered matrix holds them too.
        Returns the parts in block order and how many were computed."""
        stored = {}
        for name, _ in blocks:
            k = ("block", name, *fold_key)
            if k in self._store:
                self._store.move_to_end(k)
                stored[name] = self._store[k][1]
        parts = []
        for name, cols in blocks:
            if name in stored:
                self.blocks_reused += 1
                parts.append(stored[name])
                continue
            part = _block_part(X, cols, fit, held, preprocess, device)
            self.blocks_computed += 1
            if self._users.get(name, 0) > 1:  # a block no other matrix holds is summed and dropped
                self._put(("block", name, *fold_key), None, part)
            parts.append(part)
        return parts, len(blocks) - len(stored)

    def _put(self, key: tuple, X: np.ndarray | None, entry: FoldGram | _Part) -> None:
        while self._store and self.nbytes + entry.nbytes > self.max_bytes:
            self._store.popitem(last=False)
        self._store[key] = (X, entry)

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for _, entry in self._store.values())

    def clear(self) -> None:
        """Drop every stored matrix and every registration."""
        self._store.clear()
        self._blocks.clear()
        self._users.clear()

    def stats(self) -> dict[str, int]:
        return {"computed": self.computed, "reused": self.reused, "refused": self.refused, "max_bytes": self.max_bytes,
                "blocks_computed": self.blocks_computed, "blocks_reused": self.blocks_reused}
