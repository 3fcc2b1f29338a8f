"""Writing caches: the key check and the space check extract uses (the parts and the index are written by
``_parts`` and ``_index``; the schema-v1 writer lives in ``_legacy``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CacheError, CacheKeyMismatch
from ._schema import describe_feature_difference

__all__ = ["check_key", "estimate_bytes", "feature_values_per_row", "check_space"]


# --------------------------------------------------------------------------------------------
# Writing (used by extract)
# --------------------------------------------------------------------------------------------


def check_key(path: Path, have_key: str, metadata: dict[str, Any], key: str, wanted: dict[str, Any]) -> None:
    """Raise :class:`CacheKeyMismatch` naming what differs, when the cache's ``have_key != key``.

    ``metadata`` are the cache's attributes (``transform`` decoded), ``wanted`` this run's values.
    """
    if have_key == key:
        return
    diffs = []
    for name in ("backbone", "weights", "weights_sha256", "dtype", "precision", "transform"):
        have, want = metadata.get(name), wanted.get(name)
        if name == "transform" and isinstance(want, dict):
            want = json.loads(json.dumps(want))
        if have != want:
            diffs.append(f"{name}: cache has {have!r}, asked for {want!r}")
    have_decode, want_decode = str(metadata.get("decode") or "pillow"), str(wanted.get("decode") or "pillow")
    if have_decode != want_decode:
        diffs.append(f"decode: cache has {have_decode!r}, asked for {want_decode!r} (extract --decode)")
    feature_diff = describe_feature_difference(metadata, wanted.get("features") or {})
    if feature_diff:
        diffs.append(feature_diff)
    if not diffs:
        diffs.append(
            f"featbank version / embedding version: cache written by featbank "
            f"{metadata.get('featbank_version')!r}"
        )
    raise CacheKeyMismatch(
        f"Cache {str(path)!r} was made with other settings, so its embeddings would not match:\n  "
        + "\n  ".join(diffs)
        + "\nThe file was left untouched. Pass --overwrite to replace it, or choose another --out."
    )




def estimate_bytes(n: int, embed_dim: int, dtype: str, paths: Sequence[str], extra_rows: int = 0,
                   extra_values: int = 0) -> int:
    """A generous size of a cache (or part) file of ``n`` rows, for the free-space check.

    Args:
        n: rows (images) the file holds.
        embed_dim: values per row of ``embeddings``.
        dtype: storage dtype of the embeddings (and of the layer and view datasets).
        paths: the rows' paths (their UTF-8 bytes are stored).
        extra_rows: skipped rows the file records besides ``n``.
        extra_values: values per row of the other float datasets, ``layers/<tap>`` and
            ``views/...`` (see :func:`feature_values_per_row`).
    """
    text = sum(len(p.encode("utf-8", "surrogateescape")) for p in paths)
    # embeddings (+ layers and views) + labels, splits, fingerprints, status + a vlen reference and heap object per path
    per_row = (embed_dim + extra_values) * np.dtype(dtype).itemsize + 8 + 1 + 16 + 1 + 48
    return int(((n + extra_rows) * per_row + 2 * text) * 1.05) + (64 << 10)


def feature_values_per_row(datasets: Mapping[str, tuple[int, ...]] | None) -> int:
    """Values per row of a run's layer and view datasets: ``datasets`` maps each (``layers/<tap>``,
    ``views/embeddings``, ``views/layers/<tap>``) to its trailing shape, as
    ``FeatureSpec.datasets()`` gives it; ``(K, D)`` of a view dataset counts K x D."""
    return sum(math.prod(shape) for shape in (datasets or {}).values())


def check_space(path: Path, nbytes: int, kept: str, largest_file: int | None = None) -> None:
    """Refuse to start writing ``path`` when ``nbytes`` do not fit (disk space, quota hint, ulimit -f).

    ``largest_file``: when the bytes go to several files (the parts of a run), the largest of
    them, which is what ``ulimit -f`` limits; default ``nbytes``.

    HDF5 cannot recover from a write that fails half-way (a failed flush leaves objects open that
    its exit handler flushes again, and the process dies with SIGSEGV), so running out of space must
    be found before the first byte is written. ``kept`` says what stays as it was.

    Raises:
        CacheError: not enough space; the message names the path, the sizes and what was kept.
    """
    folder = path.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    limit = None
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        limit = None if soft == resource.RLIM_INFINITY else soft
    except (ImportError, OSError, ValueError):
        pass
    if free is not None and nbytes > free:
        where = f"{_size(free)} free on the file system of '{folder}'"
    elif limit is not None and (nbytes if largest_file is None else largest_file) > limit:
        where = f"the file size limit of this process (ulimit -f) is {_size(limit)}"
    else:
        return
    raise CacheError(
        f"Not enough space to write '{path}': about {_size(nbytes)} needed, {where}. {kept} "
        "Free some space (or choose an --out elsewhere) and rerun."
    )


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"
