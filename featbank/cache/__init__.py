"""The HDF5 feature cache (schema v2): parts, the verified index over them, the cache key, a lazy reader.

A cache is an index file (``cache.h5``, the path users name) over part files in ``cache.h5.parts/``,
one per shard of rows. Every dataset below is readable with plain h5py from the index: the per-row
ones are HDF5 virtual datasets over the parts (see docs/formats.md, ``_index``, ``_parts``):

==========================  ==================  ============================================
dataset                     shape, dtype        meaning
==========================  ==================  ============================================
``embeddings``              (N, D) f4 or f2     one row per image
``labels``                  (N,) i8             class index, -1 for unlabelled
``paths``                   (N,) UTF-8 str      path relative to the data root, sorted per part
``splits``                  (N,) i1             index into attr ``split_names``, -1 = none
``fingerprints``            (N, 2) i8           (size in bytes, mtime in ns) of the file
``classes``                 (C,) UTF-8 str      class names, index = label
``skipped/paths``           (M,) UTF-8 str      every input that was skipped (see below)
``skipped/reasons``         (M,) UTF-8 str      why, in a few words
``skipped/fingerprints``    (M, 2) i8           their fingerprints (retried when they change)
``parts/*``                 (P,)                the table of parts: names, row counts, sizes, sha256
==========================  ==================  ============================================

Skipped inputs have one home, ``skipped/``: files that could not be read (stored in their parts)
and rows refused while listing a manifest or WebDataset shards (a missing file, an unreadable
label; stored in the index under ``listing/`` and mapped into ``skipped/`` after the parts' rows).
Caches written before this home existed keep such rows in the attribute ``listing_skipped``;
:class:`FeatureCache` ``.skipped`` and ``featbank cache info`` read both.

Crash safety: a part is written under a temporary name with a per-row status flag (a killed run
resumes inside the shard) and published by rename; the index is only ever replaced whole (written
to a temporary file in the same folder, fsync'ed, then ``os.replace``), so a run killed at any
moment leaves the published cache as it was. Space is checked before anything is written.

Validation (``_integrity.validate_cache``, over the checks in ``_validate``): opening checks
that a cache reads only its own parts and stores its values inside them, every declared count
against the stored shapes, the attributes, dataset shapes and the small per-row arrays;
embedding values are checked block by block as they are read, so opening stays lazy.
``choose_cache`` picks the cache ``fit`` uses when none is named, by a rule it states.

Schema v1 (one file holding every dataset, no parts) is still read, verified and exported, and
``featbank extract`` migrates it in place; what is particular to it lives in ``_legacy``.
"""

from __future__ import annotations

# The face of the package: what users call (first block of __all__) and what featbank's other
# packages build on (extraction writes parts and the index, ``featbank cache`` runs the tools).
# The modules stand in floors, each on lower ones only: _home, _schema -> _parts (a part's rows
# and files) -> _validate -> _writer -> _legacy (schema v1), _features -> _index -> _integrity ->
# _direct -> _reader -> _discovery -> _tools.
from ._discovery import CacheChoice, choose_cache, find_latest_cache, open_cache
from ._home import default_cache_dir
from ._index import IndexContents, PlannedPart, check_parts, finalize_index, read_listed, read_parts_table, verify_cache
from ._legacy import write_cache
from ._lock import writer_lock
from ._parts import (
    ROW_DATASETS,
    PartInfo,
    PartRows,
    PartWriter,
    ShardRows,
    describe_part,
    part_name,
    parts_dir,
    rows_digest,
    write_part,
)
from ._reader import EXTREME_POLICIES, FeatureCache
from ._schema import (
    EMBEDDING_VERSION,
    FORMAT,
    SCHEMA_VERSION,
    SPLIT_NAMES,
    compute_cache_key,
    decode_attr,
    describe_feature_difference,
    feature_settings,
)
from ._tools import EXPORT_FORMATS, CacheSummary, check_cache, describe_cache, export_cache
from ._validate import EXTREME_VALUE, is_hdf5
from ._writer import check_key, check_space, estimate_bytes, feature_values_per_row

__all__ = [
    # reading
    "FeatureCache",
    "open_cache",
    "choose_cache",
    "CacheChoice",
    "find_latest_cache",
    "default_cache_dir",
    "verify_cache",
    "EXTREME_VALUE",
    "EXTREME_POLICIES",
    "SPLIT_NAMES",
    "SCHEMA_VERSION",
    "EMBEDDING_VERSION",
    "FORMAT",
    "is_hdf5",
    # the cache key and what it covers
    "compute_cache_key",
    "check_key",
    "describe_feature_difference",
    "feature_settings",
    "decode_attr",
    # writing (extract): parts, the index over them, space, one writer at a time
    "writer_lock",
    "PartInfo",
    "PartRows",
    "PartWriter",
    "ShardRows",
    "ROW_DATASETS",
    "part_name",
    "parts_dir",
    "rows_digest",
    "describe_part",
    "write_part",
    "PlannedPart",
    "IndexContents",
    "finalize_index",
    "read_parts_table",
    "read_listed",
    "check_parts",
    "estimate_bytes",
    "feature_values_per_row",
    "check_space",
    "write_cache",
    # the tools behind `featbank cache info|verify|export`
    "CacheSummary",
    "describe_cache",
    "check_cache",
    "export_cache",
    "EXPORT_FORMATS",
]
