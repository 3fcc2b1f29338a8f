"""Reading a cache: :class:`FeatureCache`, lazy on the embeddings (opened by ``_discovery.open_cache``)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import ConfigError
from ..features import FeatureSpec
from ._direct import RowReader
from ._features import check_block, dataset_name, parse_requested
from ._integrity import damaged_part_error, open_cache_file, validate_cache
from ._parts import PartInfo
from ._schema import decode_attr
from ._validate import check_rows

#: What :func:`open_cache` does with finite but extreme embedding rows.
EXTREME_POLICIES = ("raise", "warn", "ignore")

__all__ = ["FeatureCache", "EXTREME_POLICIES"]


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


class FeatureCache:
    """A featbank cache opened for reading. Embeddings stay on disk until asked for.

    Use :func:`open_cache`. Attributes hold the small per-row arrays in memory; ``embeddings`` is
    the h5py dataset (lazy, sliceable); :meth:`load_embeddings` reads rows into memory.

    Attributes:
        path: the file.
        metadata: every file attribute (schema version, backbone, weights sha256, transform, ...).
        classes: class names; ``labels`` index into them.
        paths: relative image paths, one per row.
        labels: int64 labels, -1 for unlabelled rows.
        splits: int8 split codes into ``SPLIT_NAMES``, -1 for rows with no split.
        skipped: ``[(path, reason), ...]`` for files that could not be read.
    """

    def __init__(self, path: str | os.PathLike, *, extreme: str = "raise", allow_incomplete: bool = False):
        if extreme not in EXTREME_POLICIES:
            raise ConfigError(f"The 'extreme' parameter must be one of {EXTREME_POLICIES}. Got {extreme!r} instead.")
        self.path = Path(path)
        self.extreme = extreme
        #: Rows already reported as extreme (``extreme='warn'`` warns once per row).
        self.extreme_rows: set[int] = set()
        self._file = open_cache_file(self.path)
        self._readers: dict[str, RowReader] = {}
        try:
            self._read_small(allow_incomplete)
        except BaseException:
            self._file.close()
            raise

    def _read_small(self, allow_incomplete: bool) -> None:
        f, path = self._file, self.path
        check = validate_cache(path, f, allow_incomplete=allow_incomplete)  # every check, before any row is read
        self.metadata: dict[str, Any] = check.metadata
        self._split_names = check.split_names
        self._parts: list[PartInfo] = check.parts
        self._parts_dir: Path | None = check.parts_dir
        self._features: FeatureSpec = check.features
        root = self.metadata.get("root")
        # Public: plain h5py (the virtual dataset for v2). featbank's own reads go through _reader().
        self.embeddings: h5py.Dataset = f["embeddings"]
        self.labels, self.splits = check.labels, check.splits
        try:
            self.paths = decode_attr(f["paths"][...])
            self.fingerprints = f["fingerprints"][...].astype(np.int64)
        except OSError as e:  # a part whose table entry matches it but whose data is cut short
            raise damaged_part_error(path, self._parts_dir, self._parts, e, root) from None
        self.classes = decode_attr(f["classes"][...])
        sk = f.get("skipped")
        self.skipped: list[tuple[str, str]] = (
            list(zip(decode_attr(sk["paths"][...]), decode_attr(sk["reasons"][...]))) if sk is not None else []
        )
        self.skipped_fingerprints = (
            sk["fingerprints"][...].astype(np.int64).reshape(-1, 2) if sk is not None else np.zeros((0, 2), np.int64)
        )
        if check.listed:  # schema v2: rows refused while listing a manifest or tars
            self.skipped += [(k, r) for k, r, _ in check.listed]
            extra = np.array([fp for *_, fp in check.listed], np.int64).reshape(-1, 2)
            self.skipped_fingerprints = np.concatenate([self.skipped_fingerprints, extra])

    # -- convenience -------------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def cache_key(self) -> str:
        return str(self.metadata.get("cache_key", ""))

    @property
    def root(self) -> Path:
        return Path(str(self.metadata.get("root", "")))

    @property
    def split_names(self) -> tuple[str, ...]:
        return self._split_names

    def has_split(self, name: str) -> bool:
        return bool(np.any(self.split_mask(name)))

    def split_mask(self, name: str) -> np.ndarray:
        """Boolean row mask of split ``name`` (``train``, ``val`` or ``test``)."""
        names = self.split_names
        if name not in names:
            raise ValueError(f"Unknown split {name!r}; expected one of {names}.")
        return self.splits == names.index(name)

    def load_embeddings(self, rows: np.ndarray | Sequence[int] | None = None, dtype=np.float32) -> np.ndarray:
        """Read embeddings into memory: all rows, or the given row indices / boolean mask."""
        if rows is None:
            return self._read_sorted(np.arange(self.n_samples), dtype)
        uniq, inverse = _sorted_unique(rows, self.n_samples)
        out = self._read_sorted(uniq, dtype) if uniq.size else np.zeros((0, self.embed_dim), dtype)
        return out if inverse is None else out[inverse]

    def _reader(self, name: str) -> RowReader:
        """featbank's reader of a per-row dataset: straight from the parts where it can (see ``_direct``)."""
        if name not in self._readers:
            self._readers[name] = RowReader(self._file[name], self._parts_dir, self._parts)
        return self._readers[name]

    def _read_sorted(self, rows: np.ndarray, dtype: Any) -> np.ndarray:
        """Embedding rows ``rows`` (sorted), values checked (NaN/inf, extreme: ``check_rows``)."""
        out = np.empty((len(rows), self.embed_dim), dtype)
        suspect = self._reader("embeddings").read_rows(rows, out)
        if suspect:  # the blocks the one-pass test could not clear, checked exactly, in one message
            at = np.concatenate([np.arange(s.start, s.stop) for s in suspect])
            check_rows(self, rows[at], out[at], self.extreme)
        return out

    def iter_chunks(self, rows: np.ndarray, chunk_rows: int, dtype=np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row_indices, embeddings)`` in chunks of at most ``chunk_rows`` sorted rows."""
        rows = np.sort(np.asarray(rows).reshape(-1))
        _check_range(rows, self.n_samples)
        for start in range(0, len(rows), chunk_rows):
            idx = rows[start : start + chunk_rows]
            yield idx, self._read_sorted(idx, dtype)

    # -- layers and views (``featbank extract --layers / --views``) ------------------------------
    @property
    def layers(self) -> tuple[str, ...]:
        """The layers the cache holds, in network order, ending with ``final`` (``embeddings``)."""
        return self._features.layers

    @property
    def layer_dims(self) -> dict[str, int]:
        """``{layer: number of pooled values}``."""
        return dict(self._features.layer_dims)

    @property
    def pooling(self) -> str:
        return self._features.pooling

    @property
    def n_views(self) -> int:
        """K, the augmented views stored per image besides the plain one (0: none)."""
        return self._features.n_views

    @property
    def augment(self) -> str:
        """How the views were made: ``hflip``, ``dihedral``, ``crops``, or ``""``."""
        return self._features.augment

    @property
    def view_seed(self) -> int:
        return self._features.view_seed

    def _read_layer(self, tap: str, view: int | None, rows: np.ndarray, dtype: Any) -> np.ndarray:
        if tap == "final" and view is None:
            return self._read_sorted(rows, dtype)
        name = dataset_name(tap, view is not None)
        out = np.empty((len(rows), self._features.layer_dims[tap]), dtype)
        suspect = self._reader(name).read_rows(rows, out, column=view)
        if suspect:
            at = np.concatenate([np.arange(s.start, s.stop) for s in suspect])
            check_block(self, name, rows[at], out[at])
        return out

    def load_features(self, rows: np.ndarray | Sequence[int] | None = None, layers: str | Sequence[str] = ("final",),
                      view: int | None = None, dtype: Any = np.float32) -> np.ndarray:
        """Read the features of ``layers`` into memory, concatenated in the order given.

        Args:
            rows: row indices or a boolean mask; ``None`` for every row.
            layers: names from :attr:`layers` (``"final"`` is ``embeddings``), a comma-separated
                string, or ``"all"``.
            view: ``None`` for the plain view; ``k`` (0-based) for the k-th augmented view.
            dtype: of the result.

        Returns:
            ``(n, sum of layer_dims[layer])`` array.

        Raises:
            ConfigError: a layer or view the cache does not hold (the message lists what it holds).
            CacheError: NaN/inf (or extreme, see ``open_cache``) values in the rows read.

        Example:
            >>> X = cache.load_features(cache.split_mask("train"), layers=("stage5", "final"))
        """
        wanted = parse_requested(self._features, layers, view)
        uniq, inverse = _sorted_unique(np.arange(self.n_samples) if rows is None else rows, self.n_samples)
        if uniq.size == 0:
            return np.zeros((0, sum(self._features.layer_dims[t] for t in wanted)), dtype)
        cols = [self._read_layer(t, view, uniq, dtype) for t in wanted]
        out = cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)
        return out if inverse is None else out[inverse]

    def iter_feature_chunks(self, rows: np.ndarray, chunk_rows: int, layers: str | Sequence[str] = ("final",),
                            view: int | None = None, dtype: Any = np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row_indices, features)`` in chunks of at most ``chunk_rows`` sorted rows (see :meth:`load_features`)."""
        parse_requested(self._features, layers, view)
        rows = np.sort(np.asarray(rows).reshape(-1))
        _check_range(rows, self.n_samples)
        for start in range(0, len(rows), chunk_rows):
            idx = rows[start : start + chunk_rows]
            yield idx, self.load_features(idx, layers, view, dtype)

    def abspath(self, rel: str) -> Path:
        return self.root / rel

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        try:
            self._file.close()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n_samples

    def __repr__(self) -> str:
        return (
            f"FeatureCache({str(self.path)!r}, n_samples={self.n_samples}, embed_dim={self.embed_dim}, "
            f"n_classes={self.n_classes}, backbone={self.metadata.get('backbone')!r})"
        )


def _sorted_unique(rows: np.ndarray | Sequence[int], n_samples: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Row indices or a boolean mask as sorted unique indices, and how to put them back in the order
    asked (None: already sorted and unique, the common case, which then costs no copy)."""
    rows = np.asarray(rows)
    if rows.dtype == bool:
        rows = np.flatnonzero(rows)
    rows = rows.reshape(-1)
    if rows.size and rows.dtype.kind not in "iu":
        raise IndexError(f"row indices must be integers or a boolean mask; got an array of {rows.dtype}")
    if rows.size < 2 or bool(np.all(rows[1:] > rows[:-1])):
        uniq, inverse = rows.astype(np.int64, copy=False), None
    else:
        uniq, inverse = np.unique(rows, return_inverse=True)
        inverse = inverse.reshape(-1)
    _check_range(uniq, n_samples)
    return uniq, inverse


def _check_range(sorted_rows: np.ndarray, n_samples: int) -> None:
    if sorted_rows.size and (sorted_rows[0] < 0 or sorted_rows[-1] >= n_samples):
        raise IndexError(f"row indices must lie in [0, {n_samples}); got {sorted_rows[0]}..{sorted_rows[-1]}")
