"""Schema v2: the cache users open is a small index file whose datasets are HDF5 virtual datasets over part files.

Layout of an index (``cache.h5``, parts in ``cache.h5.parts/``, mapped by *relative* names so the
folder holding both can move; HDF5 resolves a relative source name against the index file's own
folder)::

    embeddings, labels, splits, paths, fingerprints   virtual, rows of every part in plan order
    skipped/{paths,reasons,fingerprints}              virtual: the parts' skipped rows, then listing/'s
    listing/{paths,reasons,fingerprints}              real, rows refused while listing (only when there are)
    classes                                           real, the cache's class names
    parts/{shard_ids,names,n_rows,n_skipped,sizes,mtimes_ns,sha256,rows_digests}   the table of parts

HDF5 fills the rows of a missing source file with the fill value (zeros, empty strings) without
an error, so nothing may read an index before :func:`check_parts` has checked every part. The
cheap check is size and ``mtime_ns`` against the table (catches a deleted, truncated, or
replaced part); where they differ, or in :func:`verify_cache`, the sha256 recorded at write time
decides. Hashing every part on every open would read the whole cache (51 GB for 10M rows), so
the full hash is kept for ``featbank cache verify`` and for parts whose stat changed.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from .._files import NotRegularFileError, check_regular_file, fsync_dir, sha256_file, temporary_path
from ..errors import CacheError
from ._parts import ROW_DATASETS, SKIPPED_DATASETS, PartInfo, describe_part, is_part_name, part_name, parts_dir
from ._schema import FORMAT, SCHEMA_VERSION, SPLIT_NAMES, STR_DTYPE, decode_attr
from ._validate import recreate_hint, storage_problem

__all__ = [
    "PlannedPart",
    "IndexContents",
    "write_index",
    "LISTING",
    "read_listed",
    "read_parts_table",
    "check_parts",
    "verify_cache",
    "finalize_index",
]

#: The index's group of rows refused while listing a manifest or tars (a missing file, an unreadable label).
#: Readers see them at the end of ``skipped/``, the one home of skipped inputs; caches written before
#: that home kept them in the attribute ``listing_skipped``, still read (:func:`read_listed`).
LISTING = "listing"
Listed = tuple[str, str, tuple[int, int]]


@dataclass(frozen=True)
class PlannedPart:
    """What the plan expects of one shard's part: its id, its planned row count and rows digest."""

    shard_id: int
    n_rows: int
    rows_digest: str


@dataclass(frozen=True)
class IndexContents:
    """What an index records besides its parts: the class names, its attributes, the per-row datasets
    every part holds, the plan (JSON) and the rows refused while listing (path, reason, fingerprint)."""

    classes: Sequence[str]
    attrs: dict[str, Any]
    row_datasets: Sequence[str] = ROW_DATASETS
    plan_json: str = ""
    listed: Sequence[Listed] = ()


@dataclass(frozen=True)
class _Sources:
    """The parts a virtual dataset maps, ``counts[i]`` rows of part ``i``, under ``folder`` (relative to the index)."""

    folder: str
    parts: Sequence[PartInfo]
    counts: Sequence[int]


def _vds(f: h5py.Group, name: str, sources: _Sources, dataset: str, layout: tuple[tuple[int, ...], Any],
         own: tuple[str, int] | None = None) -> None:
    """A virtual dataset over ``dataset`` of the parts, then (``own``: name, rows) over a dataset of the index itself.

    ``layout``: the trailing shape and the dtype of a row.
    """
    shape_tail, dtype = layout
    folder, parts, counts = sources.folder, sources.parts, sources.counts
    total = int(sum(counts)) + (own[1] if own else 0)
    if total == 0:
        f.create_dataset(name, shape=(0, *shape_tail), dtype=dtype)
        return
    from h5py import h5d, h5p, h5s, h5t

    # The low-level calls: h5py's VirtualLayout costs ~0.4 ms of Python per mapping, which made
    # rebuilding the index of 10^6 rows (100 parts x 8 datasets) the slowest step of an update.
    dcpl = h5p.create(h5p.DATASET_CREATE)
    vspace = h5s.create_simple((total, *shape_tail))
    zeros = (0,) * len(shape_tail)
    pos = 0
    src_spaces: dict[int, Any] = {}  # most parts have one of a few row counts: one dataspace each
    for p, n in zip(parts, counts):
        if n:
            vspace.select_hyperslab((pos, *zeros), (n, *shape_tail))
            if n not in src_spaces:
                src_spaces[n] = h5s.create_simple((n, *shape_tail))
            dcpl.set_virtual(vspace, f"{folder}/{p.name}".encode(), dataset.encode(), src_spaces[n])
            pos += n
    if own and own[1]:  # HDF5's "." is the virtual dataset's own file, wherever it moves
        vspace.select_hyperslab((pos, *zeros), (own[1], *shape_tail))
        dcpl.set_virtual(vspace, b".", own[0].encode(), h5s.create_simple((own[1], *shape_tail)))
    tid = h5t.py_create(np.dtype(dtype), logical=True)
    h5d.create(f.id, name.encode(), tid, h5s.create_simple((total, *shape_tail)), dcpl=dcpl).close()


