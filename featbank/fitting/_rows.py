"""Rows of a cache for fitting: open it, split train/val/test, sample K shots, read or stream embeddings."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CacheError, ConfigError
from ..splits import n_holdout, stratified_holdout

if TYPE_CHECKING:
    from ..cache import FeatureCache

__all__ = ["parse_memory", "opened_cache", "check_finite", "split_rows", "check_classes", "CacheRows"]


#: The largest --max-memory accepted (1 EiB): past it the value is a typo, not a machine.
MAX_MEMORY = 1 << 60


def _memory_bytes(value: float | int, text: Any) -> int:
    if not (1 <= value <= MAX_MEMORY) or not math.isfinite(value):  # NaN fails the range, 10**400 never becomes a float
        raise ConfigError(f"--max-memory must be a finite size from 1 byte to 1 EiB ({MAX_MEMORY} bytes), such as "
                          f"2GB; got {text!r}.")
    return int(value)


def parse_memory(text: str | int | float | None) -> int | None:
    """``"2GB"``, ``"512MiB"``, ``"1e9"`` -> bytes.

    Raises:
        ConfigError: not a size, or not a positive finite number of bytes up to :data:`MAX_MEMORY`
            (``1e400GB``, ``nan``, ``inf``, negative).
    """
    if text is None:
        return None
    if isinstance(text, bool):
        raise ConfigError(f"--max-memory must look like 2GB, 512MB or a number of bytes; got {text!r}.")
    if isinstance(text, (int, float)):
        return _memory_bytes(text, text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?[bB]?)\s*", str(text))
    if not m:
        raise ConfigError(f"--max-memory must look like 2GB, 512MB or a number of bytes; got {text!r}.")
    try:
        value = float(m.group(1))
    except ValueError:
        raise ConfigError(f"--max-memory must look like 2GB, 512MB or a number of bytes; got {text!r}.") from None
    base = 1024 if m.group(3).lower().startswith("i") else 1000
    mult = {"": 1, "k": base, "m": base**2, "g": base**3, "t": base**4}[m.group(2).lower()]
    return _memory_bytes(value * mult, text)


@contextlib.contextmanager
def opened_cache(cache: FeatureCache) -> Iterator[tuple[Any, Path]]:
    """``(FeatureCache, path)`` of a cache argument: an open cache as given, else the file opened
    (``None``: the most recent cache in the default folder) and closed again on exit."""
    from ..cache import FeatureCache, find_latest_cache, open_cache

    if isinstance(cache, FeatureCache):
        yield cache, cache.path
        return
    path = Path(cache) if cache is not None else find_latest_cache()
    if path.is_dir():
        raise CacheError(f"{str(path)!r} is a folder; pass a cache file written by 'featbank extract' (an .h5 file).")
    cache_obj = open_cache(path)
    try:
        yield cache_obj, path
    finally:
        cache_obj.close()


def check_finite(feats: Any, cache: FeatureCache, rows: np.ndarray) -> None:
    for pos, x in feats.chunks():
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            r = int(rows[pos[np.flatnonzero(bad)[0]]]) if rows is not None else int(pos[np.flatnonzero(bad)[0]])
            where = cache.paths[r] if cache is not None else f"row {r}"
            raise CacheError(
                f"The cache has NaN or infinite embeddings ({int(bad.sum())} in one chunk; first: {where!r}). "
                "Re-extract with 'featbank extract DATA --overwrite' (with --dtype float32 if it was float16)."
            )


def split_rows(cache: FeatureCache, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(train rows, val rows, test rows, where val came from)."""
    labels = cache.labels
    labelled = labels >= 0
    if not labelled.any():
        raise CacheError(
            f"Cache {str(cache.path)!r} has no labels (it was extracted from a flat folder of images). "
            "Fitting needs an ImageFolder: DATA/<class>/<image>. Re-extract a labelled folder."
        )
    names = cache.split_names
    splits = cache.splits
    test = np.flatnonzero(labelled & (splits == names.index("test"))) if "test" in names else np.zeros(0, np.int64)
    val = np.flatnonzero(labelled & (splits == names.index("val"))) if "val" in names else np.zeros(0, np.int64)
    pool = np.setdiff1d(np.flatnonzero(labelled), np.concatenate([test, val]))
    check_classes(cache, np.concatenate([pool, val]), "train+val")
    if len(val):
        return pool, val, test, "val split of the cache"
    if not 0.0 < val_split < 1.0:
        raise ConfigError(f"--val-split must be between 0 and 1 (exclusive); got {val_split!r}.")
    y = labels[pool]
    n_classes = len(np.unique(y))
    n_val = n_holdout(len(pool), n_classes, val_split)
    if len(pool) - n_val < n_classes:
        raise ConfigError(
            f"Too few labelled training images ({len(pool)}) to hold out a stratified validation split of "
            f"{val_split} for {n_classes} classes. Add images, or use a cache with a val/ split folder."
        )
    tr, va = stratified_holdout(pool, y, n_val, seed)
    return tr, va, test, f"stratified {val_split:g} of train (seed {seed})"


def check_classes(cache: FeatureCache, rows: np.ndarray, what: str) -> None:
    counts = np.bincount(cache.labels[rows], minlength=len(cache.classes))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        only = cache.classes[present[0]] if len(present) else "(none)"
        raise ConfigError(
            f"The {what} rows of {str(cache.path)!r} hold a single class ({only!r}); a classifier needs at "
            "least 2 classes. Add a folder per class: DATA/<class>/<image>."
        )
    few = [(cache.classes[i], int(counts[i])) for i in range(len(counts)) if 0 < counts[i] < 2]
    if few:
        listed = ", ".join(f"{c!r} ({n})" for c, n in few[:10])
        raise ConfigError(
            f"Each class needs at least 2 training images; these have fewer: {listed}. Add images or remove "
            "those class folders, then re-run 'featbank extract'."
        )


class CacheRows:
    """Embedding rows of a cache as :class:`Features`: read once into memory (``chunk_rows`` None),
    or streamed from the file in chunks."""

    def __init__(self, cache: FeatureCache, rows: np.ndarray, chunk_rows: int | None):
        self.cache, self.chunk_rows = cache, chunk_rows
        self.rows = np.sort(rows)
        self.X = cache.load_embeddings(self.rows) if chunk_rows is None else None

    def __call__(self, rows: np.ndarray) -> Any:
        from ..heads import Features

        rows = np.sort(rows)
        if self.X is None:
            return Features(cache=self.cache, rows=rows, chunk_rows=self.chunk_rows)
        if len(rows) == len(self.rows) and np.array_equal(rows, self.rows):
            return Features(self.X)
        pos = np.searchsorted(self.rows, rows)
        if len(rows) and (pos[-1] >= len(self.rows) or not np.array_equal(self.rows[pos], rows)):
            raise RuntimeError("internal error: rows requested that were not read")
        return Features(self.X[pos])

    def check_finite(self) -> None:
        from ..heads import Features

        feats = Features(self.X) if self.X is not None else Features(cache=self.cache, rows=self.rows,
                                                                      chunk_rows=self.chunk_rows)
        check_finite(feats, self.cache, self.rows)
