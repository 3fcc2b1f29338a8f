"""The cache format's constants and its key: the schema featbank writes (v2), the sha256 over what changes an embedding.

Schema v1 (one file, no parts) is read too; what is particular to it lives in ``_legacy``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

# FORMAT, STR_DTYPE and decode_attr are shared by the reader and the writer, which must agree on them.
__all__ = ["SCHEMA_VERSION", "SPLIT_NAMES", "EMBEDDING_VERSION", "FEATURE_DEFAULTS", "compute_cache_key",
           "describe_feature_difference", "feature_settings", "FORMAT", "STR_DTYPE", "decode_attr"]

#: The schema featbank writes: an index over part files (``_index``, ``_parts``).
SCHEMA_VERSION = 2
SPLIT_NAMES = ("train", "val", "test")
FORMAT = "featbank-cache"
STR_DTYPE = h5py.string_dtype("utf-8")
# The embedding computation of this featbank line; bump when extraction changes numerically.
EMBEDDING_VERSION = "1"


#: The feature settings of a plain cache (the embedding alone, no augmented views). A cache with
#: exactly these keeps the key it had before layers and views existed.
FEATURE_DEFAULTS: dict[str, Any] = {"layers": ["final"], "pooling": "gap+2x2", "views": 0, "augment": "", "view_seed": 0}


def compute_cache_key(identity: dict[str, Any], dtype: str, precision: str, features: dict[str, Any] | None = None,
                      decode: str = "pillow") -> str:
    """sha256 over everything that changes an embedding.

    That is: backbone name, weights name and sha256, the transform, the stored dtype, the compute
    precision, and the embedding version of featbank. Batch size, device, worker count and engine
    (torch or onnxruntime agree within 1e-4) are recorded but not keyed. ``features`` (layers,
    pooling, views, augment, view_seed) is keyed only when it differs from
    :data:`FEATURE_DEFAULTS`, so a plain cache keeps its key. ``decode`` (``gpu``: JPEGs decoded and
    resized as tensors, ``extract --decode``) is keyed only when it is not ``pillow``, for the same reason.
    """
    payload = {
        "schema_version": 1,  # frozen: every cache key since the first schema would change otherwise
        "embedding_version": EMBEDDING_VERSION,
        "backbone": identity["backbone"],
        "weights": identity["weights"],
        "weights_sha256": identity["weights_sha256"],
        "transform": identity["transform"],
        "dtype": dtype,
        "precision": precision,
    }
    if features is not None and _normal(features) != FEATURE_DEFAULTS:
        payload["features"] = _normal(features)
    if decode != "pillow":
        payload["decode"] = decode
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def decode_attr(arr: np.ndarray) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in arr]


def _normal(features: dict[str, Any]) -> dict[str, Any]:
    out = {**FEATURE_DEFAULTS, **{k: v for k, v in features.items() if k in FEATURE_DEFAULTS}}
    out["layers"] = [str(t) for t in out["layers"]]
    out["views"], out["view_seed"] = int(out["views"]), int(out["view_seed"])
    out["augment"] = str(out["augment"] or "")
    if out["views"] == 0:  # without views, the augmentation settings change nothing
        out["augment"], out["view_seed"] = "", 0
    if out["layers"] == ["final"]:
        out["pooling"] = FEATURE_DEFAULTS["pooling"]
    return out


def _feature_attr(attrs: Mapping[str, Any], name: str) -> Any:
    v = attrs.get(name, None)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        v = v.item()
    if name == "layers" and isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return None
    return FEATURE_DEFAULTS[name] if v is None else v


def feature_settings(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The layers/views settings a cache's attributes record (defaults where absent); None when unreadable."""
    try:
        return _normal({k: _feature_attr(attrs, k) for k in FEATURE_DEFAULTS})
    except (TypeError, ValueError):
        return None


def describe_feature_difference(attrs: Mapping[str, Any], wanted: dict[str, Any]) -> str:
    """How the layers/views a cache holds (its attributes) differ from ``wanted``; "" when they agree.

    Example: ``"the cache holds layers final; you asked stage3,final"``.
    """
    try:
        have = _normal({k: _feature_attr(attrs, k) for k in FEATURE_DEFAULTS})
    except (TypeError, ValueError):
        return "the cache's layer/view attributes are unreadable"
    want = _normal(wanted)
    out = []
    for k, what in (("layers", "layers"), ("pooling", "pooling"), ("views", "views"), ("augment", "augment"),
                    ("view_seed", "view seed")):
        if have[k] != want[k]:
            h, w = (",".join(have[k]), ",".join(want[k])) if k == "layers" else (str(have[k]), str(want[k]))
            out.append(f"the cache holds {what} {h or 'none'}; you asked {w or 'none'}")
    return "; ".join(out)
