"""Part files of a cache: one HDF5 file per shard, holding the per-row datasets of its rows.

A part is immutable once published. It is written as ``.<name>.partial`` (datasets allocated in
full, a ``status`` flag per row set only after the row's embedding was flushed, so a killed worker
resumes inside the shard), then finished: the ``status`` dataset is dropped, rows that could not be
read are moved to ``skipped/`` (which compacts the file, the rare case), the file is fsync'ed and
renamed to ``part-<shard id>-<rows digest>.h5``. The name carries the digest of the rows it
holds, so a rewritten shard gets a new name and the index that points at the old part stays
readable until the new index replaces it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from .._files import fsync_dir, sha256_file, temporary_path
from ..errors import CacheError
from ._schema import SCHEMA_VERSION, SPLIT_NAMES, STR_DTYPE, decode_attr

__all__ = [
    "PART_FORMAT",
    "ROW_DATASETS",
    "PartRows",
    "ShardRows",
    "PartInfo",
    "PartWriter",
    "rows_digest",
    "part_name",
    "is_part_name",
    "parts_dir",
    "describe_part",
    "write_part",
    "EXTRA_ATTR",
]

PART_FORMAT = "featbank-part"
#: Per-row datasets every part holds and the index maps; layers/views add theirs to this list.
ROW_DATASETS = ("embeddings", "labels", "splits", "paths", "fingerprints")
#: Part attribute listing the per-row datasets a part holds besides ROW_DATASETS (``layers/<tap>``,
#: ``views/...``), as a JSON list.
EXTRA_ATTR = "extra_datasets"
#: Per-skipped-row datasets under ``skipped/``.
SKIPPED_DATASETS = ("paths", "reasons", "fingerprints")


@dataclass
class PartRows:
    """The planned rows of one shard, in cache order.

    Attributes:
        paths: row keys (relative paths, or ``<tar>/<__key__>``), sorted.
        fingerprints: ``int64`` ``(n, 2)``: size in bytes and ``mtime_ns`` (or a member digest).
        labels: ``int64`` ``(n,)`` indices into the cache's classes, -1 for none.
        splits: ``int8`` ``(n,)`` indices into ``SPLIT_NAMES``, -1 for none.
    """

    paths: list[str]
    fingerprints: np.ndarray
    labels: np.ndarray
    splits: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, rows: np.ndarray) -> PartRows:
        rows = np.asarray(rows, np.int64)
        return PartRows(
            [self.paths[i] for i in rows],
            np.asarray(self.fingerprints, np.int64).reshape(-1, 2)[rows],
            np.asarray(self.labels, np.int64)[rows],
            np.asarray(self.splits, np.int8)[rows],
        )


@dataclass(frozen=True)
class ShardRows:
    """What one part is written for: its shard, the run's cache key, the rows and the cache's class names."""

    shard_id: int
    key: str
    rows: PartRows
    classes: Sequence[str]


@dataclass(frozen=True)
class PartInfo:
    """One published part as the index's table of parts records it."""

    shard_id: int
    name: str
    n_rows: int
    n_skipped: int
    size: int
    mtime_ns: int
    sha256: str
    rows_digest: str
    cache_key: str


