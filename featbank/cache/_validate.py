"""Checks of a cache file against its schema (v2, and v1 alike), run when it is opened and when rows are read.

Opening checks what is cheap to read (attributes, the small per-row arrays, dataset shapes), so
``open_cache`` stays lazy on the embeddings. Embedding values (NaN/inf, extreme magnitudes) are
checked block by block as rows are read (:func:`check_rows`), so no extra pass over a large file
is ever made and every reader (fit, evaluate, streaming) is covered.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
from h5py import h5d

from .._files import open_regular_file
from ..errors import CacheError, ExtremeEmbeddingsWarning, NotACacheError
from ._home import default_cache_dir

__all__ = [
    "OpenCache",
    "EXTREME_VALUE",
    "HDF5_SIGNATURE",
    "is_hdf5",
    "recreate_hint",
    "check_file_kind",
    "check_schema_version",
    "check_structure",
    "check_codes",
    "check_rows",
    "within_bounds",
    "parse_json_attr",
    "storage_problem",
]

#: An embedding row with a component larger than this in absolute value is "extreme": real
#: backbones give values of order 1-100, and standardising a row of 1e38 overflows float32.
EXTREME_VALUE = 1e6
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Datasets every cache has (a v2 index and a v1 file alike), with the number of dimensions each must have.
_REQUIRED = {"embeddings": 2, "labels": 1, "splits": 1, "paths": 1, "fingerprints": 2, "classes": 1}



class OpenCache(Protocol):
    """What the row checks read of an open cache (:class:`~featbank.cache.FeatureCache` has it all).

    A Protocol, because these checks stand below the reader that calls them.
    """

    path: Path
    metadata: dict[str, Any]
    paths: list[str]
    extreme: str
    extreme_rows: set[int]


def is_hdf5(path: Path) -> bool:
    """Whether ``path`` starts with the HDF5 signature (at 0 or a power-of-two user-block offset)."""
    try:
        with open_regular_file(path) as fh:  # a FIFO is refused, not waited on
            for offset in (0, 512, 1024, 2048, 4096):
                fh.seek(offset)
                if fh.read(8) == HDF5_SIGNATURE:
                    return True
    except OSError:
        return False
    return False


def recreate_hint(path: Path, root: Any = None) -> str:
    """What to type to rebuild the cache at ``path`` (its data folder when the file names one)."""
    data = root if isinstance(root, str) and root else "DATA"
    return f"Re-create it with 'featbank extract {data} --out {path} --overwrite'."


def _fail(path: Path, field: str, what: str, root: Any) -> CacheError:
    return CacheError(f"Cache '{path}' is damaged: {field} {what}. {recreate_hint(path, root)}")


def parse_json_attr(path: Path, name: str, value: Any, root: Any = None) -> Any:
    """The JSON attribute ``name`` decoded; a :class:`CacheError` naming it when it is not JSON."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise _fail(path, f"attribute '{name}'", f"is {value!r} ({type(value).__name__}), not a JSON string", root)
    try:
        return json.loads(value)
    except ValueError:
        raise _fail(path, f"attribute '{name}'", f"is not valid JSON: {value[:60]!r}", root) from None


def check_schema_version(path: Path, value: Any, expected: int | tuple[int, ...], version: str) -> None:
    """``schema_version`` must be one of the integers ``expected`` (the versions this featbank reads)."""
    readable = (expected,) if isinstance(expected, int) else tuple(expected)
    words = " and ".join(str(v) for v in readable)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise CacheError(
            f"Cache '{path}' is damaged: attribute 'schema_version' is {value!r} "
            f"({type(value).__name__}), expected the integer {' or '.join(str(v) for v in readable)}. "
            f"{recreate_hint(path)}"
        )
    if int(value) not in readable:
        raise CacheError(
            f"'{path}' has cache schema version {int(value)}; this featbank ({version}) reads "
            f"version{'s' if len(readable) > 1 else ''} {words}. Upgrade featbank to read it, or "
            f"{recreate_hint(path)[0].lower()}{recreate_hint(path)[1:]}"
        )


def check_structure(path: Path, f: h5py.File, root: Any) -> None:
    """Every required dataset is there, with the right rank, kind and length."""
    for name, ndim in _REQUIRED.items():
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset):
            raise _fail(path, f"dataset '{name}'", "is missing", root)
        if ds.ndim != ndim:
            raise _fail(path, f"dataset '{name}'", f"has shape {ds.shape}, expected {ndim} dimension(s)", root)
    emb = f["embeddings"]
    if emb.dtype.kind != "f" or emb.shape[1] < 1:
        raise _fail(path, "dataset 'embeddings'", f"has shape {emb.shape} and dtype {emb.dtype}, "
                    "expected (n_samples, embed_dim) floats", root)
    n = emb.shape[0]
    for name, shape in (("paths", (n,)), ("labels", (n,)), ("splits", (n,)), ("fingerprints", (n, 2))):
        if f[name].shape != shape:
            raise _fail(path, f"dataset '{name}'", f"has shape {f[name].shape}, but 'embeddings' has {n} rows "
                        f"(expected {shape})", root)
    for name in ("labels", "splits", "fingerprints"):
        if f[name].dtype.kind not in "iu":
            raise _fail(path, f"dataset '{name}'", f"has dtype {f[name].dtype}, expected integers", root)
    sk = f.get("skipped")
    if sk is not None:
        sizes = {k: (sk[k].shape[0] if isinstance(sk.get(k), h5py.Dataset) and sk[k].ndim else None)
                 for k in ("paths", "reasons", "fingerprints")}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise _fail(path, "group 'skipped'", f"has datasets of lengths {sizes}, expected three equal", root)


