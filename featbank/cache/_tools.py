"""``featbank cache info|verify|export``: what a cache holds, whether every part is intact, embeddings out for vector search.

Work on schema v1 (one file) and v2 (an index over parts) alike, and never hold more than one
shard of embeddings in memory.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._files import check_output_dir, fsync_dir, temporary_path
from ..errors import CacheError, ConfigError, NotACacheError
from ..features import FeatureSpec
from ._features import dataset_name, feature_dataset_names, parse_requested
from ._index import verify_cache
from ._integrity import CacheCheck, open_cache_file, validate_cache
from ._legacy import V1_EXPORT_ROWS, V1_SCHEMA_VERSION, schema_version
from ._parts import ROW_DATASETS
from ._schema import FORMAT, SCHEMA_VERSION, SPLIT_NAMES, decode_attr
from ._validate import recreate_hint

__all__ = ["CacheSummary", "describe_cache", "check_cache", "export_cache", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("npy", "parquet")


@dataclass
class CacheSummary:
    """What ``featbank cache info`` prints.

    ``features`` holds the intermediate layers (``layers/<tap>``, with their widths and pooling)
    and augmented views (``views/...``: K and the augmentation) the cache stores besides
    ``embeddings``; a plain cache has ``layers == ("final",)`` and no views.
    """

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
    features: FeatureSpec = field(default_factory=FeatureSpec)

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
            f"skipped    {self.n_skipped}" + (" (inputs not embedded, listed in the cache under skipped/)"
                                             if self.n_skipped else ""),
            *_feature_lines(self.features, self.embed_dim),
        ]
        out += [f"PROBLEM    {p}" for p in self.problems]
        return out


def _feature_lines(feats: FeatureSpec, embed_dim: int) -> list[str]:
    dims = {**feats.layer_dims, "final": feats.layer_dims.get("final", embed_dim)}
    layers = ", ".join(f"{t} ({dims.get(t, '?')})" for t in feats.layers)
    pooled = f"; pooling {feats.pooling}" if len(feats.layers) > 1 else ""
    if not feats.n_views:
        views = "none"
    else:
        seed = f", view seed {feats.view_seed}" if feats.augment == "crops" else ""
        views = f"{feats.n_views} per image, {feats.augment}{seed}"
    return [f"layers     {len(feats.layers)}: {layers}{pooled}", f"views      {views}"]


def _open(path: Path) -> h5py.File:
    """The cache file opened read-only: a regular HDF5 file (a FIFO is never opened) with featbank's format."""
    f = open_cache_file(Path(path))
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise CacheError(f"{str(path)!r} is not a featbank cache (no format={FORMAT!r} attribute).")
    return f


def _class_counts(classes: list[str], labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels[labels >= 0], minlength=len(classes)) if len(labels) else np.zeros(len(classes), int)
    return {c: int(n) for c, n in zip(classes, counts)}


def _split_counts(names: Sequence[str], splits: np.ndarray) -> dict[str, int]:
    return {s: int(n) for s, n in zip(names, np.bincount(splits[splits >= 0].astype(np.int64), minlength=len(names))) if n}


def describe_cache(path: str | os.PathLike) -> CacheSummary:
    """Summarise a cache (v1 or v2) without reading its embeddings; v2 parts get the fast check.

    Every check ``open_cache`` runs comes first (:func:`~featbank.cache._integrity.validate_cache`);
    damage it finds (a missing or changed part, layers that disagree with the attributes, ...) is
    listed in ``problems`` and nothing per-row is read then: classes and counts stay empty.

    Raises:
        CacheError: missing, unreadable, or not a featbank cache.
    """
    path = Path(path)
    with _open(path) as f:
        try:
            check: CacheCheck | None = validate_cache(path, f, allow_incomplete=True)
        except NotACacheError:
            raise
        except CacheError as e:
            return _summary(path, f, None, [str(e)])
        return _summary(path, f, check, [])


def _summary(path: Path, f: h5py.File, check: CacheCheck | None, problems: list[str]) -> CacheSummary:
    """The summary from the attributes and shapes; classes and counts only from a cache that passed ``check``."""
    found = schema_version(f.attrs)
    version = V1_SCHEMA_VERSION if found is None else found
    emb = f.get("embeddings")
    n_rows, dim = (int(emb.shape[0]), int(emb.shape[1])) if isinstance(emb, h5py.Dataset) and emb.ndim == 2 else (0, 0)
    dtype = str(emb.dtype) if isinstance(emb, h5py.Dataset) else "?"
    attrs = [str(f.attrs.get(k, "")) for k in ("backbone", "weights", "cache_key")]
    if check is None:
        return CacheSummary(path, version, n_rows, dim, dtype, [], {}, {}, *attrs, 1, 0, problems)
    classes = decode_attr(f["classes"][...])
    n_skipped = (int(f["skipped/paths"].shape[0]) if "skipped" in f else 0) + len(check.listed)
    return CacheSummary(
        path, version, n_rows, dim, dtype, classes, _class_counts(classes, check.labels),
        _split_counts(check.split_names, check.splits), *attrs,
        len(check.parts) if check.parts_dir is not None else 1, n_skipped, problems, check.features,
    )