def rows_digest(rows: PartRows, classes: Sequence[str]) -> str:
    """sha256 over what a part's content depends on besides the key: rows, fingerprints, labels, splits, classes."""
    h = hashlib.sha256(json.dumps(list(classes)).encode() + b"\n")
    fps = np.asarray(rows.fingerprints, np.int64).reshape(-1, 2)
    for p, fp, lab, sp in zip(rows.paths, fps, np.asarray(rows.labels), np.asarray(rows.splits)):
        h.update(f"{p}\0{fp[0]}:{fp[1]}\0{int(lab)}\0{int(sp)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def part_name(shard_id: int, digest: str) -> str:
    """``part-000123-<first 12 hex of the rows digest>.h5``."""
    return f"part-{int(shard_id):06d}-{digest[:12]}.h5"


def is_part_name(name: str) -> bool:
    """Whether ``name`` is a plain part file name (``part-….h5``): no folder, no ``..``, not hidden, not absolute.

    An index may name only files inside its own ``<index>.parts/`` folder; a name such as
    ``../other.h5.parts/part-….h5`` or ``/abs/part.h5`` would read another cache's rows.
    """
    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.h5", name)) and ".." not in name


def parts_dir(index_path: Path) -> Path:
    """The folder of an index's parts: ``<index file name>.parts`` beside it."""
    index_path = Path(index_path)
    return index_path.with_name(index_path.name + ".parts")


def _create_allocated(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any, fill: bool = True) -> h5py.Dataset:
    """Contiguous and allocated now: later row writes change no HDF5 metadata, and reads are one slab.

    Without ``fill`` no byte is written now: the space is reserved in the file's address range only
    (a sparse file on disk), so a staging file costs disk as its rows are written, not up front.
    Only for datasets whose rows are read once a ``status`` row says they were written.
    """
    from h5py import h5d, h5p, h5s, h5t

    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5d.FILL_TIME_ALLOC if fill else h5d.FILL_TIME_NEVER)
    tid = h5t.py_create(np.dtype(dtype), logical=True)
    return h5py.Dataset(h5d.create(group.id, name.encode(), tid, h5s.create_simple(shape), dcpl=dcpl))


def _create_extra(f: h5py.File, name: str, shape: tuple[int, ...], dtype: Any, fill: bool = True) -> h5py.Dataset:
    """An allocated per-row dataset at a path that may name a group (``layers/stage3``)."""
    parent, _, leaf = name.rpartition("/")
    return _create_allocated(f.require_group(parent) if parent else f, leaf, shape, dtype, fill)


def _write_rows(f: h5py.File, rows: PartRows, classes: Sequence[str]) -> None:
    n = len(rows)
    f.create_dataset("paths", data=np.array(rows.paths, dtype=object), dtype=STR_DTYPE, shape=(n,))
    f.create_dataset("fingerprints", data=np.asarray(rows.fingerprints, np.int64).reshape(n, 2))
    f.create_dataset("labels", data=np.asarray(rows.labels, np.int64).reshape(n))
    f.create_dataset("splits", data=np.asarray(rows.splits, np.int8).reshape(n))
    f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=STR_DTYPE, shape=(len(classes),))


def _write_skipped(f: h5py.File, skipped: list[tuple[str, str, tuple[int, int]]]) -> None:
    g = f.require_group("skipped")
    m = len(skipped)
    g.create_dataset("paths", data=np.array([s[0] for s in skipped], dtype=object), dtype=STR_DTYPE, shape=(m,))
    g.create_dataset("reasons", data=np.array([s[1] for s in skipped], dtype=object), dtype=STR_DTYPE, shape=(m,))
    g.create_dataset("fingerprints", data=np.array([s[2] for s in skipped], np.int64).reshape(m, 2))


