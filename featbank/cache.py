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
resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from . import __version__
from .errors import CacheError, CacheKeyMismatch

__all__ = [
    "writer_lock",
    "SCHEMA_VERSION",
    "SPLIT_NAMES",
    "FeatureCache",
    "open_cache",
    "compute_cache_key",
    "default_cache_dir",
    "find_latest_cache",
]

SCHEMA_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
_FORMAT = "featbank-cache"
_STR = h5py.string_dtype("utf-8")
# The embedding computation of this featbank line; bump when extraction changes numerically.
EMBEDDING_VERSION = "1"


def default_cache_dir() -> Path:
    """``$FEATBANK_CACHE_DIR``, else ``$XDG_CACHE_HOME/featbank``, else ``~/.cache/featbank``."""
    env = os.environ.get("FEATBANK_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "featbank"


def find_latest_cache(directory: Path | None = None) -> Path:
    """The most recently written complete cache in the default cache folder."""
    d = (directory or default_cache_dir()) / "caches"
    files = [p for p in d.glob("*.h5") if p.is_file()] if d.is_dir() else []
    if not files:
        raise CacheError(
            f"No feature cache found in {d}. Run 'featbank extract DATA' first, or pass the cache "
            "path explicitly."
        )
    return max(files, key=lambda p: p.stat().st_mtime_ns)


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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _decode(arr: np.ndarray) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in arr]


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


