"""The HDF5 feature cache: schema v1, cache key, crash-safe staging, and a lazy reader.

Layout of a cache file (readable with plain h5py; see README "Cache format"):

==========================  ==================  ============================================
dataset                     shape, dtype        meaning
==========================  ==================  ============================================
``embeddings``              (N, D) f4 or f2     one row per image, chunked, resizable
``labels``                  (N,) i8             class index, -1 for unlabelled
``paths``                   (N,) UTF-8 str      path relative to the data root, sorted
``splits``                  (N,) i1             index into attr ``split_names``, -1 = none
``fingerprints``            (N, 2) i8           (size in bytes, mtime in ns) of the file
``classes``                 (C,) UTF-8 str      class names, index = label
``skipped/paths``           (M,) UTF-8 str      files that could not be read
``skipped/reasons``         (M,) UTF-8 str      why, in a few words
``skipped/fingerprints``    (M, 2) i8           their fingerprints (retried when they change)
==========================  ==================  ============================================

Crash safety: the file at ``path`` is only ever replaced whole (written to a temporary file in the
same folder, fsync'ed, then ``os.replace``). New embeddings of a run go to a staging file
``<path>.partial`` whose datasets are allocated in full when it is created, so writing rows
touches no HDF5 metadata; a row's ``status`` flag is set only after its embedding was flushed.
A run killed at any moment leaves ``path`` as it was and a staging file from which the next run
resumes. Space is checked before either file is written (HDF5 cannot survive a failed write).

Validation (``_integrity.validate_cache``, over the checks in ``_validate``): opening checks
that a cache reads only its own parts and stores its values inside them, every declared count
against the stored shapes, the attributes, dataset shapes and the small per-row arrays;
embedding values are checked block by block as they are read, so opening stays lazy.
``choose_cache`` picks the cache ``fit`` uses when none is named, by a rule it states.
"""

from __future__ import annotations

# Outside __all__ but imported from here, the path they had when this package was one module:
# check_key by featbank.extraction; write_cache (the schema-v1 writer) by
# scripts/bench_fit.py, scripts/bench_scale.py and tests; EMBEDDING_VERSION stays reachable too.
from ._discovery import CacheChoice, choose_cache, find_latest_cache, open_cache
from ._home import default_cache_dir
from ._index import verify_cache
from ._lock import writer_lock
from ._reader import EXTREME_POLICIES, FeatureCache
from ._schema import EMBEDDING_VERSION, SCHEMA_VERSION, SPLIT_NAMES, compute_cache_key  # noqa: F401
from ._validate import EXTREME_VALUE
from ._writer import check_key, write_cache  # noqa: F401

__all__ = [
    "writer_lock",
    "verify_cache",
    "SCHEMA_VERSION",
    "SPLIT_NAMES",
    "FeatureCache",
    "open_cache",
    "compute_cache_key",
    "default_cache_dir",
    "find_latest_cache",
    "choose_cache",
    "CacheChoice",
    "EXTREME_VALUE",
    "EXTREME_POLICIES",
]