class PartWriter:
    """The ``.partial`` file of one shard in flight; what the embedding loop writes into.

    Attributes ``paths``, ``embeddings``, ``status``, ``file`` and the methods ``done_mask`` and
    ``write_rows`` are what the embedding loop (``featbank.extraction.units``) uses.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = h5py.File(self.path, "r+")
        f = self.file
        self.key = str(f.attrs["cache_key"])
        self.shard_id = int(f.attrs["shard_id"])
        self.digest = str(f.attrs["rows_digest"])
        self.classes = decode_attr(f["classes"][...])
        self.rows = PartRows(
            decode_attr(f["paths"][...]), f["fingerprints"][...].astype(np.int64),
            f["labels"][...].astype(np.int64), f["splits"][...].astype(np.int8),
        )
        self.paths = self.rows.paths
        self.embeddings = f["embeddings"]
        self.status = f["status"]
        #: ``{name: dataset}`` of the layers/views datasets this part holds besides ``embeddings``.
        self.extra = {n: f[n] for n in json.loads(str(f.attrs.get(EXTRA_ATTR, "[]")))}

    @staticmethod
    def partial_path(folder: Path, shard_id: int, digest: str) -> Path:
        return Path(folder) / ("." + part_name(shard_id, digest) + ".partial")

    @classmethod
    def create(
        cls, folder: Path, shard: ShardRows, embed_dim: int, dtype: str, attrs: dict[str, Any] | None = None,
        extra: dict[str, tuple[int, ...]] | None = None,
    ) -> PartWriter:
        """A new ``.partial`` for the rows of ``shard`` (written under a temporary name, then renamed).

        ``extra`` maps the per-row datasets a run stores besides ``embeddings`` (``layers/<tap>``,
        ``views/...``) to their trailing shape; they get ``dtype`` too.
        """
        shard_id, key, rows, classes = shard.shard_id, shard.key, shard.rows, shard.classes
        digest = rows_digest(rows, classes)
        path = cls.partial_path(folder, shard_id, digest)
        tmp = temporary_path(path)
        n = len(rows)
        try:  # a failed or interrupted create leaves no temporary behind
            with h5py.File(tmp, "w") as f:
                for k, v in (attrs or {}).items():
                    f.attrs[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
                f.attrs.update(
                    format=PART_FORMAT, schema_version=SCHEMA_VERSION, featbank_version=__version__, cache_key=key,
                    shard_id=int(shard_id), rows_digest=digest, embed_dim=int(embed_dim), dtype=dtype,
                    split_names=json.dumps(list(SPLIT_NAMES)), classes_json=json.dumps(list(classes)),
                    complete=False,
                )
                _write_rows(f, rows, classes)
                # Rows are read only once 'status' marks them written: no fill, so no multi-GB write up front.
                _create_allocated(f, "embeddings", (n, int(embed_dim)), dtype, fill=False)
                _create_allocated(f, "status", (n,), np.uint8)
                for name, tail in (extra or {}).items():
                    _create_extra(f, name, (n, *tail), dtype, fill=False)
                if extra:
                    f.attrs[EXTRA_ATTR] = json.dumps(list(extra))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return cls(path)

    @classmethod
    def open_if_valid(cls, folder: Path, shard_id: int, key: str, digest: str) -> PartWriter | None:
        """The ``.partial`` of an earlier run for exactly these rows and key; ``None`` otherwise."""
        path = cls.partial_path(folder, shard_id, digest)
        if not path.exists():
            return None
        try:
            w = cls(path)
        except BlockingIOError:
            raise CacheError(
                f"{str(path)!r} (an unfinished part of the cache) is open in another program, which holds HDF5's "
                "file lock. Close it there and rerun; the file was left untouched."
            ) from None
        except Exception:  # noqa: BLE001 - a corrupt partial counts as empty
            path.unlink(missing_ok=True)
            return None
        if w.key != key or w.digest != digest:
            w.close()
            path.unlink(missing_ok=True)
            return None
        return w

    def done_mask(self) -> np.ndarray:
        return self.status[...] == 1 if len(self.paths) else np.zeros(0, bool)

    def write_rows(self, rows: np.ndarray, emb: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> None:
        """Write embeddings of ``rows`` (ascending), flush, then mark them done and flush again.

        ``extra`` holds the rows of the other per-row datasets (``layers/...``, ``views/...``),
        written before the embeddings, so a row marked done has all of them.
        """
        if len(rows) == 0:
            return
        rows = np.asarray(rows, np.int64)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        for name, values in (extra or {}).items():
            if hi - lo == len(rows):
                self.extra[name][lo:hi] = values
            else:
                for r, v in zip(rows, values):
                    self.extra[name][int(r)] = v
        if hi - lo == len(rows):
            self.embeddings[lo:hi] = emb
            self.file.flush()
            self.status[lo:hi] = 1
        else:
            for r, e in zip(rows, emb):
                self.embeddings[int(r)] = e
            self.file.flush()
            for r in rows:
                self.status[int(r)] = 1
        self.file.flush()

    def finish(self, skipped: dict[int, str]) -> PartInfo:
        """Publish the part: every row is done or in ``skipped`` (row -> reason)."""
        done = self.done_mask()
        missing = np.flatnonzero(~done & ~np.isin(np.arange(len(done)), list(skipped)))
        if missing.size:
            raise CacheError(
                f"Part {self.path.name} of shard {self.shard_id} has {missing.size} row(s) neither embedded "
                "nor skipped; run the extraction again to finish it."
            )
        final = self.path.with_name(part_name(self.shard_id, self.digest))
        if skipped:
            info = self._finish_compacted(final, skipped)
        else:
            del self.file["status"]
            self.file.attrs["complete"] = True
            self.file.attrs["n_samples"] = len(self.paths)
            _write_skipped(self.file, [])
            self.file.flush()
            self.close()
            with open(self.path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.path, final)
            info = describe_part(final)
        fsync_dir(final.parent)
        return info

    def _finish_compacted(self, final: Path, skipped: dict[int, str]) -> PartInfo:
        keep = np.flatnonzero(~np.isin(np.arange(len(self.paths)), list(skipped)))
        emb = self.embeddings[...][keep]
        extra = {n: ds[...][keep] for n, ds in self.extra.items()}
        bad = [(self.paths[r], why, tuple(int(v) for v in self.rows.fingerprints[r])) for r, why in sorted(skipped.items())]
        attrs = {k: v for k, v in self.file.attrs.items() if k not in ("complete", EXTRA_ATTR)}
        self.close()
        shard = ShardRows(self.shard_id, self.key, self.rows.take(keep), self.classes)
        info = write_part(final.parent, shard, emb, bad, attrs=attrs, digest=self.digest, extra=extra)
        self.path.unlink(missing_ok=True)
        return info

    def close(self) -> None:
        try:
            self.file.close()
        except Exception:  # noqa: BLE001
            pass


def write_part(
    folder: Path, shard: ShardRows, embeddings: np.ndarray, skipped: list[tuple[str, str, tuple[int, int]]] | None = None,
    *, attrs: dict[str, Any] | None = None, digest: str | None = None, extra: dict[str, np.ndarray] | None = None,
) -> PartInfo:
    """Write a complete part from arrays in one go (temporary name, fsync, rename) and describe it.

    ``shard.rows`` are the rows embedded (one per row of ``embeddings``); ``skipped``: the planned
    rows that were not, as (path, reason, fingerprint). ``digest`` is the digest of the *planned*
    rows (skipped ones included); default: of ``shard.rows``. ``extra``: the other per-row datasets
    (``layers/<tap>``, ``views/...``), one row per row.
    """
    shard_id, key, rows, classes = shard.shard_id, shard.key, shard.rows, shard.classes
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digest = digest or rows_digest(rows, classes)
    final = folder / part_name(shard_id, digest)
    tmp = temporary_path(final)
    embeddings = np.asarray(embeddings)
    n = len(rows)
    if embeddings.shape[0] != n:
        raise CacheError(f"internal error: {embeddings.shape[0]} embeddings for {n} rows")  # pragma: no cover
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
            f.attrs.update(
                format=PART_FORMAT, schema_version=SCHEMA_VERSION, featbank_version=__version__, cache_key=key,
                shard_id=int(shard_id), rows_digest=digest, embed_dim=int(embeddings.shape[1]),
                dtype=str(embeddings.dtype), split_names=json.dumps(list(SPLIT_NAMES)),
                classes_json=json.dumps(list(classes)), complete=True, n_samples=n,
            )
            _write_rows(f, rows, classes)
            ds = _create_allocated(f, "embeddings", embeddings.shape, embeddings.dtype)
            if n:
                ds[...] = embeddings
            for name, values in (extra or {}).items():
                values = np.asarray(values)
                eds = _create_extra(f, name, values.shape, values.dtype)
                if n:
                    eds[...] = values
            if extra:
                f.attrs[EXTRA_ATTR] = json.dumps(list(extra))
            _write_skipped(f, list(skipped or []))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(folder)
    return describe_part(final)


def describe_part(path: Path) -> PartInfo:
    """Read a published part's attributes and hash its bytes.

    Raises:
        CacheError: not a complete featbank part.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != PART_FORMAT or not bool(f.attrs.get("complete", False)):
                raise CacheError(f"{str(path)!r} is not a complete featbank part file.")
            n_rows = int(f["paths"].shape[0])
            n_skipped = int(f["skipped/paths"].shape[0])
            shard_id = int(f.attrs["shard_id"])
            digest = str(f.attrs["rows_digest"])
            key = str(f.attrs["cache_key"])
    except OSError as e:
        raise CacheError(f"Part {str(path)!r} is not a readable HDF5 file ({e}).") from None
    st = path.stat()
    return PartInfo(shard_id, path.name, n_rows, n_skipped, st.st_size, st.st_mtime_ns, sha256_file(path), digest, key)