class FeatureCache:
    """A featbank cache opened for reading. Embeddings stay on disk until asked for.

    Use :func:`open_cache`. Attributes hold the small per-row arrays in memory; ``embeddings`` is
    the h5py dataset (lazy, sliceable); :meth:`load_embeddings` reads rows into memory.

    Attributes:
        path: the file.
        metadata: every file attribute (schema version, backbone, weights sha256, transform, ...).
        classes: class names; ``labels`` index into them.
        paths: relative image paths, one per row.
        labels: int64 labels, -1 for unlabelled rows.
        splits: int8 split codes into ``SPLIT_NAMES``, -1 for rows with no split.
        skipped: ``[(path, reason), ...]`` for files that could not be read.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(
                f"Cache {str(self.path)!r} does not exist. Run 'featbank extract DATA --out "
                f"{self.path}' first."
            )
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise CacheError(
                f"{str(self.path)!r} is not a readable HDF5 file ({e}). Re-create it with "
                "'featbank extract DATA --overwrite'."
            ) from None
        f = self._file
        if f.attrs.get("format") != _FORMAT:
            self._file.close()
            raise CacheError(
                f"{str(self.path)!r} is an HDF5 file but not a featbank cache (no "
                f"format={_FORMAT!r} attribute). Point at a file written by 'featbank extract'."
            )
        version = int(f.attrs.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            self._file.close()
            raise CacheError(
                f"{str(self.path)!r} has cache schema version {version}; this featbank "
                f"({__version__}) reads version {SCHEMA_VERSION}. Re-extract with "
                "'featbank extract DATA --overwrite'."
            )
        self.metadata: dict[str, Any] = {}
        for k, v in f.attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            if isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, str) and k in ("transform", "engines"):
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            self.metadata[k] = v
        self.embeddings: h5py.Dataset = f["embeddings"]
        self.labels = f["labels"][...].astype(np.int64)
        self.splits = f["splits"][...].astype(np.int8)
        self.paths = _decode(f["paths"][...])
        self.fingerprints = f["fingerprints"][...].astype(np.int64)
        self.classes = _decode(f["classes"][...])
        sk = f.get("skipped")
        self.skipped: list[tuple[str, str]] = (
            list(zip(_decode(sk["paths"][...]), _decode(sk["reasons"][...]))) if sk is not None else []
        )
        self.skipped_fingerprints = (
            sk["fingerprints"][...].astype(np.int64) if sk is not None else np.zeros((0, 2), np.int64)
        )

    # -- convenience -------------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def cache_key(self) -> str:
        return str(self.metadata.get("cache_key", ""))

    @property
    def root(self) -> Path:
        return Path(str(self.metadata.get("root", "")))

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(json.loads(self.metadata.get("split_names", json.dumps(SPLIT_NAMES))))

    def has_split(self, name: str) -> bool:
        return bool(np.any(self.split_mask(name)))

    def split_mask(self, name: str) -> np.ndarray:
        """Boolean row mask of split ``name`` (``train``, ``val`` or ``test``)."""
        names = self.split_names
        if name not in names:
            raise ValueError(f"Unknown split {name!r}; expected one of {names}.")
        return self.splits == names.index(name)

    def load_embeddings(self, rows: np.ndarray | Sequence[int] | None = None, dtype=np.float32) -> np.ndarray:
        """Read embeddings into memory: all rows, or the given row indices / boolean mask."""
        if rows is None:
            return self.embeddings[...].astype(dtype, copy=False)
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if rows.size == 0:
            return np.zeros((0, self.embed_dim), dtype)
        uniq, inverse = np.unique(rows, return_inverse=True)
        if uniq[0] < 0 or uniq[-1] >= self.n_samples:
            raise IndexError(f"row indices must lie in [0, {self.n_samples}); got {uniq[0]}..{uniq[-1]}")
        return self._read_sorted(uniq, dtype)[inverse.reshape(-1)]

    def _read_sorted(self, rows: np.ndarray, dtype: Any, block_rows: int = 1 << 14) -> np.ndarray:
        # h5py's point selection is slow for many rows: read contiguous slabs and pick in numpy.
        out = np.empty((len(rows), self.embed_dim), dtype)
        pos = 0
        while pos < len(rows):
            lo = int(rows[pos])
            end = int(np.searchsorted(rows, lo + block_rows, side="left"))
            hi = int(rows[end - 1]) + 1
            if (np.dtype(dtype) == self.embeddings.dtype and hi - lo == end - pos
                    and bool(np.all(np.diff(rows[pos:end]) == 1))):
                self.embeddings.read_direct(out, np.s_[lo:hi], np.s_[pos:end])  # contiguous: no copy
            else:
                slab = self.embeddings[lo:hi]
                out[pos:end] = slab[rows[pos:end] - lo]
            pos = end
        return out

    def iter_chunks(self, rows: np.ndarray, chunk_rows: int, dtype=np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row_indices, embeddings)`` in chunks of at most ``chunk_rows`` sorted rows."""
        rows = np.sort(np.asarray(rows))
        for start in range(0, len(rows), chunk_rows):
            idx = rows[start : start + chunk_rows]
            yield idx, self._read_sorted(idx, dtype)

    def abspath(self, rel: str) -> Path:
        return self.root / rel

    def close(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n_samples

    def __repr__(self) -> str:
        return (
            f"FeatureCache({str(self.path)!r}, n_samples={self.n_samples}, embed_dim={self.embed_dim}, "
            f"n_classes={self.n_classes}, backbone={self.metadata.get('backbone')!r})"
        )


def open_cache(path: str | os.PathLike | None = None) -> FeatureCache:
    """Open a featbank cache for reading; with no path, the latest one in the default folder.

    Raises:
        CacheError: missing, unreadable, not a featbank cache, or of another schema version.

    Example:
        >>> with open_cache("runs/elpv.h5") as cache:
        ...     X = cache.load_embeddings(cache.split_mask("train"))
    """
    return FeatureCache(path if path is not None else find_latest_cache())


# --------------------------------------------------------------------------------------------
# Writing (used by extract)
# --------------------------------------------------------------------------------------------


@dataclass
class CacheState:
    """What an existing cache holds, read for planning an incremental run."""

    key: str
    metadata: dict[str, Any]
    paths: list[str]
    fingerprints: np.ndarray
    skipped_paths: list[str]
    skipped_reasons: list[str]
    skipped_fingerprints: np.ndarray
    embed_dim: int


def read_state(path: Path) -> CacheState | None:
    """The state of the cache at ``path``; ``None`` when there is no file.

    Raises:
        CacheError: the file exists but is not a readable featbank cache of this schema.
    """
    if not path.exists():
        return None
    with FeatureCache(path) as c:
        return CacheState(
            key=c.cache_key,
            metadata=dict(c.metadata),
            paths=c.paths,
            fingerprints=c.fingerprints,
            skipped_paths=[p for p, _ in c.skipped],
            skipped_reasons=[r for _, r in c.skipped],
            skipped_fingerprints=c.skipped_fingerprints,
            embed_dim=c.embed_dim,
        )


def check_key(path: Path, state: CacheState, key: str, wanted: dict[str, Any]) -> None:
    """Raise :class:`CacheKeyMismatch` naming what differs, when ``state.key != key``."""
    if state.key == key:
        return
    diffs = []
    for name in ("backbone", "weights", "weights_sha256", "dtype", "precision", "transform"):
        have, want = state.metadata.get(name), wanted.get(name)
        if name == "transform" and isinstance(want, dict):
            want = json.loads(json.dumps(want))
        if have != want:
            diffs.append(f"{name}: cache has {have!r}, asked for {want!r}")
    if not diffs:
        diffs.append(
            f"featbank version / embedding version: cache written by featbank "
            f"{state.metadata.get('featbank_version')!r}"
        )
    raise CacheKeyMismatch(
        f"Cache {str(path)!r} was made with other settings, so its embeddings would not match:\n  "
        + "\n  ".join(diffs)
        + "\nThe file was left untouched. Pass --overwrite to replace it, or choose another --out."
    )


def _create_contiguous(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any) -> h5py.Dataset:
    """A dataset allocated in full now, so later writes to it change no HDF5 metadata."""
    from h5py import h5d, h5p, h5s, h5t

    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5d.FILL_TIME_ALLOC)
    space = h5s.create_simple(shape)
    tid = h5t.py_create(np.dtype(dtype), logical=True)
    dsid = h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)
    return h5py.Dataset(dsid)