def check_codes(path: Path, labels: np.ndarray, splits: np.ndarray, n_classes: int, split_names: tuple, root: Any) -> None:
    """Labels index ``classes`` (or are -1); split codes index ``split_names`` (or are -1)."""
    for name, codes, n in (("labels", labels, n_classes), ("splits", splits, len(split_names))):
        bad = np.flatnonzero((codes < -1) | (codes >= n))
        if bad.size:
            allowed = f"-1..{n - 1}" if n else "-1 (there are no classes)"
            raise _fail(path, f"dataset '{name}'", f"has value {int(codes[bad[0]])} at row {int(bad[0])} "
                        f"({bad.size} such rows); allowed: {allowed}", root)


def within_bounds(block: np.ndarray) -> bool:
    """True when every value of ``block`` is finite and within +-EXTREME_VALUE, decided in one pass.

    False means "check exactly" (:func:`check_rows`), not "bad". The sum of squares is NaN or inf
    when a value is, and no smaller than a square beyond EXTREME_VALUE**2 (rounding is monotone and
    every term >= 0), so a sum under half that proves the block clean; it costs one BLAS dot, a third
    of the row-wise maximum of ``np.abs``, which also allocates a copy of the block.
    """
    if block.dtype not in (np.float32, np.float64) or not block.flags.c_contiguous:
        return False
    flat = block.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow only means "check exactly"
        return bool(np.dot(flat, flat) < 0.5 * EXTREME_VALUE**2)


def check_rows(cache: OpenCache, rows: np.ndarray, block: np.ndarray, policy: str) -> None:
    """Refuse NaN/inf rows; refuse or warn about extreme rows (``policy``: raise, warn or ignore).

    ``rows`` are the cache rows of ``block``'s lines. Called on every block a reader reads.
    """
    if block.size == 0:
        return
    peak = np.abs(block).max(axis=1)  # one pass: NaN and inf propagate into the row maximum
    finite = np.isfinite(peak)
    if not finite.all():
        bad = rows[~finite]
        raise CacheError(
            f"Cache '{cache.path}' is damaged: dataset 'embeddings' has NaN or infinite values in "
            f"{bad.size} row(s) of this read, e.g. {_name_rows(cache, bad)}. "
            f"{recreate_hint(cache.path, cache.metadata.get('root'))}"
        )
    if policy == "ignore":
        return
    extreme = peak > EXTREME_VALUE
    if not extreme.any():
        return
    bad = rows[extreme]
    msg = (f"Cache '{cache.path}': dataset 'embeddings' has {bad.size} row(s) with values beyond "
           f"+-{EXTREME_VALUE:g}, which would ruin a standardised fit: {_name_rows(cache, bad)}.")
    if policy == "raise":
        raise CacheError(
            f"{msg} Check those images and re-extract ('featbank extract DATA --overwrite'), or remove them; "
            "open_cache(path, extreme='warn') reads them anyway."
        )
    new = [int(r) for r in bad if int(r) not in cache.extreme_rows]
    cache.extreme_rows.update(new)
    if new:
        warnings.warn(msg, ExtremeEmbeddingsWarning, stacklevel=4)


def _name_rows(cache: OpenCache, rows: np.ndarray, limit: int = 5) -> str:
    names = [f"row {int(r)} ({cache.paths[int(r)]!r})" for r in rows[:limit]]
    return ", ".join(names) + (f" and {rows.size - limit} more" if rows.size > limit else "")


def check_file_kind(path: Path) -> None:
    """Raise :class:`NotACacheError` when ``path`` is a non-empty file that is not HDF5."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size and not is_hdf5(path):
        raise NotACacheError(
            f"'{path}' is not a featbank cache (not an HDF5 file). Pass a cache written by "
            f"'featbank extract' (an .h5 file), such as those in '{default_cache_dir() / 'caches'}'."
        )


def storage_problem(dsid: h5d.DatasetID) -> str:
    """What keeps a dataset from holding every one of its values inside its own file ("" when nothing).

    Refused: HDF5 external storage (its bytes live in another file, or ``/dev/zero``), a virtual
    layout (its rows live in other files), and storage that was never written (HDF5 hands out the
    fill value for it: a 16 KB file can declare 10^12 rows). Contiguous, chunked (every chunk
    written) and compact datasets pass. Reads only the dataset's header and chunk index.
    """
    dcpl = dsid.get_create_plist()
    if dcpl.get_external_count():
        target = dcpl.get_external(0)[0]
        return f"stores its values in another file ({os.fsdecode(target)!r}, HDF5 external storage)"
    layout = dcpl.get_layout()
    if layout == h5d.VIRTUAL:
        return "is a virtual dataset (its values live in other files)"
    shape = tuple(dsid.shape)
    if layout == h5d.COMPACT or not shape or 0 in shape:
        return ""
    if layout == h5d.CONTIGUOUS:
        return "" if dsid.get_offset() is not None else "has no stored values (HDF5 would hand out fill values)"
    if layout == h5d.CHUNKED:
        chunks = dcpl.get_chunk()
        want = int(np.prod([-(-int(n) // int(c)) for n, c in zip(shape, chunks)], dtype=object))
        have = int(dsid.get_num_chunks())
        return "" if have >= want else (f"stores {have} of its {want} chunks (HDF5 would hand out fill values "
                                          "for the rest)")
    return f"has an unknown storage layout ({layout})"
