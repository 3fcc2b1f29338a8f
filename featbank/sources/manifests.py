"""A manifest (CSV, TSV, parquet) as a :class:`~featbank.sources.RowSource`: a ``path`` column,
optional ``label`` and ``split`` columns.

Trust: a manifest is trusted like a shell script that lists files. It may name any file the user
running featbank can read (absolute paths and ``..`` are allowed, as data often lives elsewhere);
featbank only opens those files to decode them as images (never executes or writes them), and
records their paths in the cache. Do not extract a manifest from someone you would not let pick
files to read from your disk, and remember a shared cache shows every path it holds.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from pathlib import Path
from typing import Any

from .._files import NotRegularFileError, open_regular_file
from ..errors import ConfigError, DatasetError
from .rows import Duplicates, Row, RowSource, printable, to_source, unstorable

__all__ = ["read_manifest"]

_SPLITS = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}


def _open_input(path: Path, what: str) -> Any:
    """``path`` opened for binary reading, a regular file only (a FIFO swapped in is refused, never waited on)."""
    try:
        return open_regular_file(path)
    except NotRegularFileError as e:
        raise DatasetError(f"The {what} '{path}' is not a regular file (it is {e.kind}). Pass a file.") from None
    except OSError as e:
        raise DatasetError(f"The {what} '{path}' cannot be opened: {e.strerror or e}.") from None


def _manifest_table(path: Path) -> tuple[list[str], list[list[str]]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("A parquet manifest needs pyarrow: pip install 'featbank[parquet]'.") from None
        with _open_input(path, "manifest") as fh:
            try:
                table = pq.read_table(fh)
            except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
                raise DatasetError(f"The manifest '{path}' is not a readable parquet file ({e}).") from None
        cols = list(table.column_names)
        data = [["" if v is None else str(v) for v in table.column(c).to_pylist()] for c in cols]
        return cols, [list(r) for r in zip(*data)] if data else []
    if suffix not in (".csv", ".tsv", ".txt"):
        raise ConfigError(f"Unknown manifest type '{path.suffix}' for '{path}'. Use .csv, .tsv or .parquet.")
    # utf-8-sig: Excel's "CSV UTF-8" starts the file with a byte-order mark, which is not part of the header.
    with _open_input(path, "manifest") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as fh:
        try:
            rows = list(csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ","))
        except (UnicodeDecodeError, csv.Error) as e:
            raise DatasetError(f"The manifest '{path}' is not a readable UTF-8 {suffix[1:].upper()} file ({e}).") from None
    if not rows:
        raise DatasetError(f"The manifest '{path}' is empty; it needs a header line with a 'path' column.")
    return [c.strip() for c in rows[0]], rows[1:]


def _column(cols: list[str], name: str | None, what: str, path: Path, required: bool) -> int | None:
    if name is None:
        return None
    if name in cols:
        return cols.index(name)
    if required:
        raise DatasetError(
            f"The manifest '{path}' has no {what} column '{name}'; its columns are {cols}. "
            f"Name the column '{name}', or pass --{what}-column with the name it has."
        )
    return None


def read_manifest(
    manifest: str | os.PathLike, *, path_column: str = "path", label_column: str | None = "label",
    split_column: str | None = "split",
) -> RowSource:
    """List the rows of a manifest: a ``path`` column, optional ``label`` and ``split`` columns.

    Relative paths are relative to the manifest's folder. Rows whose file is missing or not a
    regular file, or whose path or label HDF5 cannot store (a NUL byte), are kept out and recorded
    with a reason. One file is one row: rows naming the same file (by device and inode: ``d/x.png``,
    ``./d/x.png``, its absolute path, a symlink to it) collapse into the first with a
    :class:`~featbank.errors.DuplicateRowsWarning` when their label and split agree. A CSV may
    start with a UTF-8 byte-order mark.

    Raises:
        DatasetError: no such file, no ``path`` column, an unknown split name, a single class, no rows,
            rows naming one file with different labels or splits (all listed).
        ConfigError: an unknown file type, or parquet without pyarrow.
    """
    path = Path(manifest).expanduser()
    if not path.is_file():
        raise DatasetError(f"The manifest '{path}' does not exist or is not a file.")
    cols, rows = _manifest_table(path)
    ip = _column(cols, path_column, "path", path, True)
    il = _column(cols, label_column, "label", path, label_column != "label")
    isp = _column(cols, split_column, "split", path, split_column != "split")
    root = path.parent.resolve()
    found: dict[str, tuple[str, int, tuple[int, int]]] = {}
    skipped: list[tuple[str, str, tuple[int, int]]] = []
    dups = Duplicates()
    for n, row in enumerate(rows, start=2):
        key = row[ip].strip() if ip is not None and ip < len(row) else ""
        if not key:
            skipped.append((f"<line {n}>", "empty path", (0, 0)))
            continue
        label = row[il].strip() if il is not None and il < len(row) else ""
        split_name = row[isp].strip().lower() if isp is not None and isp < len(row) else ""
        if split_name and split_name not in _SPLITS:
            raise DatasetError(
                f"The manifest '{path}' line {n} has split {row[isp]!r}; splits are train, val (or valid, "
                "validation) and test, or empty for none."
            )
        why = unstorable(key, "path") or unstorable(label, "label")
        if why:
            skipped.append((printable(key), why, (0, 0)))
            continue
        why, fp, identity = _stat(root / key)
        if why:
            skipped.append((key, why, fp))
            continue
        if dups.add(identity, Row(key, label, _SPLITS.get(split_name, -1), fp, n)):
            found[key] = (label, _SPLITS.get(split_name, -1), fp)
    dups.check(f"The manifest '{path}'", "the same file",
               "One file is one row: keep one line per file, with the label and split it should have.")
    source = to_source(root, found, skipped, "manifest", str(path))
    source.duplicates = dups.collapsed
    return source


def _stat(p: Path) -> tuple[str, tuple[int, int], Any]:
    """(reason it cannot be a row or "", fingerprint, identity (st_dev, st_ino))."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return "file not found", (0, 0), (0, 0)
    except (OSError, ValueError) as e:
        return f"cannot stat: {getattr(e, 'strerror', None) or e}", (0, 0), (0, 0)
    fp = (int(st.st_size), int(st.st_mtime_ns))
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file", fp, (0, 0)
    return "", fp, (int(st.st_dev), int(st.st_ino)) if st.st_ino else os.path.realpath(p)  # no inodes: the path