class StagingFile:
    """The ``<cache>.partial`` file of one run: the rows to embed and which are done."""

    def __init__(self, path: Path, mode: str = "r+"):
        self.path = path
        self.file = h5py.File(path, mode)
        f = self.file
        self.key = str(f.attrs["cache_key"])
        self.plan = str(f.attrs["plan"])
        self.paths = _decode(f["paths"][...])
        self.fingerprints = f["fingerprints"][...].astype(np.int64)
        self.labels = f["labels"][...].astype(np.int64)
        self.splits = f["splits"][...].astype(np.int8)
        self.embeddings = f["embeddings"]
        self.status = f["status"]

    @staticmethod
    def create(
        path: Path,
        key: str,
        plan: str,
        paths: list[str],
        fingerprints: np.ndarray,
        labels: np.ndarray,
        splits: np.ndarray,
        embed_dim: int,
        dtype: str,
    ) -> "StagingFile":
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = "featbank-partial"
            f.attrs["cache_key"] = key
            f.attrs["plan"] = plan
            f.attrs["featbank_version"] = __version__
            n = len(paths)
            f.create_dataset("paths", data=np.array(paths, dtype=object), dtype=_STR)
            f.create_dataset("fingerprints", data=np.asarray(fingerprints, np.int64).reshape(n, 2))
            f.create_dataset("labels", data=np.asarray(labels, np.int64))
            f.create_dataset("splits", data=np.asarray(splits, np.int8))
            _create_contiguous(f, "embeddings", (max(n, 1), embed_dim), dtype)
            _create_contiguous(f, "status", (max(n, 1),), np.uint8)
        os.replace(tmp, path)
        return StagingFile(path)

    @staticmethod
    def open_if_valid(path: Path) -> "StagingFile | None":
        """Open a staging file left by an earlier run; ``None`` if absent or unreadable."""
        if not path.exists():
            return None
        try:
            return StagingFile(path)
        except BlockingIOError:
            raise CacheError(
                f"{str(path)!r} (an unfinished cache) is open in another program, which holds HDF5's file "
                "lock. Close it there and rerun; the file was left untouched."
            ) from None
        except Exception:  # noqa: BLE001 - a corrupt staging file counts as empty
            try:
                path.unlink()
            except OSError:
                pass
            return None

    def done_mask(self) -> np.ndarray:
        n = len(self.paths)
        return self.status[:n] == 1 if n else np.zeros(0, bool)

    def write_rows(self, rows: np.ndarray, emb: np.ndarray) -> None:
        """Write embeddings of ``rows`` (ascending) and then mark them done, each step flushed."""
        if len(rows) == 0:
            return
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == len(rows):
            self.embeddings[lo:hi] = emb
        else:
            for r, e in zip(rows, emb):
                self.embeddings[int(r)] = e
        self.file.flush()
        if hi - lo == len(rows):
            self.status[lo:hi] = 1
        else:
            for r in rows:
                self.status[int(r)] = 1
        self.file.flush()

    def close(self) -> None:
        try:
            self.file.close()
        except Exception:  # noqa: BLE001
            pass


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

    ``sources`` lists, for each final row in order, where its embedding comes from: each entry
    is ``(kind, file, src_rows)`` covering a contiguous run of final rows is too fiddly, so we
    take one array per source: ``sources[i] = (name, h5 path, mapping)`` where ``mapping`` is an
    int64 array with, for every final row, the source row or -1. Rows are copied in blocks, so
    memory stays bounded whatever N is.
    """
    n = len(order_paths)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    opened = {}
    try:
        for name, src_path, _ in sources:
            if src_path is not None and name not in opened:
                opened[name] = h5py.File(src_path, "r")
        with h5py.File(tmp, "w") as f:
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
            f.create_dataset("labels", data=np.asarray(row_labels, np.int64), maxshape=(None,), chunks=True)
            f.create_dataset("splits", data=np.asarray(row_splits, np.int8), maxshape=(None,), chunks=True)
            f.create_dataset(
                "paths", data=np.array(order_paths, dtype=object), dtype=_STR, maxshape=(None,), chunks=True
            )
            f.create_dataset(
                "fingerprints",
                data=np.asarray(row_fingerprints, np.int64).reshape(n, 2),
                maxshape=(None, 2),
                chunks=True,
            )
            f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=_STR)
            g = f.create_group("skipped")
            g.create_dataset("paths", data=np.array([s[0] for s in skipped], dtype=object), dtype=_STR)
            g.create_dataset("reasons", data=np.array([s[1] for s in skipped], dtype=object), dtype=_STR)
            g.create_dataset(
                "fingerprints", data=np.array([s[2] for s in skipped], np.int64).reshape(len(skipped), 2)
            )
            f.attrs["format"] = _FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["featbank_version"] = __version__
            f.attrs["split_names"] = json.dumps(list(SPLIT_NAMES))
            f.attrs["n_samples"] = n
            f.attrs["embed_dim"] = embed_dim
            f.attrs["dtype"] = dtype
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        try:
            dfd = os.open(path.parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        except OSError:
            pass
    finally:
        for h in opened.values():
            h.close()
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------------
# One writer per cache file
# --------------------------------------------------------------------------------------------

_HELD: dict[str, int] = {}


@contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold ``<path>.lock`` (an advisory ``flock``) while this process writes the cache ``path``.

    A second process that wants to write the same cache gets a :class:`CacheError` at once
    instead of sharing its staging file. Re-entrant within a process. The lock file is removed on
    release; a stale one (its process died) is taken over, since the kernel drops ``flock`` locks
    with the process. Without ``fcntl`` (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = Path(str(Path(path).expanduser().resolve()) + ".lock")
    key = str(lock)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CacheError(
                f"Cannot write next to {str(path)!r}: creating {str(lock)!r} failed ({e.strerror or e}). "
                "Choose an --out in a folder you can write to."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise CacheError(
                f"Another process (pid {holder}) is writing {str(path)!r} right now (it holds {str(lock)!r}). "
                "Wait for it to finish, or write to another --out."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by its last holder between our open and flock: retry
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _HELD[key] = 1
        yield
    finally:
        _HELD.pop(key, None)
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)
