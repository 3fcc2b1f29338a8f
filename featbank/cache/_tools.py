"""``featbank cache info|verify|export``: what a cache holds, whether every part is intact, embeddings out for vector search.

Work on schema v1 (one file) and v2 (an index over parts) alike, and never hold more than one
shard of embeddings in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._files import check_output_dir, fsync_dir, temporary_path
from ..errors import CacheError, ConfigError
from ._index import check_parts, verify_cache
from ._schema import FORMAT, SPLIT_NAMES, decode_attr

__all__ = ["CacheSummary", "describe_cache", "check_cache", "export_cache", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("npy", "parquet")


@dataclass
class CacheSummary:
    """What ``featbank cache info`` prints."""

    path: Path
    schema_version: int
    n_samples: int
    embed_dim: int
    dtype: str
    classes: list[str]
    class_counts: dict[str, int]
    split_counts: dict[str, int]
    backbone: str
    weights: str
    cache_key: str
    n_parts: int
    n_skipped: int
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable lines, one fact each."""
        out = [
            f"cache      {self.path}",
            f"schema     v{self.schema_version}" + (f", {self.n_parts} part(s)" if self.schema_version >= 2 else ""),
            f"rows       {self.n_samples} x {self.embed_dim} ({self.dtype})",
            f"backbone   {self.backbone} [{self.weights}]",
            f"key        {self.cache_key}",
            f"classes    {len(self.classes)}: " + ", ".join(f"{c} ({n})" for c, n in self.class_counts.items()),
            "splits     " + (", ".join(f"{s} ({n})" for s, n in self.split_counts.items()) or "none"),
            f"skipped    {self.n_skipped}",
        ]
        out += [f"PROBLEM    {p}" for p in self.problems]
        return out


def _open(path: Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"Cache {str(path)!r} does not exist. Run 'featbank extract DATA --out {path}' first.")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{str(path)!r} is not a readable HDF5 file ({e}).") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise CacheError(f"{str(path)!r} is not a featbank cache (no format={FORMAT!r} attribute).")
    return f


def describe_cache(path: str | os.PathLike) -> CacheSummary:
    """Summarise a cache (v1 or v2) without reading its embeddings; v2 parts get the fast check.

    Raises:
        CacheError: missing, unreadable, or not a featbank cache.
    """
    path = Path(path)
    with _open(path) as f:
        version = int(f.attrs.get("schema_version", 1))
        classes = decode_attr(f["classes"][...])
        labels = f["labels"][...] if version < 2 else None
        splits = f["splits"][...] if version < 2 else None
        problems = check_parts(path) if version >= 2 else []
        if version >= 2 and not problems:
            labels, splits = f["labels"][...], f["splits"][...]
        emb = f["embeddings"]
        n_skipped = int(f["skipped/paths"].shape[0]) if "skipped" in f else 0
        n_skipped += len(json.loads(f.attrs.get("listing_skipped", "[]") or "[]"))
        names = json.loads(f.attrs.get("split_names", json.dumps(SPLIT_NAMES)))
        counts_c = {c: int(np.sum(labels == i)) for i, c in enumerate(classes)} if labels is not None else {}
        counts_s = {s: int(np.sum(splits == i)) for i, s in enumerate(names) if splits is not None and np.any(splits == i)}
        return CacheSummary(
            path, version, int(emb.shape[0]), int(emb.shape[1]) if emb.ndim == 2 else 0, str(emb.dtype), classes,
            counts_c, counts_s, str(f.attrs.get("backbone", "")), str(f.attrs.get("weights", "")),
            str(f.attrs.get("cache_key", "")), int(f.attrs.get("n_parts", 1)), n_skipped, problems,
        )


