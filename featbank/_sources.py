"""Inputs beyond an image folder: a manifest (CSV, TSV, parquet) or WebDataset tar shards.

Both give a :class:`~featbank.extraction._sharded.RowSource`: sorted unique row keys with
fingerprints, labels and splits, like :func:`featbank.data.scan_folder` gives for a folder.

Trust: a manifest is trusted like a shell script that lists files. It may name any file the user
running featbank can read (absolute paths and ``..`` are allowed, as data often lives elsewhere);
featbank only opens those files to decode them as images (never executes or writes them), and
records their paths in the cache. Do not extract a manifest from someone you would not let pick
files to read from your disk, and remember a shared cache shows every path it holds.

WebDataset tars are read with the standard library's :mod:`tarfile`, not the ``webdataset``
package: listing needs random access by key (a shard resumes mid-tar) and a reason per bad
member (corrupt image, unreadable label, data cut by truncation), which ``tarfile`` gives
directly and without a dependency; ``webdataset`` streams samples in order and its handlers skip
or raise per sample. A row's key is ``<tar>/<__key__>``; its fingerprint is the tar's size and
``mtime_ns``, so any change to a tar (its members included) re-embeds that tar's shard.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DatasetError
from .images import IMAGE_EXTENSIONS, ImageReadError, PreprocessConfig, preprocess_image

__all__ = ["RowSource", "LABEL_SOURCES", "read_manifest", "read_webdataset", "expand_braces", "TarImages"]

@dataclass
class RowSource:
    """The rows to extract, in key order, and how to read them.

    Attributes:
        root: folder that relative keys are read from (a manifest's folder, the data folder).
        keys: sorted unique row keys (relative paths, absolute paths, or ``<tar>/<__key__>``).
        fingerprints, labels, splits: per row, as in :class:`featbank.data.ImageIndex`.
        classes: class names (labels index into them).
        layout: ``imagefolder``, ``splits``, ``flat``, ``manifest`` or ``webdataset``.
        tars: for WebDataset: tar names (relative to ``root``) and their row counts, in order.
        skipped: rows refused while listing (``(key, reason, fingerprint)``), recorded in the cache.
        members: for WebDataset: per row, ``"<tar>\\0<image member name>"``.
    """

    root: Path
    keys: list[str]
    fingerprints: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    classes: list[str]
    layout: str
    tars: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str, tuple[int, int]]] = field(default_factory=list)
    members: list[str] = field(default_factory=list)

    @classmethod
    def from_index(cls, index: Any) -> RowSource:
        """From a :class:`featbank.data.ImageIndex` (a scanned folder)."""
        return cls(Path(index.root), list(index.paths), index.fingerprints, index.labels, index.splits,
                   list(index.classes), index.layout)


LABEL_SOURCES = ("cls", "txt", "json", "none")
_SPLITS = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}


def _manifest_table(path: Path) -> tuple[list[str], list[list[str]]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("A parquet manifest needs pyarrow: pip install 'featbank[parquet]'.") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
            raise DatasetError(f"The manifest '{path}' is not a readable parquet file ({e}).") from None
        cols = list(table.column_names)
        data = [["" if v is None else str(v) for v in table.column(c).to_pylist()] for c in cols]
        return cols, [list(r) for r in zip(*data)] if data else []
    if suffix not in (".csv", ".tsv", ".txt"):
        raise ConfigError(f"Unknown manifest type '{path.suffix}' for '{path}'. Use .csv, .tsv or .parquet.")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
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
    regular file, or that repeat an earlier path, are kept out and recorded with a reason.

    Raises:
        DatasetError: no such file, no ``path`` column, an unknown split name, a single class, no rows.
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
        why, fp = _stat(root / key)
        if key in found:
            why = f"duplicate of an earlier row for '{key}'"
        if why:
            skipped.append((key, why, fp))
            continue
        found[key] = (label, _SPLITS.get(split_name, -1), fp)
    return _to_source(root, found, skipped, "manifest", str(path))


def _stat(p: Path) -> tuple[str, tuple[int, int]]:
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return "file not found", (0, 0)
    except OSError as e:
        return f"cannot stat: {e.strerror or e}", (0, 0)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file", (int(st.st_size), int(st.st_mtime_ns))
    return "", (int(st.st_size), int(st.st_mtime_ns))


def _to_source(root: Path, found: dict[str, tuple[str, int, tuple[int, int]]], skipped: list,
               layout: str, where: str, members: dict[str, str] | None = None, tars: list | None = None) -> RowSource:
    keys = sorted(found)
    if not keys:
        raise DatasetError(f"No usable rows in {where}: {len(skipped)} row(s) were refused" + (
            f" (e.g. {skipped[0][0]!r}: {skipped[0][1]})." if skipped else "."))
    names = sorted({found[k][0] for k in keys if found[k][0]}, key=_class_order)
    if len(names) == 1:
        raise DatasetError(
            f"The labels in {where} have a single class {names[0]!r}; a classifier needs at least two. "
            "Leave the label column out (or empty) for unlabelled extraction."
        )
    index = {c: i for i, c in enumerate(names)}
    labels = np.array([index.get(found[k][0], -1) for k in keys], np.int64)
    splits = np.array([found[k][1] for k in keys], np.int8)
    fps = np.array([found[k][2] for k in keys], np.int64).reshape(-1, 2)
    return RowSource(root, keys, fps, labels, splits, names, layout, tars=tars or [], skipped=skipped,
                     members=[members[k] for k in keys] if members else [])


def _class_order(name: str) -> tuple[int, Any]:
    # .cls labels are integers: 2 before 10.
    return (0, int(name)) if re.fullmatch(r"-?\d+", name) else (1, name)


def expand_braces(pattern: str) -> list[str]:
    """``shards/{000000..000002}.tar`` -> three names (zero padding kept); ``{a,b}`` lists too."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo or hi - lo > 10**6:
            raise ConfigError(f"The range {{{body}}} in {pattern!r} is empty or too long.")
        width = len(r.group(1))
        items = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    return [x for item in items for x in expand_braces(head + item + tail)]


def _split_member(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _label(tf: tarfile.TarFile, member: tarfile.TarInfo, kind: str) -> str:
    fh = tf.extractfile(member)
    if fh is None:
        raise ValueError("not a regular member")
    raw = fh.read(1 << 16).decode("utf-8").strip()
    if kind == "cls":
        return str(int(raw))
    if kind == "json":
        value = json.loads(raw)
        value = value.get("label", value.get("cls")) if isinstance(value, dict) else value
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ValueError("no 'label' (string or integer) in the JSON")
        return str(value)
    if not raw:
        raise ValueError("empty label")
    return raw


def _list_tar(path: Path, name: str, label_from: str, found: dict, skipped: list, members: dict) -> int:
    """Add one tar's samples; returns how many rows it gave."""
    st = path.stat()
    fp = (int(st.st_size), int(st.st_mtime_ns))
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            try:
                for m in tf:
                    if m.isfile():
                        key, ext = _split_member(m.name)
                        samples.setdefault(key, {})[ext] = m
            except (tarfile.TarError, EOFError, OSError) as e:
                skipped.append((f"{name}/", f"truncated or corrupt tar, members after the damage are lost: {e}", fp))
            else:
                # tarfile stops quietly at a cut header; a whole archive ends with two zero blocks.
                end = max((m.offset_data + -(-m.size // 512) * 512 for s_ in samples.values() for m in s_.values()), default=0)
                if st.st_size < end + 1024:
                    skipped.append((f"{name}/", "truncated tar (no end-of-archive marker): members after the cut are lost", fp))
            n = 0
            for key, exts in samples.items():
                row = f"{name}/{key}"
                image = next((m for e, m in sorted(exts.items()) if f".{e}" in IMAGE_EXTENSIONS), None)
                if image is None:
                    skipped.append((row, "no image member", fp))
                    continue
                if image.offset_data + image.size > st.st_size:
                    skipped.append((row, "truncated tar: the image member's data is cut off", fp))
                    continue
                label = ""
                if label_from != "none" and label_from in exts:
                    try:
                        label = _label(tf, exts[label_from], label_from)
                    except (ValueError, UnicodeDecodeError, tarfile.TarError, OSError) as e:
                        skipped.append((row, f"unreadable label in .{label_from}: {e}", fp))
                        continue
                found[row] = (label, -1, fp)
                members[row] = f"{name}\0{image.name}"  # key and member name may both hold '/'
                n += 1
            return n
    except (tarfile.TarError, OSError) as e:
        skipped.append((f"{name}/", f"not a readable tar: {e}", fp))
        return 0


def read_webdataset(spec: str | os.PathLike, *, label_from: str = "cls") -> RowSource:
    """List the samples of WebDataset shards: a folder of ``.tar`` files or a brace pattern.

    The image is the member with an image extension; the label comes from ``.cls`` (an integer),
    ``.txt`` (a class name) or ``.json`` (its ``label``), as ``label_from`` says, or ``none``.

    Raises:
        ConfigError: an unknown ``label_from``.
        DatasetError: no tar found, or a single class.
    """
    if label_from not in LABEL_SOURCES:
        raise ConfigError(f"The 'label_from' parameter must be one of {LABEL_SOURCES}. Got {label_from!r} instead.")
    spec_path = Path(spec).expanduser()
    if spec_path.is_dir():
        root, names = spec_path.resolve(), sorted(p.name for p in spec_path.glob("*.tar"))
    else:
        expanded = expand_braces(str(spec))
        root = Path(expanded[0]).parent.resolve()
        names = sorted(os.path.relpath(Path(p).resolve(), root) for p in expanded)
    if not names:
        raise DatasetError(f"No .tar shards found in '{spec}'. Pass a folder of .tar files or a pattern such as "
                           "shards/{000000..000099}.tar.")
    found: dict[str, tuple[str, int, tuple[int, int]]] = {}
    skipped: list[tuple[str, str, tuple[int, int]]] = []
    members: dict[str, str] = {}
    tars = []
    for name in names:
        if not (root / name).is_file():
            skipped.append((f"{name}/", "tar not found", (0, 0)))
            continue
        tars.append((name, _list_tar(root / name, name, label_from, found, skipped, members)))
    return _to_source(root, found, skipped, "webdataset", f"'{spec}'", members, tars)


class TarImages:
    """Map-style dataset over tar members (one open tar per worker process); bad members give a reason.

    ``members[row]`` is ``"<tar>\\0<member name>"`` as :func:`read_webdataset` lists it.
    """

    def __init__(self, root: Path, keys: Sequence[str], members: Sequence[str], rows: np.ndarray, cfg: PreprocessConfig):
        self.root, self.keys, self.members, self.rows, self.cfg = root, keys, members, rows, cfg
        self._open: dict[str, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        from .images import DEFAULT_MAX_PIXELS, decode_image

        row = int(self.rows[i])
        tar, _, member = self.members[row].partition("\0")
        try:
            tf = self._open.get(tar) or self._open.setdefault(tar, tarfile.open(self.root / tar, "r:"))
            fh = tf.extractfile(member)
            if fh is None:
                return row, None, "not a regular tar member"
            data = fh.read()
            if not data:
                return row, None, "empty member (0 bytes)"
            img = decode_image(io.BytesIO(data), DEFAULT_MAX_PIXELS, window=self.cfg.window, name=member)
            return row, preprocess_image(img, self.cfg), ""
        except ImageReadError as e:
            return row, None, e.reason
        except (KeyError, tarfile.TarError, EOFError) as e:
            return row, None, f"corrupt tar member: {e}"
        except Exception as e:  # noqa: BLE001 - a bad member must not kill a long run
            return row, None, f"truncated or corrupt: {type(e).__name__}: {e}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}