def _shapes(
    folder: Path, parts: Sequence[PartInfo], names: Sequence[str], group: str = ""
) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Trailing shape and dtype of each per-row dataset, read from the first part that has rows."""
    out: dict[str, tuple[tuple[int, ...], Any]] = {}
    counts = [p.n_rows if not group else p.n_skipped for p in parts]
    src = next((p for p, n in zip(parts, counts) if n), parts[0] if parts else None)
    if src is None:
        return out
    with h5py.File(folder / src.name, "r") as f:
        for name in names:
            ds = f[f"{group}{name}"]
            out[name] = (tuple(ds.shape[1:]), ds.dtype)
    return out


def write_index(
    index_path: Path, parts: Sequence[PartInfo], classes: Sequence[str], attrs: dict[str, Any],
    *, row_datasets: Sequence[str] = ROW_DATASETS, plan_json: str = "", listed: Sequence[Listed] = (),
) -> None:
    """Write the index over ``parts`` (in order) atomically: temporary name, fsync, rename.

    ``row_datasets`` names the per-row datasets every part holds; each is mapped the same way,
    so datasets added later (layers, views) need no other change here. ``listed``: rows refused
    while listing (path, reason, fingerprint), stored in ``listing/`` and mapped after the parts'
    skipped rows into ``skipped/``.
    """
    index_path = Path(index_path)
    tmp = temporary_path(index_path)
    try:
        mode_bits: int | None = os.stat(index_path).st_mode & 0o7777
    except OSError:
        mode_bits = None
    try:
        with h5py.File(tmp, "w") as f:
            _fill_index(f, parts_dir(index_path), parts, classes, attrs, row_datasets, listed)
            f.attrs["plan"] = plan_json
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if mode_bits is not None:  # an existing cache keeps its permission bits
            os.chmod(tmp, mode_bits)
        os.replace(tmp, index_path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(index_path.parent)


#: (shape after the row axis, dtype) of a row dataset when no part holds it (no parts yet).
_EMPTY_SHAPES = {"embeddings": ((0,), np.float32), "labels": ((), np.int64), "splits": ((), np.int8),
                 "paths": ((), STR_DTYPE), "fingerprints": ((2,), np.int64), "reasons": ((), STR_DTYPE)}


def _fill_index(f: h5py.File, folder: Path, parts: Sequence[PartInfo], classes: Sequence[str], attrs: dict[str, Any],
                row_datasets: Sequence[str], listed: Sequence[Listed]) -> None:
    """The index's content: each row dataset mapped over the parts, the skipped rows (the parts', then
    those refused while listing), the classes, the parts table and the attributes."""
    rel = folder.name
    rows = [p.n_rows for p in parts]
    shapes = _shapes(folder, parts, row_datasets)
    for name in row_datasets:
        tail, dt = shapes.get(name, _EMPTY_SHAPES.get(name, ((), np.float32)))
        parent, _, leaf = name.rpartition("/")  # layers/<tap>, views/...: inside groups
        _vds(f.require_group(parent) if parent else f, leaf, _Sources(rel, parts, rows), name, (tail, dt))
    if listed:
        _write_listed(f.create_group(LISTING), listed)
    g = f.create_group("skipped")
    sk_shapes = _shapes(folder, parts, SKIPPED_DATASETS, group="skipped/")
    for name in SKIPPED_DATASETS:
        own = (f"{LISTING}/{name}", len(listed)) if listed else None
        _vds(g, name, _Sources(rel, parts, [p.n_skipped for p in parts]), f"skipped/{name}",
             sk_shapes.get(name, _EMPTY_SHAPES[name]), own)
    f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=STR_DTYPE, shape=(len(classes),))
    _write_table(f.create_group("parts"), parts)
    for k, v in attrs.items():
        f.attrs[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
    emb_tail, emb_dt = shapes.get("embeddings", ((int(attrs.get("embed_dim", 0)),), np.float32))
    f.attrs.update(
        format=FORMAT, schema_version=SCHEMA_VERSION, featbank_version=__version__,
        split_names=json.dumps(list(SPLIT_NAMES)), n_samples=int(sum(rows)),
        embed_dim=int(emb_tail[0]) if emb_tail else 0, dtype=str(np.dtype(emb_dt)),
        n_parts=len(parts), parts_dir=rel,
    )


def _write_listed(g: h5py.Group, listed: Sequence[Listed]) -> None:
    n = len(listed)
    g.create_dataset("paths", data=np.array([r[0] for r in listed], dtype=object), dtype=STR_DTYPE, shape=(n,))
    g.create_dataset("reasons", data=np.array([r[1] for r in listed], dtype=object), dtype=STR_DTYPE, shape=(n,))
    g.create_dataset("fingerprints", data=np.array([list(r[2]) for r in listed], np.int64).reshape(n, 2))


def read_listed(f: h5py.File) -> list[Listed]:
    """The rows an index records as refused while listing: its ``listing/`` group, or the attribute
    ``listing_skipped`` of a cache written before that group existed.

    Raises:
        KeyError, ValueError, TypeError: the group or the attribute is malformed (``open_cache``
            says what exactly; this is for callers that only compare).
    """
    g = f.get(LISTING)
    if isinstance(g, h5py.Group):
        fps = g["fingerprints"][...].astype(np.int64).reshape(-1, 2).tolist()
        return [(k, r, (int(a), int(b))) for k, r, (a, b) in
                zip(decode_attr(g["paths"][...]), decode_attr(g["reasons"][...]), fps, strict=True)]
    raw = f.attrs.get("listing_skipped", "[]")
    rows = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    return [(str(k), str(r), (int(fp[0]), int(fp[1]))) for k, r, fp in rows]


def _write_table(g: h5py.Group, parts: Sequence[PartInfo]) -> None:
    g.create_dataset("shard_ids", data=np.array([p.shard_id for p in parts], np.int64))
    g.create_dataset("names", data=np.array([p.name for p in parts], dtype=object), dtype=STR_DTYPE, shape=(len(parts),))
    g.create_dataset("n_rows", data=np.array([p.n_rows for p in parts], np.int64))
    g.create_dataset("n_skipped", data=np.array([p.n_skipped for p in parts], np.int64))
    g.create_dataset("sizes", data=np.array([p.size for p in parts], np.int64))
    g.create_dataset("mtimes_ns", data=np.array([p.mtime_ns for p in parts], np.int64))
    g.create_dataset("sha256", data=np.array([p.sha256 for p in parts], dtype=object), dtype=STR_DTYPE, shape=(len(parts),))
    g.create_dataset("rows_digests", data=np.array([p.rows_digest for p in parts], dtype=object), dtype=STR_DTYPE,
                     shape=(len(parts),))
    g.attrs["cache_keys"] = json.dumps(sorted({p.cache_key for p in parts}))


_TABLE_COLUMNS = ("shard_ids", "names", "n_rows", "n_skipped", "sizes", "mtimes_ns", "sha256", "rows_digests")
#: A table longer than this must not list more parts than its folder holds entries (checked before it is read).
_TABLE_BOUND_FROM = 1000


def _table_error(index: Path, what: str) -> CacheError:
    return CacheError(f"Cache '{index}' is damaged: its table of parts {what}. {recreate_hint(index)}")


def _table_length(index: Path, g: h5py.Group) -> int:
    """The number of parts the table lists, from its columns' shapes, checked before any column is read:
    every column there, one-dimensional, stored inside the index, all of one length, and no more
    parts than the parts folder holds entries (a small file can declare 10^9 rows of a table)."""
    lengths = set()
    for name in _TABLE_COLUMNS:
        ds = g.get(name)
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
            raise _table_error(index, f"has no one-dimensional column 'parts/{name}'")
        why = storage_problem(ds.id)
        if why:
            raise _table_error(index, f"column 'parts/{name}' {why}")
        lengths.add(int(ds.shape[0]))
    if len(lengths) != 1:  # zip would silently drop the parts a short column does not cover
        raise _table_error(index, f"has columns of different lengths {sorted(lengths)}")
    n = lengths.pop()
    if n > _TABLE_BOUND_FROM:
        folder = parts_dir(index)
        try:
            with os.scandir(folder) as it:
                held = sum(1 for _ in itertools.islice(it, n))
        except OSError:
            held = 0
        if held < n:
            raise _table_error(index, f"lists {n} parts (field 'parts/names'), but '{folder}' holds only {held} entries")
    return n


def _check_table_values(index: Path, parts: Sequence[PartInfo]) -> None:
    """Names are plain part file names (inside ``<index>.parts/``); counts and sizes are not negative."""
    for p in parts:
        if not is_part_name(p.name):
            raise _table_error(index, f"names the part {p.name!r} (field 'parts/names'); a part must be a plain "
                               f"file name 'part-….h5' inside '{parts_dir(index).name}', never a path elsewhere")
        for field, value in (("n_rows", p.n_rows), ("n_skipped", p.n_skipped), ("sizes", p.size)):
            if value < 0:
                raise _table_error(index, f"records {field}={value} for part {p.name!r} (field 'parts/{field}')")


def read_parts_table(index: h5py.File | Path) -> list[PartInfo]:
    """The table of parts of an open index (or an index path), checked before it is trusted.

    Raises:
        CacheError: a column missing, stored outside the index or of another length; a name that is
            not a plain part file name; a negative count or size.
    """
    if not isinstance(index, h5py.File):
        with h5py.File(index, "r") as f:
            return read_parts_table(f)
    path = Path(index.filename)
    g = index.get("parts")
    if not isinstance(g, h5py.Group):
        raise _table_error(path, "(group 'parts') is missing")
    _table_length(path, g)
    key = str(index.attrs.get("cache_key", ""))
    try:
        cols = [g[c][...] for c in _TABLE_COLUMNS]
        names, sha, dig = decode_attr(cols[1]), decode_attr(cols[6]), decode_attr(cols[7])
        ints = [np.asarray(cols[i], np.int64).reshape(-1).tolist() for i in (0, 2, 3, 4, 5)]  # Python ints in one go
    except (OSError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise _table_error(path, f"cannot be read ({e})") from None
    parts = [PartInfo(a, n, b, c, d, e, h, r, key) for a, n, b, c, d, e, h, r in zip(ints[0], names, *ints[1:], sha, dig)]
    _check_table_values(path, parts)
    return parts


def _part_problem(folder: Path, p: PartInfo, full: bool) -> str:
    """What is wrong with one part on disk ("" when present and unchanged): missing, a symlink out of the
    parts folder, not a regular file (a FIFO or /dev/zero is never opened), another size, another sha256."""
    path, rel = folder / p.name, f"{folder.name}/{p.name}"
    try:
        st = check_regular_file(path)
        inside = os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)
        if not inside:
            return f"part {rel} is a link to {os.path.realpath(path)!r}, outside the cache's parts folder"
    except FileNotFoundError:
        return f"part {rel} (shard {p.shard_id}, {p.n_rows} rows) is missing"
    except NotRegularFileError as e:
        return f"part {rel} is {e.kind}, not a regular file"
    except OSError as e:
        return f"part {rel} cannot be read: {e.strerror or e}"
    if st.st_size != p.size:
        return f"part {rel} has {st.st_size} bytes, the index recorded {p.size} (truncated or replaced)"
    if not full and st.st_mtime_ns == p.mtime_ns:
        return ""
    try:
        digest = sha256_file(path, max_bytes=p.size)
    except OSError as e:
        return f"part {rel} cannot be read: {e.strerror or e}"
    return "" if digest == p.sha256 else f"part {rel} changed since the index was written (its sha256 differs)"


def check_parts(index_path: Path, parts: Sequence[PartInfo] | None = None, *, full: bool = False) -> list[str]:
    """Problems with the parts an index lists (empty when every part is present and unchanged).

    Args:
        index_path: the index file.
        parts: its table of parts, if already read.
        full: hash every part (``featbank cache verify``); otherwise hash only parts whose size
            or ``mtime_ns`` differ from the table.
    """
    index_path = Path(index_path)
    folder = parts_dir(index_path)
    parts = read_parts_table(index_path) if parts is None else parts
    return [q for q in (_part_problem(folder, p, full) for p in parts) if q]


def verify_cache(index_path: Path, *, full: bool = True, parts: Sequence[PartInfo] | None = None) -> None:
    """Raise :class:`CacheError` naming every missing or changed part of an index, and what to run.

    ``parts``: the index's table when the caller has already read it (read from the index otherwise).

    Raises:
        CacheError: a part is missing, truncated or changed.
    """
    problems = check_parts(Path(index_path), parts, full=full)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CacheError(
            f"Cache {str(index_path)!r} cannot be read: {len(problems)} of its part files are missing or "
            f"changed, and HDF5 would fill their rows with zeros:\n  {shown}\nRun 'featbank extract DATA "
            f"--out {index_path}' again to recompute those parts (the others are kept), then "
            f"'featbank cache verify {index_path}'."
        )


def finalize_index(
    index_path: Path, planned: Sequence[PlannedPart], key: str, contents: IndexContents,
    *, planned_paths: dict[int, list[str]] | None = None, known: Sequence[PartInfo] = (),
) -> list[PartInfo]:
    """Publish the index once every planned shard has its part, or refuse.

    Checks, per planned shard: its part ``part-<id>-<digest>.h5`` exists and is complete, carries
    ``key``, holds (embedded + skipped) exactly the planned number of rows, and was written for
    the planned rows (its rows digest covers paths, fingerprints, labels, splits and classes). With
    ``planned_paths`` (shard id -> sorted paths) the parts' paths are also read and compared, and
    checked unique across the whole cache. ``known`` (the previous index's table) spares hashing
    a part again whose size and ``mtime_ns`` are unchanged, so publishing costs O(changed parts).
    ``contents``: what the index records besides the parts (its ``attrs`` get ``cache_key``).

    Returns:
        The table of parts written into the index.

    Raises:
        CacheError: a shard has no part, or a part does not match the plan; nothing is published.
    """
    folder = parts_dir(Path(index_path))
    problems: list[str] = []
    parts: list[PartInfo] = []
    before = {p.name: p for p in known}
    for sp in planned:
        name = part_name(sp.shard_id, sp.rows_digest)
        path = folder / name
        try:
            st = path.stat()
        except FileNotFoundError:
            problems.append(f"shard {sp.shard_id}: no part {folder.name}/{name}")
            continue
        info = before.get(name)
        if info is None or (info.size, info.mtime_ns) != (st.st_size, st.st_mtime_ns):
            info = describe_part(path)
        if info.cache_key != key:
            problems.append(f"shard {sp.shard_id}: part {name} carries cache key {info.cache_key[:12]}…, "
                            f"the run's is {key[:12]}…")
        if info.n_rows + info.n_skipped != sp.n_rows:
            problems.append(f"shard {sp.shard_id}: part {name} holds {info.n_rows} + {info.n_skipped} skipped rows, "
                            f"the plan has {sp.n_rows}")
        if info.rows_digest != sp.rows_digest:
            problems.append(f"shard {sp.shard_id}: part {name} was written for other rows than the plan's")
        parts.append(info)
    if not problems and planned_paths is not None:
        problems += _check_paths(folder, parts, planned_paths)
    if problems:
        raise CacheError(
            f"Refusing to publish {str(index_path)!r}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:20])
            + "\nRun the extraction again (finished parts are kept), or 'featbank extract --finalize' once every worker is done."
        )
    write_index(Path(index_path), parts, contents.classes, {**contents.attrs, "cache_key": key},
                row_datasets=contents.row_datasets, plan_json=contents.plan_json, listed=contents.listed)
    return parts


def _check_paths(folder: Path, parts: Sequence[PartInfo], planned_paths: dict[int, list[str]]) -> list[str]:
    problems, seen = [], set()
    for p in parts:
        with h5py.File(folder / p.name, "r") as f:
            have = sorted(decode_attr(f["paths"][...]) + decode_attr(f["skipped/paths"][...]))
        want = planned_paths.get(p.shard_id)
        if want is not None and have != list(want):
            problems.append(f"shard {p.shard_id}: part {p.name} holds other paths than the plan's")
        dup = seen.intersection(have)
        if dup:
            problems.append(f"shard {p.shard_id}: path {sorted(dup)[0]!r} is also in another part")
        seen.update(have)
    return problems
