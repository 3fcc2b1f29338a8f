"""Schema v1 of the cache file and its key: format constants, the sha256 over what changes an embedding."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import h5py
import numpy as np

# _FORMAT, _STR and _decode are shared by the reader and the writer, which must agree on them.
__all__ = ["SCHEMA_VERSION", "SPLIT_NAMES", "EMBEDDING_VERSION", "compute_cache_key", "_FORMAT", "_STR", "_decode"]

SCHEMA_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
_FORMAT = "featbank-cache"
_STR = h5py.string_dtype("utf-8")
# The embedding computation of this featbank line; bump when extraction changes numerically.
EMBEDDING_VERSION = "1"


def compute_cache_key(identity: dict[str, Any], dtype: str, precision: str) -> str:
    """sha256 over everything that changes an embedding.

    That is: backbone name, weights name and sha256, the transform, the stored dtype, the compute
    precision, and the embedding version of featbank. Batch size, device, worker count and engine
    (torch or onnxruntime agree within 1e-4) are recorded but not keyed.
    """
    payload = {
        "schema_version": SCHEMA_VERSION,
        "embedding_version": EMBEDDING_VERSION,
        "backbone": identity["backbone"],
        "weights": identity["weights"],
        "weights_sha256": identity["weights_sha256"],
        "transform": identity["transform"],
        "dtype": dtype,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _decode(arr: np.ndarray) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in arr]
