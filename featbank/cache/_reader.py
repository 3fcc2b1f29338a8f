"""Reading a cache: :class:`FeatureCache`, lazy on the embeddings, and :func:`open_cache`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from .. import __version__
from ..errors import CacheError
from ._discovery import find_latest_cache
from ._schema import _FORMAT, SCHEMA_VERSION, SPLIT_NAMES, _decode

__all__ = ["FeatureCache", "open_cache"]


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

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(
                f"Cache {str(self.path)!r} does not exist. Run 'featbank extract DATA --out "
                f"{self.path}' first."
            )
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise CacheError(
                f"{str(self.path)!r} is not a readable HDF5 file ({e}). Re-create it with "
                "'featbank extract DATA --overwrite'."
            ) from None
        f = self._file
        if f.attrs.get("format") != _FORMAT:
            self._file.close()
            raise CacheError(
                f"{str(self.path)!r} is an HDF5 file but not a featbank cache (no "
                f"format={_FORMAT!r} attribute). Point at a file written by 'featbank extract'."
            )
        version = int(f.attrs.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            self._file.close()
            raise CacheError(
                f"{str(self.path)!r} has cache schema version {version}; this featbank "
                f"({__version__}) reads version {SCHEMA_VERSION}. Re-extract with "
                "'featbank extract DATA --overwrite'."
            )
        self.metadata: dict[str, Any] = {}
        for k, v in f.attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            if isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, str) and k in ("transform", "engines"):
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            self.metadata[k] = v
        self.embeddings: h5py.Dataset = f["embeddings"]
        self.labels = f["labels"][...].astype(np.int64)
        self.splits = f["splits"][...].astype(np.int8)
        self.paths = _decode(f["paths"][...])
        self.fingerprints = f["fingerprints"][...].astype(np.int64)
        self.classes = _decode(f["classes"][...])
        sk = f.get("skipped")
        self.skipped: list[tuple[str, str]] = (
            list(zip(_decode(sk["paths"][...]), _decode(sk["reasons"][...]))) if sk is not None else []
        )
        self.skipped_fingerprints = (
            sk["fingerprints"][...].astype(np.int64) if sk is not None else np.zeros((0, 2), np.int64)
        )

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
        return tuple(json.loads(self.metadata.get("split_names", json.dumps(SPLIT_NAMES))))

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
            return self.embeddings[...].astype(dtype, copy=False)
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if rows.size == 0:
            return np.zeros((0, self.embed_dim), dtype)
        uniq, inverse = np.unique(rows, return_inverse=True)
        if uniq[0] < 0 or uniq[-1] >= self.n_samples:
            raise IndexError(f"row indices must lie in [0, {self.n_samples}); got {uniq[0]}..{uniq[-1]}")
        return self._read_sorted(uniq, dtype)[inverse.reshape(-1)]

    def _read_sorted(self, rows: np.ndarray, dtype: Any, block_rows: int = 1 << 14) -> np.ndarray:
        # h5py's point selection is slow for many rows: read contiguous slabs and pick in numpy.
        out = np.empty((len(rows), self.embed_dim), dtype)
        pos = 0
        while pos < len(rows):
            lo = int(rows[pos])
            end = int(np.searchsorted(rows, lo + block_rows, side="left"))
            hi = int(rows[end - 1]) + 1
            if (np.dtype(dtype) == self.embeddings.dtype and hi - lo == end - pos
                    and bool(np.all(np.diff(rows[pos:end]) == 1))):
                self.embeddings.read_direct(out, np.s_[lo:hi], np.s_[pos:end])  # contiguous: no copy
            else:
                slab = self.embeddings[lo:hi]
                out[pos:end] = slab[rows[pos:end] - lo]
            pos = end
        return out

    def iter_chunks(self, rows: np.ndarray, chunk_rows: int, dtype=np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row_indices, embeddings)`` in chunks of at most ``chunk_rows`` sorted rows."""
        rows = np.sort(np.asarray(rows))
        for start in range(0, len(rows), chunk_rows):
            idx = rows[start : start + chunk_rows]
            yield idx, self._read_sorted(idx, dtype)

    def abspath(self, rel: str) -> Path:
        return self.root / rel

    def close(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> "FeatureCache":
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


def open_cache(path: str | os.PathLike | None = None) -> FeatureCache:
    """Open a featbank cache for reading; with no path, the latest one in the default folder.

    Raises:
        CacheError: missing, unreadable, not a featbank cache, or of another schema version.

    Example:
        >>> with open_cache("runs/elpv.h5") as cache:
        ...     X = cache.load_embeddings(cache.split_mask("train"))
    """
    return FeatureCache(path if path is not None else find_latest_cache())
