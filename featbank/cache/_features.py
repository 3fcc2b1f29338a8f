"""The layers and views of a cache: their attributes checked on open, their rows read and checked.

A cache extracted with ``--layers`` / ``--views`` holds, besides ``embeddings`` (the plain view's
``final`` features), ``layers/<tap>`` ``(N, D_tap)``, ``views/embeddings`` ``(N, K, D)`` and
``views/layers/<tap>`` ``(N, K, D_tap)``, described by the root attributes ``layers``,
``layer_dims`` (JSON), ``pooling``, ``views``, ``augment`` and ``view_seed``. Opening checks that
attributes and datasets agree; values are checked (NaN/inf refused) as rows are read, like the
embeddings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CacheError, ConfigError
from ._validate import EXTREME_VALUE, OpenCache, recreate_hint

__all__ = ["CacheFeatures", "read_features", "feature_dataset_names", "dataset_name", "parse_requested",
           "check_block"]

_AUGMENTS = ("hflip", "dihedral", "crops")
_POOLINGS = ("gap+2x2", "gap")


@dataclass(frozen=True)
class CacheFeatures:
    """What a cache holds besides the plain embedding (all defaults for a plain cache)."""

    layers: tuple[str, ...] = ("final",)
    layer_dims: dict[str, int] = field(default_factory=dict)
    pooling: str = "gap+2x2"
    n_views: int = 0
    augment: str = ""
    view_seed: int = 0


def dataset_name(tap: str, view: bool) -> str:
    """The dataset of a tap: ``embeddings`` / ``layers/<tap>``, under ``views/`` for the augmented views."""
    base = "embeddings" if tap == "final" else f"layers/{tap}"
    return f"views/{base}" if view else base


def feature_dataset_names(feats: CacheFeatures) -> list[str]:
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


def _json(f: h5py.File, name: str) -> Any:
    v = _attr(f, name)
    try:
        return json.loads(v) if isinstance(v, str) else None
    except ValueError:
        return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_attrs(path: Path, f: h5py.File, embed_dim: int, root: Any) -> CacheFeatures:
    layers = _json(f, "layers") if "layers" in f.attrs else ["final"]
    if (not isinstance(layers, list) or not layers or not all(isinstance(t, str) and t and "/" not in t for t in layers)
            or len(set(layers)) != len(layers) or layers[-1] != "final"):
        raise _fail(path, f"attribute 'layers' is {_attr(f, 'layers')!r}, expected a JSON list of distinct layer "
                    "names ending with \"final\"", root)
    dims = _json(f, "layer_dims") if "layer_dims" in f.attrs else {"final": embed_dim}
    if (not isinstance(dims, dict) or set(dims) != set(layers)
            or not all(_is_int(d) and d > 0 for d in dims.values())):
        raise _fail(path, f"attribute 'layer_dims' is {_attr(f, 'layer_dims')!r}, expected a JSON object giving a "
                    f"positive size for each of the layers {layers}", root)
    if dims["final"] != embed_dim:
        raise _fail(path, f"attribute 'layer_dims' gives 'final' {dims['final']} values, but 'embeddings' has "
                    f"{embed_dim}", root)
    pooling = _attr(f, "pooling") if "pooling" in f.attrs else "gap+2x2"
    if pooling not in _POOLINGS:
        raise _fail(path, f"attribute 'pooling' is {pooling!r}, expected one of {_POOLINGS}", root)
    views = _attr(f, "views") if "views" in f.attrs else 0
    augment = _attr(f, "augment") if "augment" in f.attrs else ""
    seed = _attr(f, "view_seed") if "view_seed" in f.attrs else 0
    if not _is_int(views) or views < 0 or not _is_int(seed):
        raise _fail(path, f"attributes 'views' / 'view_seed' are {views!r} / {seed!r}, expected integers >= 0", root)
    if (views > 0) != (augment in _AUGMENTS) or (views == 0 and augment not in ("", None)):
        raise _fail(path, f"attributes 'views' = {views} and 'augment' = {augment!r} disagree (views need one of "
                    f"{_AUGMENTS}; no views, no augmentation)", root)
    return CacheFeatures(tuple(layers), {t: int(dims[t]) for t in layers}, str(pooling), int(views), str(augment or ""),
                         int(seed))


def _check_datasets(path: Path, f: h5py.File, feats: CacheFeatures, n: int, root: Any) -> None:
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


def read_features(path: Path, f: h5py.File, embed_dim: int, n: int, root: Any) -> CacheFeatures:
    """The layers/views of an open cache, attributes and dataset shapes checked.

    Raises:
        CacheError: an attribute is malformed or disagrees with the datasets (the message names both).
    """
    feats = _read_attrs(path, f, embed_dim, root)
    _check_datasets(path, f, feats, n, root)
    return feats


def parse_requested(feats: CacheFeatures, layers: str | Sequence[str] | None, view: int | None) -> list[str]:
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
    if view is not None and (not _is_int(view) or not 0 <= view < feats.n_views):
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