def _read_through(file: Path, names: list[str], n_rows: int, label: str) -> list[str]:
    """Problems found reading every row of ``names`` in one HDF5 file (a part, or a v1 cache):
    a dataset missing, of another length or unreadable, NaN/inf values."""
    problems = []
    try:
        with h5py.File(file, "r") as f:
            for name in names:
                ds = f.get(name)
                if not isinstance(ds, h5py.Dataset) or not ds.shape or ds.shape[0] != n_rows:
                    shape = ds.shape if isinstance(ds, h5py.Dataset) else "missing"
                    problems.append(f"{label}: dataset '{name}' is {shape}, expected {n_rows} rows")
                    continue
                row_bytes = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
                for start, stop in _blocks(n_rows, max(1, (16 << 20) // row_bytes)):
                    block = ds[start:stop]
                    if block.dtype.kind == "f" and not np.isfinite(block).all():
                        bad = start + int(np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(1))[0])
                        problems.append(f"{label}: dataset '{name}' has NaN or infinite values (first in row {bad})")
                        break
    except OSError as e:
        problems.append(f"{label} cannot be read to the end ({e})")
    return problems


def check_cache(path: str | os.PathLike) -> CacheSummary:
    """Check every byte of a cache, its layers and views included.

    Schema v2: every part is hashed against the index's table (a part that is not a regular file
    is never read); then every check ``open_cache`` runs (:func:`validate_cache`: only its own
    parts, mapped whole and in order, counts agreeing with the parts, data inside the parts, labels
    within the classes, layers and views as the attributes say); then every per-row dataset of
    every part is read through (present, the part's row count, readable, no NaN/inf). Schema v1:
    the same checks and read-through on the one file.

    Raises:
        CacheError: a part is missing, truncated or changed, or a dataset is damaged; the message
            names the part and dataset and what to run.
    """
    path = Path(path)
    real = Path(os.path.realpath(path))  # through a symlink: the parts lie beside its target
    with _open(path) as f:
        v2 = "parts" in f and schema_version(f.attrs) == SCHEMA_VERSION
    if v2:
        verify_cache(real, full=True)
    with _open(path) as f:
        check = validate_cache(path, f)
        root = f.attrs.get("root")
    names = [*ROW_DATASETS, *feature_dataset_names(check.features)]
    if check.parts_dir is not None:
        folder = check.parts_dir
        problems = [q for p in check.parts
                    for q in _read_through(folder / p.name, names, p.n_rows, f"part {folder.name}/{p.name}")]
        data = root if isinstance(root, str) and root else "DATA"
        fix = (f"Remove the part file(s) named above and run 'featbank extract {data} --out {path}' again: "
               "only those parts are recomputed (--overwrite rebuilds them all).")
    else:
        problems = _read_through(path, names, len(check.labels), f"file {path.name}")
        fix = recreate_hint(path, root)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CacheError(f"Cache {str(path)!r} is damaged:\n  {shown}\n{fix}")
    return describe_cache(path)


def _blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _shard_bounds(f: h5py.File, rows_per_file: int | None) -> list[tuple[int, int]]:
    n = int(f["embeddings"].shape[0])
    if rows_per_file is None and "parts" in f:
        counts = f["parts/n_rows"][...]
        ends = np.cumsum(counts)
        return [(int(e - c), int(e)) for c, e in zip(counts, ends) if c]
    return list(_blocks(n, rows_per_file or V1_EXPORT_ROWS))


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


def _read_columns(path: Path, f: h5py.File, wanted: list[str], view: int | None, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of the layers ``wanted`` (of augmented view ``view``), side by side; NaN/inf refused."""
    cols = []
    for tap in wanted:
        name = dataset_name(tap, view is not None)
        block = f[name][lo:hi] if view is None else f[name][lo:hi, view]
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if bad.size:
            row = lo + int(bad[0])
            raise CacheError(f"Cache '{path}' is damaged: dataset '{name}' has NaN or infinite values in row {row} "
                             f"({decode_attr(f['paths'][row:row + 1])[0]!r}). {recreate_hint(path, f.attrs.get('root'))}")
        cols.append(block)
    return cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)


def _write_shard(out_dir: Path, i: int, fmt: str, emb: np.ndarray, meta: dict[str, list], layout: str) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema_meta = {"featbank": layout}
    if fmt == "npy":
        npy, pqf = out_dir / f"embeddings-{i:05d}.npy", out_dir / f"metadata-{i:05d}.parquet"
        _atomic(npy, lambda t: _save_npy(t, emb))
        _atomic(pqf, lambda t: pq.write_table(pa.table(meta).replace_schema_metadata(schema_meta), t))
        return [npy, pqf]
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    table = pa.table({**meta, "embedding": col}).replace_schema_metadata(schema_meta)
    pqf = out_dir / f"embeddings-{i:05d}.parquet"
    _atomic(pqf, lambda t: pq.write_table(table, t))
    return [pqf]


_EXPORT_FILE = re.compile(r"(embeddings|metadata)-\d{5,}\.(npy|parquet)")


def _clear_earlier_export(out_dir: Path, overwrite: bool) -> None:
    """An earlier export in ``out_dir`` is refused (its shards would mix with this one's), or removed with
    ``overwrite``; only files named as an export names them are touched."""
    earlier = sorted(p for p in out_dir.iterdir() if _EXPORT_FILE.fullmatch(p.name)) if out_dir.is_dir() else []
    if not earlier:
        return
    if not overwrite:
        shown = ", ".join(p.name for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise ConfigError(
            f"--out '{out_dir}' holds an earlier export ({len(earlier)} file(s): {shown}); writing into it would mix "
            "the two. Pass --overwrite to replace it, or choose an empty folder."
        )
    for p in earlier:
        p.unlink()


def export_cache(
    path: str | os.PathLike, out: str | os.PathLike, *, format: str = "npy", rows_per_file: int | None = None,
    layers: str | Sequence[str] = "final", view: int | None = None, overwrite: bool = False,
) -> list[Path]:
    """Write a cache's features as shards for vector search, one shard in memory at a time.

    ``npy``: ``embeddings-00000.npy`` (the cache's dtype) + ``metadata-00000.parquet`` (path,
    label, split) per shard, as autofaiss and numpy read them. ``parquet``:
    ``embeddings-00000.parquet`` with path, label, split and a fixed-size list ``embedding``
    column, as LanceDB and Spark read them. Shards follow the parts of a v2 cache, or
    ``rows_per_file`` rows (default 100,000).

    By default the vectors are the final embeddings (``embeddings``) of the plain view. A cache
    extracted with ``--layers`` / ``--views`` can export other columns: ``layers`` picks the
    layers (names, ``"a,b"`` or ``"all"``), concatenated in the order given as
    ``load_features`` does, and ``view`` the k-th augmented view instead of the plain one. Every
    parquet file records the columns in its schema metadata (key ``featbank``: JSON with
    ``layers``, ``layer_dims`` and ``view``).

    A folder that holds an earlier export is refused (the shards of two exports would mix), unless
    ``overwrite``, which removes the earlier export's files (and nothing else) first.

    Returns:
        The files written, in order.

    Raises:
        ConfigError: unknown format, layer or view; bad ``rows_per_file``; pyarrow missing; output
            not writable; an earlier export in ``out`` without ``overwrite``.
        CacheError: the cache cannot be read, a part is missing or changed, NaN/inf in a row read.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"The 'format' parameter must be one of {EXPORT_FORMATS}. Got {format!r} instead.")
    if rows_per_file is not None and (not isinstance(rows_per_file, int) or rows_per_file < 1):
        raise ConfigError(f"The 'rows_per_file' parameter must be a positive integer. Got {rows_per_file!r} instead.")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ConfigError("featbank cache export needs pyarrow: pip install 'featbank[parquet]'.") from None
    path = Path(path)
    with _open(path) as f:
        feats = validate_cache(path, f).features  # every check open_cache runs, labels in range included
        wanted = parse_requested(feats, layers, view)
        layout = json.dumps({"layers": wanted, "layer_dims": [feats.layer_dims[t] for t in wanted], "view": view})
        out_dir = check_output_dir(Path(out), "export")
        _clear_earlier_export(out_dir, overwrite)
        classes = decode_attr(f["classes"][...])
        names = json.loads(f.attrs.get("split_names", json.dumps(SPLIT_NAMES)))
        written = []
        for i, (lo, hi) in enumerate(_shard_bounds(f, rows_per_file)):
            emb = _read_columns(path, f, wanted, view, lo, hi)
            meta = {
                "path": decode_attr(f["paths"][lo:hi]),
                "label": [classes[j] if j >= 0 else None for j in f["labels"][lo:hi]],
                "split": [names[s] if s >= 0 else None for s in f["splits"][lo:hi]],
            }
            written += _write_shard(out_dir, i, format, emb, meta, layout)
    fsync_dir(out_dir)
    return written
