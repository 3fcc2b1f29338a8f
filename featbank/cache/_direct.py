"""Rows of a per-row dataset read into the caller's array block by block, straight from the part files.

A v2 cache's per-row datasets are HDF5 virtual datasets over its parts, and featbank writes every
numeric dataset of a part contiguous and allocated in full: rows ``a:b`` of a part are one byte
range of its file (``H5Dget_offset``). :class:`RowReader` reads that range with ``preadv`` into
the output array, in blocks small enough (1 MB) to stay in the CPU cache while
:func:`~featbank.cache._validate.within_bounds` checks their values. Through HDF5 (the virtual
dataset or ``H5Dread`` on a part) each call costs ~50 µs more, so blocks that small made the value
check cost as much as the read; one large read and a check afterwards reads the data twice from
memory. Anything else (a file without parts, an index that maps rows otherwise than the table, a part
dataset that is chunked or of another dtype or byte order) is read through h5py: the same values.

The parts must have been checked (``_index.check_parts``, done by ``open_cache``) before reading:
HDF5 fills a missing part with zeros, and the reader trusts the table's row counts.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
from h5py import h5d, h5f, h5t

from .._files import open_regular_fd
from ..errors import CacheError
from ._integrity import maps_exactly
from ._parts import PartInfo
from ._validate import within_bounds

__all__ = ["RowReader", "BLOCK_BYTES"]

#: Bytes per block read straight from a part: small enough to stay in cache for the value check.
BLOCK_BYTES = 1 << 20
_H5PY_BLOCK_BYTES = 1 << 23  # through h5py, whose per-call cost wants larger blocks
_MAX_OPEN = 256  # part files held open between reads (a 10^9-row cache has 10^5 parts)


class RowReader:
    """Rows of the per-row dataset ``ds`` (of an open cache), read block by block and value-checked.

    Args:
        ds: the dataset in the cache file (the index's virtual dataset for v2).
        parts_folder: the cache's parts folder (``None`` for a file without parts, schema v1).
        parts: the v2 cache's table of parts, already checked against the files.
    """

    def __init__(self, ds: h5py.Dataset, parts_folder: Path | None = None, parts: Sequence[PartInfo] = ()):
        self.ds, self.name = ds, ds.name.lstrip("/")
        self.shape, self.dtype = tuple(ds.shape), ds.dtype
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._parts = _mapped_parts(ds, parts_folder, parts) if parts_folder is not None else None
        self._files = [parts_folder / p.name for p in self._parts or ()] if parts_folder is not None else []
        self._starts = np.cumsum([0, *(p.n_rows for p in self._parts or ())]).tolist()
        self._offsets: dict[int, int | None] = {}
        self._type: h5t.TypeID | bool | None = None  # the dataset's HDF5 type, False when not plain numbers
        self._fds: OrderedDict[int, int] = OrderedDict()
        block = BLOCK_BYTES if self._parts is not None else _H5PY_BLOCK_BYTES
        self.block_rows = max(1, block // max(1, self.row_bytes))
        chunk = ds.chunks[0] if self._parts is None and ds.chunks else 0
        if chunk:  # whole chunks per block (a file without parts): none is decompressed or read twice
            self.block_rows = max(chunk, self.block_rows // chunk * chunk)

    @property
    def direct(self) -> bool:
        """Whether rows come straight from the part files (else through h5py)."""
        return self._parts is not None

    def read_rows(self, rows: np.ndarray, out: np.ndarray, column: int | None = None) -> list[slice]:
        """Read the sorted ``rows`` into the C-contiguous ``out`` (``out[i]`` = row ``rows[i]``,
        ``[:, column]`` of it when given), converting to ``out.dtype``.

        Returns:
            The slices of ``out`` whose values :func:`within_bounds` could not clear: check those
            rows exactly (NaN/inf, extreme values); every other row is finite and within bounds.
        """
        if not rows.size:
            return []
        lo, n = int(rows[0]), len(rows)
        if (column is None and out.dtype == self.dtype and int(rows[-1]) - lo == n - 1
                and (n < 2 or bool(np.all(rows[1:] > rows[:-1])))):
            return self._read_run(lo, out)
        return self._read_picked(rows, out, column)

    def _read_run(self, lo: int, out: np.ndarray) -> list[slice]:
        """Rows ``lo:lo+len(out)`` straight into ``out``, block by block (no copy)."""
        suspect, pos = [], 0
        for k, a, n in self._pieces(lo, lo + len(out)):
            for b in range(0, n, self.block_rows):
                m = min(self.block_rows, n - b)
                dest = out[pos + b:pos + b + m]
                self._read_piece(k, a + b, dest)
                if not within_bounds(dest):
                    suspect.append(slice(pos + b, pos + b + m))
            pos += n
        return suspect

    def _read_picked(self, rows: np.ndarray, out: np.ndarray, column: int | None) -> list[slice]:
        """Any sorted rows: each block's span read into a scratch slab, the rows picked from it."""
        suspect, pos = [], 0
        scratch = np.empty((self.block_rows, *self.shape[1:]), self.dtype)
        while pos < len(rows):
            lo = int(rows[pos])
            end = int(np.searchsorted(rows, lo + self.block_rows, side="left"))
            hi = int(rows[end - 1]) + 1
            slab, dest = scratch[:hi - lo], out[pos:end]
            at = 0
            for k, a, n in self._pieces(lo, hi):
                self._read_piece(k, a, slab[at:at + n])
                at += n
            if column is None and out.dtype == self.dtype:
                np.take(slab, rows[pos:end] - lo, axis=0, out=dest)
            else:
                dest[...] = slab[rows[pos:end] - lo] if column is None else slab[rows[pos:end] - lo, column]
            if not within_bounds(dest):
                suspect.append(slice(pos, end))
            pos = end
        return suspect

    def _pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """``(part, first row in it, rows)`` covering rows ``lo:hi``; one piece (-1, lo, n) without parts."""
        if self._parts is None:
            return [(-1, lo, hi - lo)]
        k = bisect.bisect_right(self._starts, lo) - 1
        pieces = []
        while lo < hi:
            n = min(hi, self._starts[k + 1]) - lo
            if n > 0:
                pieces.append((k, lo - self._starts[k], n))
                lo += n
            k += 1
        return pieces

    def _read_piece(self, k: int, a: int, dest: np.ndarray) -> None:
        """Rows ``a:a+len(dest)`` of part ``k`` (-1: of the dataset) into ``dest`` (C-contiguous, the dataset's dtype)."""
        offset = self._offset(k) if k >= 0 else None
        if offset is None:  # not one byte range: HDF5 reads it (the same rows of the index's dataset)
            start = self._starts[k] if k >= 0 else 0
            self.ds.read_direct(dest, np.s_[start + a:start + a + len(dest)])
            return
        view, got = memoryview(dest).cast("B"), 0
        fd, offset = self._fd(k), offset + a * self.row_bytes
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise self._error(k, "ends before the rows the index maps onto it (truncated since the cache was opened)")
            got += n

    def _offset(self, k: int) -> int | None:
        """Where part ``k``'s dataset starts in its file, when it is one plain byte range; else None."""
        if k not in self._offsets:
            if self._type is None:
                plain = self.dtype.isnative and self.dtype.kind in "fiu"
                self._type = self.ds.id.get_type() if plain else False
            try:
                shape = (self._parts[k].n_rows, *self.shape[1:])
                self._offsets[k] = _contiguous_offset(self._files[k], self.name, shape, self._type) if self._type else None
            except OSError as e:
                raise self._error(k, f"cannot be read since the cache was opened ({e})") from None
            except ValueError as e:  # HDF5 would fill what the part lacks with zeros
                raise self._error(k, str(e)) from None
        return self._offsets[k]

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is not None:
            self._fds.move_to_end(k)  # most recently used last
            return fd
        try:
            fd = open_regular_fd(self._files[k])  # a FIFO swapped in since the open is refused, not waited on
        except OSError as e:
            raise self._error(k, f"cannot be opened since the cache was opened ({e.strerror or e})") from None
        if len(self._fds) >= _MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        self._fds[k] = fd
        return fd

    def _error(self, k: int, what: str) -> CacheError:
        index, path = self.ds.file.filename, self._files[k]
        return CacheError(
            f"Cache {index!r} cannot be read: part {path.parent.name}/{path.name} {what}. Run 'featbank cache "
            f"verify {index}', then 'featbank extract DATA --out {index}' to recompute the parts it names."
        )

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


def _contiguous_offset(path: Path, name: str, shape: tuple[int, ...], tid: h5t.TypeID) -> int | None:
    """The byte offset of the part's dataset ``name`` when it is one plain range of ``shape`` and type
    ``tid``; None when HDF5 must read it; ValueError when the part does not hold those rows."""
    # HDF5's low-level calls: h5py's File and Dataset objects cost ~0.3 ms more per part, which on
    # 100 parts of 5 MB was a tenth of reading them.
    fid = h5f.open(os.fsencode(path), h5f.ACC_RDONLY)
    try:
        try:
            dsid = h5d.open(fid, name.encode())
        except KeyError:
            raise ValueError(f"has no dataset '{name}'") from None
        try:
            if dsid.shape != shape:
                raise ValueError(f"holds '{name}' of shape {dsid.shape}, the index maps {shape}")
            if not dsid.get_type().equal(tid):
                return None
            dcpl = dsid.get_create_plist()
            if dcpl.get_layout() != h5d.CONTIGUOUS or dcpl.get_external_count() != 0:
                return None
            offset = dsid.get_offset()  # None while the storage is not allocated (HDF5 would give fill values)
            nbytes = int(np.prod(shape, dtype=np.int64)) * tid.get_size()
            return None if offset is None or dsid.get_storage_size() != nbytes else int(offset)
        finally:
            dsid.close()
    finally:
        fid.close()


def _mapped_parts(ds: h5py.Dataset, folder: Path, parts: Sequence[PartInfo]) -> list[PartInfo] | None:
    """The table's parts with rows when the virtual ``ds`` maps exactly them, whole and in order, onto
    the same dataset name in ``folder`` (what ``write_index`` writes, and what ``open_cache`` checked); else None."""
    if not maps_exactly(ds, folder.name, list(parts), [p.n_rows for p in parts]):
        return None
    return [p for p in parts if p.n_rows]