def check_cache(path: str | os.PathLike) -> CacheSummary:
    """Check every byte: v2 hashes every part against the index; v1 reads every dataset through.

    Raises:
        CacheError: a part is missing or changed, or the file cannot be read to the end.
    """
    path = Path(path)
    summary = describe_cache(path)
    if summary.schema_version >= 2:
        verify_cache(path, full=True)
        return summary
    with _open(path) as f:
        try:
            for start, stop in _blocks(f["embeddings"].shape[0], 1 << 14):
                block = f["embeddings"][start:stop]
                if not np.isfinite(block).all():
                    raise CacheError(f"Cache {str(path)!r} has non-finite embeddings in rows {start}..{stop - 1}; "
                                     "re-extract with --overwrite.")
            for name in ("labels", "splits", "paths", "fingerprints", "classes"):
                f[name][...]
        except OSError as e:
            raise CacheError(f"Cache {str(path)!r} cannot be read to the end ({e}); re-extract with --overwrite.") from None
    return summary


def _blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _shard_bounds(f: h5py.File, rows_per_file: int | None) -> list[tuple[int, int]]:
    n = int(f["embeddings"].shape[0])
    if rows_per_file is None and "parts" in f:
        counts = f["parts/n_rows"][...]
        ends = np.cumsum(counts)
        return [(int(e - c), int(e)) for c, e in zip(counts, ends) if c]
    return list(_blocks(n, rows_per_file or 100_000))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, arr)


def _atomic(path: Path, write: Any) -> None:
    tmp = temporary_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_cache(
    path: str | os.PathLike, out: str | os.PathLike, *, format: str = "npy", rows_per_file: int | None = None,
) -> list[Path]:
    """Write a cache's embeddings as shards for vector search, one shard in memory at a time.

    ``npy``: ``embeddings-00000.npy`` (float32 or the cache's dtype) + ``metadata-00000.parquet``
    (path, label, split) per shard, as autofaiss and numpy read them. ``parquet``:
    ``embeddings-00000.parquet`` with path, label, split and a fixed-size list ``embedding``
    column, as LanceDB and Spark read them. Shards follow the parts of a v2 cache, or
    ``rows_per_file`` rows (default 100,000).

    Returns:
        The files written, in order.

    Raises:
        ConfigError: unknown format, bad ``rows_per_file``, pyarrow missing, output not writable.
        CacheError: the cache cannot be read, or a part is missing or changed.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"The 'format' parameter must be one of {EXPORT_FORMATS}. Got {format!r} instead.")
    if rows_per_file is not None and (not isinstance(rows_per_file, int) or rows_per_file < 1):
        raise ConfigError(f"The 'rows_per_file' parameter must be a positive integer. Got {rows_per_file!r} instead.")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("featbank cache export needs pyarrow: pip install 'featbank[parquet]'.") from None
    path, out_dir = Path(path), check_output_dir(Path(out), "export")
    with _open(path) as f:
        if int(f.attrs.get("schema_version", 1)) >= 2:
            verify_cache(path, full=False)
        classes = decode_attr(f["classes"][...])
        names = json.loads(f.attrs.get("split_names", json.dumps(SPLIT_NAMES)))
        written = []
        for i, (lo, hi) in enumerate(_shard_bounds(f, rows_per_file)):
            emb = f["embeddings"][lo:hi]
            labels, splits = f["labels"][lo:hi], f["splits"][lo:hi]
            meta = {
                "path": decode_attr(f["paths"][lo:hi]),
                "label": [classes[j] if j >= 0 else None for j in labels],
                "split": [names[s] if s >= 0 else None for s in splits],
            }
            if format == "npy":
                npy, pqf = out_dir / f"embeddings-{i:05d}.npy", out_dir / f"metadata-{i:05d}.parquet"
                _atomic(npy, lambda t, e=emb: _save_npy(t, e))
                _atomic(pqf, lambda t, m=meta: pq.write_table(pa.table(m), t))
                written += [npy, pqf]
            else:
                dim = emb.shape[1]
                col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
                table = pa.table({**meta, "embedding": col})
                pqf = out_dir / f"embeddings-{i:05d}.parquet"
                _atomic(pqf, lambda t, tb=table: pq.write_table(tb, t))
                written.append(pqf)
    fsync_dir(out_dir)
    return written
