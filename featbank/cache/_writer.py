"""Writing caches: the key check and space check extract uses; the schema-v1 writer (``write_cache``, kept for
tests, benchmarks and the v1 files they need).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from .._files import describe_os_error, fsync_dir, temporary_path
from ..errors import CacheError, CacheKeyMismatch
from ._schema import FORMAT, SCHEMA_VERSION, SPLIT_NAMES, STR_DTYPE, describe_feature_difference

__all__ = ["check_key", "write_cache", "estimate_bytes", "feature_values_per_row", "check_space",
           "kept_message"]


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


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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


def _full_error(path: Path, e: OSError, kept: str) -> CacheError:
    return CacheError(f"Cannot write '{path}': {describe_os_error(e)}. {kept} Free some space and rerun.")


def kept_message(path: Path, staging: Path | None = None) -> str:
    """What a failed write leaves as it was, for error messages."""
    cache = path.with_name(path.name[: -len(".partial")]) if path.name.endswith(".partial") else path
    msg = f"The cache '{cache}' was left as it was." if cache.exists() else "No cache was written."
    if staging is not None and staging.exists():
        msg += f" The embeddings computed so far are kept in '{staging}'; a rerun resumes from there."
    return msg


def write_cache(
    path: Path,
    *,
    sources: list[tuple[str, Path | None, np.ndarray]],
    order_paths: list[str],
    row_fingerprints: np.ndarray,
    row_labels: np.ndarray,
    row_splits: np.ndarray,
    classes: Sequence[str],
    skipped: list[tuple[str, str, tuple[int, int]]],
    embed_dim: int,
    dtype: str,
    attrs: dict[str, Any],
    block_rows: int = 4096,
) -> None:
    """Write a complete cache atomically (temp file + fsync + os.replace).

    ``sources`` lists where the embeddings come from: ``(name, h5 path, mapping)`` where
    ``mapping`` is an int64 array with, for every final row, the source row or -1. Rows are
    copied in blocks, so memory stays bounded whatever N is. If ``path`` is a symlink, its target
    is replaced (the link stays); the permission bits of an existing file are kept.

    Raises:
        CacheError: not enough space (checked before writing) or the disk filled up meanwhile; the
            old cache is left as it was.
    """
    n = len(order_paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    staging = next((Path(p) for name, p, _ in sources if p is not None and Path(p).name.endswith(".partial")), None)
    kept = kept_message(target, staging)
    check_space(target, estimate_bytes(n, embed_dim, dtype, order_paths, len(skipped)), kept)
    tmp = temporary_path(target)
    mode_bits = _existing_mode(target)
    opened = {}
    try:
        for name, src_path, _ in sources:
            if src_path is not None and name not in opened:
                opened[name] = h5py.File(src_path, "r")
        with h5py.File(tmp, "w") as f:
            _copy_embeddings(f, sources, opened, n, embed_dim, dtype, block_rows)
            _write_rows(f, order_paths, row_fingerprints, row_labels, row_splits, classes, skipped)
            _write_attrs(f, n, embed_dim, dtype, attrs)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if mode_bits is not None:
            os.chmod(tmp, mode_bits)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as e:
        if e.errno in _FULL_ERRNOS:
            raise _full_error(target, e, kept) from None
        raise
    finally:
        for h in opened.values():
            h.close()
        if tmp.exists():
            tmp.unlink()


def _existing_mode(path: Path) -> int | None:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return None


def _copy_embeddings(f: h5py.File, sources: list, opened: dict, n: int, embed_dim: int, dtype: str,
                     block_rows: int) -> None:
    chunk_rows = max(1, min(1024, (1 << 20) // max(1, embed_dim * np.dtype(dtype).itemsize)))
    emb = f.create_dataset(
        "embeddings",
        shape=(n, embed_dim),
        maxshape=(None, embed_dim),
        dtype=dtype,
        chunks=(max(1, min(chunk_rows, max(n, 1))), embed_dim),
    )
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        block = np.empty((stop - start, embed_dim), dtype=dtype)
        filled = np.zeros(stop - start, bool)
        for name, _, mapping in sources:
            m = mapping[start:stop]
            sel = np.flatnonzero(m >= 0)
            if sel.size == 0:
                continue
            src_rows = m[sel]
            ds = opened[name]["embeddings"]
            order = np.argsort(src_rows)
            uniq = src_rows[order]
            block[sel[order]] = ds[uniq].astype(dtype, copy=False)
            filled[sel] = True
        if not filled.all():
            raise CacheError("internal error: a cache row has no source")  # pragma: no cover
        emb[start:stop] = block


def _write_rows(f: h5py.File, order_paths: list[str], row_fingerprints: np.ndarray, row_labels: np.ndarray,
                row_splits: np.ndarray, classes: Sequence[str], skipped: list) -> None:
    n = len(order_paths)
    f.create_dataset("labels", data=np.asarray(row_labels, np.int64), maxshape=(None,), chunks=True)
    f.create_dataset("splits", data=np.asarray(row_splits, np.int8), maxshape=(None,), chunks=True)
    f.create_dataset("paths", data=np.array(order_paths, dtype=object), dtype=STR_DTYPE, maxshape=(None,), chunks=True)
    f.create_dataset(
        "fingerprints", data=np.asarray(row_fingerprints, np.int64).reshape(n, 2), maxshape=(None, 2), chunks=True
    )
    f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=STR_DTYPE)
    g = f.create_group("skipped")
    g.create_dataset("paths", data=np.array([s[0] for s in skipped], dtype=object), dtype=STR_DTYPE)
    g.create_dataset("reasons", data=np.array([s[1] for s in skipped], dtype=object), dtype=STR_DTYPE)
    g.create_dataset("fingerprints", data=np.array([s[2] for s in skipped], np.int64).reshape(len(skipped), 2))


def _write_attrs(f: h5py.File, n: int, embed_dim: int, dtype: str, attrs: dict[str, Any]) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["featbank_version"] = __version__
    f.attrs["split_names"] = json.dumps(list(SPLIT_NAMES))
    f.attrs["n_samples"] = n
    f.attrs["embed_dim"] = embed_dim
    f.attrs["dtype"] = dtype
    for k, v in attrs.items():
        f.attrs[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
