"""The layers and views of a cache: their attributes checked on open, their rows read and checked.

A cache extracted with ``--layers`` / ``--views`` holds, besides ``embeddings`` (the plain view's
``final`` features), ``layers/<tap>`` ``(N, D_tap)``, ``views/embeddings`` ``(N, K, D)`` and
``views/layers/<tap>`` ``(N, K, D_tap)``, described by the root attributes ``layers``,
``layer_dims`` (JSON), ``pooling``, ``views``, ``augment`` and ``view_seed``. Opening checks that
attributes and datasets agree; values are checked (NaN/inf refused) as rows are read, like the
embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CacheError, ConfigError
from ..features import FeatureSpec, FeatureSpecError
from ._validate import EXTREME_VALUE, OpenCache, recreate_hint

__all__ = ["read_features", "feature_dataset_names", "dataset_name", "parse_requested",
           "check_block"]

def dataset_name(tap: str, view: bool) -> str:
    """The dataset of a tap: ``embeddings`` / ``layers/<tap>``, under ``views/`` for the augmented views."""
    base = "embeddings" if tap == "final" else f"layers/{tap}"
    return f"views/{base}" if view else base


def feature_dataset_names(feats: FeatureSpec) -> list[str]:
    """Every per-row dataset of the layers and views (not ``embeddings`` itself)."""
    names = [dataset_name(t, False) for t in feats.layers if t != "final"]
    if feats.n_views:
        names += [dataset_name(t, True) for t in feats.layers]
    return names


def _fail(path: Path, what: str, root: Any) -> CacheError:
    return CacheError(f"Cache '{path}' is damaged: {what}. {recreate_hint(path, root)}")


def _attr(f: h5py.File, name: str) -> Any:
    v = f.attrs.get(name)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return v.item() if isinstance(v, np.generic) else v


_ATTRS = ("layers", "layer_dims", "pooling", "views", "augment", "view_seed")


def _read_attrs(path: Path, f: h5py.File, embed_dim: int, root: Any) -> FeatureSpec:
    attrs = {name: _attr(f, name) for name in _ATTRS if name in f.attrs}
    try:
        return FeatureSpec.from_attrs(attrs, embed_dim)
    except FeatureSpecError as e:
        raise _fail(path, f"attribute {e.field!r} is {e.value!r}, expected {e.want}", root) from None


def _check_datasets(path: Path, f: h5py.File, feats: FeatureSpec, n: int, root: Any) -> None:
    for tap in feats.layers:
        for view in (False, True) if feats.n_views else (False,):
            if tap == "final" and not view:
                continue
            name = dataset_name(tap, view)
            ds = f.get(name)
            want = (n, feats.n_views, feats.layer_dims[tap]) if view else (n, feats.layer_dims[tap])
            if not isinstance(ds, h5py.Dataset):
                raise _fail(path, f"dataset '{name}' is missing (attribute 'layers' lists {tap!r}"
                            f"{', views ' + str(feats.n_views) if view else ''})", root)
            if ds.shape != want or ds.dtype.kind != "f":
                raise _fail(path, f"dataset '{name}' has shape {ds.shape} and dtype {ds.dtype}, expected {want} "
                            "floats (from the attributes 'layers', 'layer_dims' and 'views' and the row count)", root)
    listed = set(feature_dataset_names(feats))
    for group in ("layers", "views/layers", "views"):
        g = f.get(group)
        if isinstance(g, h5py.Group):
            extra = sorted(f"{group}/{k}" for k, v in g.items() if isinstance(v, h5py.Dataset))
            unlisted = [e for e in extra if e not in listed]
            if unlisted:
                raise _fail(path, f"dataset '{unlisted[0]}' is not described by the attributes 'layers' / 'views' "
                            f"(layers {list(feats.layers)}, views {feats.n_views})", root)


def read_features(path: Path, f: h5py.File, embed_dim: int, n: int, root: Any) -> FeatureSpec:
    """The layers/views of an open cache, attributes and dataset shapes checked.

    Raises:
        CacheError: an attribute is malformed or disagrees with the datasets (the message names both).
    """
    feats = _read_attrs(path, f, embed_dim, root)
    _check_datasets(path, f, feats, n, root)
    return feats


def parse_requested(feats: FeatureSpec, layers: str | Sequence[str] | None, view: int | None) -> list[str]:
    """The requested layers as a list (``"all"``, a comma-separated string or names), checked against the cache."""
    if layers is None:
        wanted = ["final"]
    elif isinstance(layers, str):
        wanted = list(feats.layers) if layers == "all" else [s.strip() for s in layers.split(",")]
    else:
        wanted = [str(t) for t in layers]
    bad = [t for t in wanted if t not in feats.layers]
    if bad or not wanted:
        raise ConfigError(f"The cache holds layers {', '.join(feats.layers)}; got {layers!r}. Extract the others with "
                          "'featbank extract DATA --layers ...' (a new cache key: another --out, or --overwrite).")
    if view is not None and (isinstance(view, bool) or not isinstance(view, int) or not 0 <= view < feats.n_views):
        held = f"views 0..{feats.n_views - 1}" if feats.n_views else "no augmented views"
        raise ConfigError(f"The 'view' parameter must be None (the plain view) or an augmented view of the cache, "
                          f"which holds {held}. Got {view!r} instead.")
    return wanted


def check_block(cache: OpenCache, name: str, rows: np.ndarray, block: np.ndarray) -> None:
    """Refuse NaN/inf (always) and extreme values (per ``cache.extreme``) in a block of ``name``."""
    if block.size == 0:
        return
    peak = np.abs(block.reshape(len(block), -1)).max(axis=1)
    bad = rows[~np.isfinite(peak)]
    hint = recreate_hint(cache.path, cache.metadata.get("root"))
    if bad.size:
        raise CacheError(f"Cache '{cache.path}' is damaged: dataset '{name}' has NaN or infinite values in {bad.size} "
                         f"row(s) of this read, e.g. row {int(bad[0])} ({cache.paths[int(bad[0])]!r}). {hint}")
    if cache.extreme != "raise":
        return
    bad = rows[peak > EXTREME_VALUE]
    if bad.size:
        raise CacheError(f"Cache '{cache.path}': dataset '{name}' has {bad.size} row(s) with values beyond "
                         f"+-{EXTREME_VALUE:g}, e.g. row {int(bad[0])} ({cache.paths[int(bad[0])]!r}). Re-extract "
                         "('featbank extract DATA --overwrite'), or open_cache(path, extreme='warn') to read them anyway.")
