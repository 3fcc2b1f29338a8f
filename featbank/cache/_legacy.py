"""Schema v1, the one place featbank knows it: a cache as one HDF5 file holding every dataset.

featbank writes schema v2 (an index over part files, see ``_index``). A v1 file, written by
featbank before sharded extraction, is still read, verified and exported like a v2 cache (the
checks of ``_validate`` cover both), and ``featbank extract`` migrates it to v2 in place on its next
run. :func:`write_cache` writes one: kept for the tests and benchmarks that need v1 files.

What differs from v2 (everything else, datasets and attributes, is the same)::

    schema_version = 1
    embeddings, labels, splits, paths, fingerprints, classes   stored in the file, chunked
    skipped/{paths,reasons,fingerprints}                       stored in the file
    (no parts/ table, no parts folder; exported in blocks of V1_EXPORT_ROWS rows)
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from .._files import describe_os_error, fsync_dir, temporary_path
from ..errors import CacheError
from ._parts import PartRows
from ._schema import FORMAT, SPLIT_NAMES, STR_DTYPE
from ._validate import recreate_hint, storage_problem
from ._writer import check_space, estimate_bytes

__all__ = ["V1_SCHEMA_VERSION", "V1_EXPORT_ROWS", "schema_version", "check_v1_storage", "write_cache"]

V1_SCHEMA_VERSION = 1
#: Rows per exported shard of a v1 cache (it has no parts to follow).
V1_EXPORT_ROWS = 100_000
#: Rows copied per block by :func:`write_cache` (memory stays bounded whatever N is).
_BLOCK_ROWS = 4096
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def schema_version(attrs: Mapping[str, Any]) -> int | None:
    """The file's ``schema_version`` when it is an integer (1 or 2 for a featbank cache); None otherwise."""
    v = attrs.get("schema_version")
    ok = isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
    return int(v) if ok else None


def check_v1_storage(path: Path, f: h5py.File) -> None:
    """Every dataset of a v1 file stores its values inside the file (no external or virtual storage)."""
    root = f.attrs.get("root")
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    for name in names:
        why = storage_problem(f[name].id)
        if why:
            raise CacheError(f"Cache '{path}' is damaged: dataset '{name}' {why}; a cache holds its values in its "
                             f"own file (an index: its per-row datasets mapped onto its own parts). "
                             f"{recreate_hint(path, root)}")


def write_cache(
    path: Path,
    *,
    sources: list[tuple[str, Path | None, np.ndarray]],
    rows: PartRows,
    classes: Sequence[str],
    skipped: list[tuple[str, str, tuple[int, int]]],
    embed_dim: int,
    dtype: str,
    attrs: dict[str, Any],
) -> None:
    """Write a complete schema-v1 cache atomically (temp file + fsync + os.replace).

    ``sources`` lists where the embeddings come from: ``(name, h5 path, mapping)`` where
    ``mapping`` is an int64 array with, for every final row, the source row or -1. ``rows``: the
    paths, fingerprints, labels and splits of the final rows, in order. Rows are copied in blocks
    (4096 rows), so memory stays bounded whatever N is. If ``path`` is a symlink, its target
    is replaced (the link stays); the permission bits of an existing file are kept.

    Raises:
        CacheError: not enough space (checked before writing) or the disk filled up meanwhile; the
            old cache is left as it was.
    """
    n = len(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    staging = next((Path(p) for name, p, _ in sources if p is not None and Path(p).name.endswith(".partial")), None)
    kept = _kept_message(target, staging)
    check_space(target, estimate_bytes(n, embed_dim, dtype, rows.paths, len(skipped)), kept)
    tmp = temporary_path(target)
    mode_bits = _existing_mode(target)
    opened = {}
    try:
        for name, src_path, _ in sources:
            if src_path is not None and name not in opened:
                opened[name] = h5py.File(src_path, "r")
        with h5py.File(tmp, "w") as f:
            _copy_embeddings(f, sources, opened, n, embed_dim, dtype)
            _write_rows(f, rows, classes, skipped)
            _write_attrs(f, n, embed_dim, dtype, attrs)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if mode_bits is not None:
            os.chmod(tmp, mode_bits)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as e:
        if _is_full_disk(e):
            raise _full_disk_error(target, e, kept) from None
        raise
    finally:
        for h in opened.values():
            h.close()
        if tmp.exists():
            tmp.unlink()


def _copy_embeddings(f: h5py.File, sources: list, opened: dict, n: int, embed_dim: int, dtype: str) -> None:
    block_rows = _BLOCK_ROWS
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


def _write_rows(f: h5py.File, rows: PartRows, classes: Sequence[str], skipped: list) -> None:
    n = len(rows)
    f.create_dataset("labels", data=np.asarray(rows.labels, np.int64), maxshape=(None,), chunks=True)
    f.create_dataset("splits", data=np.asarray(rows.splits, np.int8), maxshape=(None,), chunks=True)
    f.create_dataset("paths", data=np.array(rows.paths, dtype=object), dtype=STR_DTYPE, maxshape=(None,), chunks=True)
    f.create_dataset(
        "fingerprints", data=np.asarray(rows.fingerprints, np.int64).reshape(n, 2), maxshape=(None, 2), chunks=True
    )
    f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=STR_DTYPE)
    g = f.create_group("skipped")
    g.create_dataset("paths", data=np.array([s[0] for s in skipped], dtype=object), dtype=STR_DTYPE)
    g.create_dataset("reasons", data=np.array([s[1] for s in skipped], dtype=object), dtype=STR_DTYPE)
    g.create_dataset("fingerprints", data=np.array([s[2] for s in skipped], np.int64).reshape(len(skipped), 2))


def _write_attrs(f: h5py.File, n: int, embed_dim: int, dtype: str, attrs: dict[str, Any]) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = V1_SCHEMA_VERSION
    f.attrs["featbank_version"] = __version__
    f.attrs["split_names"] = json.dumps(list(SPLIT_NAMES))
    f.attrs["n_samples"] = n
    f.attrs["embed_dim"] = embed_dim
    f.attrs["dtype"] = dtype
    for k, v in attrs.items():
        f.attrs[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v


def _existing_mode(path: Path) -> int | None:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return None


def _is_full_disk(e: OSError) -> bool:
    """Whether a failed write ran out of space (no space, quota, or the file size limit)."""
    return e.errno in _FULL_ERRNOS


def _full_disk_error(path: Path, e: OSError, kept: str) -> CacheError:
    return CacheError(f"Cannot write '{path}': {describe_os_error(e)}. {kept} Free some space and rerun.")


def _kept_message(path: Path, staging: Path | None = None) -> str:
    """What a failed write leaves as it was, for error messages."""
    cache = path.with_name(path.name[: -len(".partial")]) if path.name.endswith(".partial") else path
    msg = f"The cache '{cache}' was left as it was." if cache.exists() else "No cache was written."
    if staging is not None and staging.exists():
        msg += f" The embeddings computed so far are kept in '{staging}'; a rerun resumes from there."
    return msg
