"""Inputs beyond an image folder: a manifest (CSV, TSV, parquet) or WebDataset tar shards.

Both give a :class:`~featbank.extraction.units.RowSource`: sorted unique row keys with
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
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._files import NotRegularFileError, open_regular_file
from .errors import ConfigError, DatasetError, DuplicateRowsWarning
from .images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    PreprocessConfig,
    check_image_bytes,
    preprocess_image,
)

__all__ = ["RowSource", "LABEL_SOURCES", "MAX_PATTERN_NAMES", "read_manifest", "read_webdataset", "expand_braces",
           "count_braces", "TarImages"]

#: A brace pattern may name at most this many tar files; the count is made before anything is expanded.
MAX_PATTERN_NAMES = 1_000_000

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
        duplicates: ``(repeat, kept key)`` for every repeat of a row that was collapsed into the kept one.
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
    duplicates: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def from_index(cls, index: Any) -> RowSource:
        """From a :class:`featbank.data.ImageIndex` (a scanned folder)."""
        return cls(Path(index.root), list(index.paths), index.fingerprints, index.labels, index.splits,
                   list(index.classes), index.layout, duplicates=list(getattr(index, "duplicates", [])))


LABEL_SOURCES = ("cls", "txt", "json", "none")
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


def unstorable(text: str, what: str) -> str:
    """Why ``text`` cannot be stored as an HDF5 string ("" when it can): a NUL byte, or not UTF-8."""
    if "\0" in text:
        return f"the {what} holds a NUL byte, which the cache (HDF5) cannot store"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"the {what} is not valid UTF-8, which the cache (HDF5) cannot store"
    return ""


def _shown(text: str) -> str:
    """``text`` safe to store and print: NUL bytes and undecodable bytes written as escapes."""
    return text.replace("\0", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class _Row:
    key: str
    label: str
    split: int
    fingerprint: tuple[int, int]
    line: int


class _Duplicates:
    """Rows keyed by the file's identity ((st_dev, st_ino) or a member's content): repeats that agree on
    label and split collapse into the first row; repeats that disagree are collected for one error."""

    def __init__(self) -> None:
        self.first: dict[Any, _Row] = {}
        self.collapsed: list[tuple[str, str]] = []
        self.conflicts: list[tuple[_Row, _Row]] = []

    def add(self, identity: Any, row: _Row) -> bool:
        """True when ``row`` is new; a repeat is recorded (collapsed or in conflict) and gives False."""
        kept = self.first.get(identity)
        if kept is None:
            self.first[identity] = row
            return True
        if (kept.label, kept.split) == (row.label, row.split):
            self.collapsed.append((_shown(row.key), kept.key))
        else:
            self.conflicts.append((kept, row))
        return False

    def check(self, where: str, what: str, advice: str) -> None:
        """Raise for conflicts (listed, with ``advice``); warn once for collapsed repeats."""
        if self.conflicts:
            shown = "; ".join(f"{_describe(a)} and {_describe(b)}" for a, b in self.conflicts[:10])
            more = f" (and {len(self.conflicts) - 10} more)" if len(self.conflicts) > 10 else ""
            raise DatasetError(
                f"{where} names {what} more than once with different labels or splits: {shown}{more}. {advice}"
            )
        if self.collapsed:
            warnings.warn(
                f"{where}: {len(self.collapsed)} row(s) name {what} as an earlier row (e.g. {self.collapsed[0][0]!r} "
                f"is {self.collapsed[0][1]!r}); each was collapsed into that row, so it is counted once.",
                DuplicateRowsWarning, stacklevel=3,
            )


def _describe(row: _Row) -> str:
    split = {0: "train", 1: "val", 2: "test"}.get(row.split, "none")
    where = f"line {row.line} " if row.line else ""
    return f"{where}{_shown(row.key)!r} (label {_shown(row.label)!r}, split {split})"


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
    dups = _Duplicates()
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
            skipped.append((_shown(key), why, (0, 0)))
            continue
        why, fp, identity = _stat(root / key)
        if why:
            skipped.append((key, why, fp))
            continue
        if dups.add(identity, _Row(key, label, _SPLITS.get(split_name, -1), fp, n)):
            found[key] = (label, _SPLITS.get(split_name, -1), fp)
    dups.check(f"The manifest '{path}'", "the same file",
               "One file is one row: keep one line per file, with the label and split it should have.")
    source = _to_source(root, found, skipped, "manifest", str(path))
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


_GROUP = re.compile(r"\{([^{}]*)\}")
_MAX_GROUPS = 64
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def _range_of(body: str, pattern: str) -> tuple[int, int] | None:
    r = _RANGE.fullmatch(body)
    if r is None:
        return None
    lo, hi = int(r.group(1)), int(r.group(2))
    if hi < lo:
        raise ConfigError(f"The range {{{body}}} in {pattern!r} is empty (it counts down); write {{{r.group(2)}..{r.group(1)}}}.")
    return lo, hi


def _n_items(body: str, pattern: str) -> int:
    r = _range_of(body, pattern)
    return r[1] - r[0] + 1 if r is not None else body.count(",") + 1


def _items(body: str, pattern: str) -> Iterator[str]:
    r = _range_of(body, pattern)
    if r is None:
        yield from body.split(",")
        return
    width = len(_RANGE.fullmatch(body).group(1))  # type: ignore[union-attr]
    for i in range(r[0], r[1] + 1):
        yield str(i).zfill(width)


def _expand(pattern: str) -> Iterator[str]:
    m = _GROUP.search(pattern)
    if m is None:
        yield pattern
        return
    head, tail = pattern[: m.start()], pattern[m.end():]
    for item in _items(m.group(1), pattern):
        yield from _expand(head + item + tail)


def count_braces(pattern: str, limit: int = MAX_PATTERN_NAMES) -> int:
    """How many names ``pattern`` expands to, counted without expanding it (``limit + 1``: more than ``limit``).

    Groups side by side multiply (``{0..9}{0..9}``: 100); a nested pattern is counted by walking
    its names lazily, stopping past ``limit``.
    """
    groups = _GROUP.findall(pattern)
    if len(groups) == pattern.count("{"):  # no nesting: a product of the groups' sizes
        n = 1
        for body in groups:
            n *= _n_items(body, pattern)
            if n > limit:
                return limit + 1
        return n
    n = 0
    for _ in _expand(pattern):
        n += 1
        if n > limit:
            break
    return n


def expand_braces(pattern: str) -> list[str]:
    """``shards/{000000..000002}.tar`` -> three names (zero padding kept); ``{a,b}`` lists too.

    Raises:
        ConfigError: the pattern names more than :data:`MAX_PATTERN_NAMES` files (counted before
            anything is expanded), or a range counts down.
    """
    if pattern.count("{") > _MAX_GROUPS:
        raise ConfigError(f"The pattern {pattern[:80]!r}... has {pattern.count('{')} brace groups; at most {_MAX_GROUPS} "
                          "are read. Pass the folder that holds the shards instead.")
    n = count_braces(pattern)
    if n > MAX_PATTERN_NAMES:
        raise ConfigError(
            f"The pattern {pattern!r} names more than {MAX_PATTERN_NAMES:,} tar files; featbank reads at most "
            f"{MAX_PATTERN_NAMES:,} shards from one pattern. Check the braces (e.g. shards/{{000000..000099}}.tar), "
            "or pass the folder that holds the shards."
        )
    return list(_expand(pattern))


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
        raw = str(value)
    if not raw:
        raise ValueError("empty label")
    why = unstorable(raw, "label")
    if why:
        raise ValueError(why)
    return raw


def _digest(tf: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    """sha256 of a member's bytes (read in blocks; only for members whose key repeats). A member past the
    byte limit is not read: its size stands for it (it is refused as too large anyway)."""
    from .images import MAX_IMAGE_BYTES

    if member.size > MAX_IMAGE_BYTES:
        return f"size {member.size}"
    h = hashlib.sha256()
    fh = tf.extractfile(member)
    if fh is not None:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass
class _TarListing:
    """What the tars of one WebDataset gave so far: rows, refusals, members, repeats."""

    found: dict[str, tuple[str, int, tuple[int, int]]] = field(default_factory=dict)
    skipped: list[tuple[str, str, tuple[int, int]]] = field(default_factory=list)
    members: dict[str, str] = field(default_factory=dict)
    dups: _Duplicates = field(default_factory=_Duplicates)
    clashes: list[str] = field(default_factory=list)
    #: per row: its image member, for the check of keys repeated across tars
    image_of: dict[str, tarfile.TarInfo] = field(default_factory=dict)


_Samples = dict[str, dict[str, list[tarfile.TarInfo]]]


def _members(tf: tarfile.TarFile, name: str, fp: tuple[int, int], size: int, out: _TarListing) -> _Samples:
    """The tar's regular members grouped by sample key and extension (repeats kept, in order)."""
    samples: _Samples = {}
    try:
        for m in tf:
            if m.isfile():
                key, ext = _split_member(m.name)
                samples.setdefault(key, {}).setdefault(ext, []).append(m)
    except (tarfile.TarError, EOFError, OSError) as e:
        out.skipped.append((f"{name}/", f"truncated or corrupt tar, members after the damage are lost: {e}", fp))
    else:
        # tarfile stops quietly at a cut header; a whole archive ends with two zero blocks.
        end = max((m.offset_data + -(-m.size // 512) * 512 for s_ in samples.values() for ms in s_.values() for m in ms),
                  default=0)
        if size < end + 1024:
            out.skipped.append((f"{name}/", "truncated tar (no end-of-archive marker): members after the cut are lost", fp))
    return samples


def _one(tf: tarfile.TarFile, row: str, ext: str, ms: list[tarfile.TarInfo], out: _TarListing, labels: bool) -> tarfile.TarInfo:
    """The member of ``row`` with extension ``ext``; repeats must be the same bytes (or the same label)."""
    if len(ms) > 1:
        same = (len({_label(tf, m, ext) for m in ms}) == 1 if labels
                else len({m.size for m in ms}) == 1 and len({_digest(tf, m) for m in ms}) == 1)
        if same:
            out.dups.collapsed.append((f"{_shown(row)} (.{ext} x{len(ms)})", _shown(row)))
        else:
            out.clashes.append(f"{_shown(row)!r} has {len(ms)} different .{ext} members")
    return ms[0]


def _list_tar(path: Path, name: str, label_from: str, out: _TarListing) -> int:
    """Add one tar's samples to ``out``; returns how many rows it gave."""
    from .images import MAX_IMAGE_BYTES

    try:
        fh = open_regular_file(path)
    except OSError as e:
        out.skipped.append((f"{name}/", f"not a readable tar: {getattr(e, 'what', None) or e.strerror or e}", (0, 0)))
        return 0
    with fh:
        st = os.fstat(fh.fileno())
        fp = (int(st.st_size), int(st.st_mtime_ns))
        try:
            tf = tarfile.open(fileobj=fh, mode="r:")
        except (tarfile.TarError, OSError) as e:
            out.skipped.append((f"{name}/", f"not a readable tar: {e}", fp))
            return 0
        with tf:
            samples = _members(tf, name, fp, st.st_size, out)
            n = 0
            for key, exts in samples.items():
                row = f"{name}/{key}"
                why = unstorable(key, "member name")
                image_ext = next((e for e in sorted(exts) if f".{e}" in IMAGE_EXTENSIONS), None)
                if why or image_ext is None:
                    out.skipped.append((_shown(row), why or "no image member", fp))
                    continue
                try:
                    image = _one(tf, row, image_ext, exts[image_ext], out, False)
                    if image.offset_data + image.size > st.st_size:
                        raise ImageReadError("truncated tar: the image member's data is cut off")
                    check_image_bytes(image.size, MAX_IMAGE_BYTES)  # from the header, before a byte is read
                    label = ""
                    if label_from != "none" and label_from in exts:
                        label = _label(tf, _one(tf, row, label_from, exts[label_from], out, True), label_from)
                except ImageReadError as e:
                    out.skipped.append((row, e.reason, fp))
                    continue
                except (ValueError, UnicodeDecodeError, tarfile.TarError, OSError) as e:
                    out.skipped.append((row, f"unreadable label in .{label_from}: {e}", fp))
                    continue
                out.found[row] = (label, -1, fp)
                out.members[row] = f"{name}\0{image.name}"  # key and member name may both hold '/'
                out.image_of[row] = image
                n += 1
            return n


def _collapse_across_tars(root: Path, out: _TarListing, counts: dict[str, int]) -> None:
    """A key in several tars with the same image bytes is one sample: later copies collapse into the first
    (same label) or are a conflict (other label). The same key with other bytes is another sample."""
    by_key: dict[str, list[str]] = {}
    for row in out.found:
        tar = out.members[row].partition("\0")[0]
        by_key.setdefault(row[len(tar) + 1:], []).append(row)
    for key, rows in by_key.items():
        sizes = [out.image_of[r].size for r in rows]
        if len(rows) < 2 or len(set(sizes)) == len(sizes):
            continue
        for row in sorted(rows):
            tar = out.members[row].partition("\0")[0]
            try:
                with open_regular_file(root / tar) as fh, tarfile.open(fileobj=fh, mode="r:") as tf:
                    identity = (key, out.image_of[row].size, _digest(tf, out.image_of[row]))
            except (OSError, tarfile.TarError):  # changed since it was listed: its own sample (the reader says why)
                continue
            label = out.found[row][0]
            if not out.dups.add(identity, _Row(row, label, -1, out.found[row][2], 0)):
                del out.found[row], out.members[row]
                counts[tar] -= 1


def read_webdataset(spec: str | os.PathLike, *, label_from: str = "cls") -> RowSource:
    """List the samples of WebDataset shards: a folder of ``.tar`` files or a brace pattern.

    The image is the member with an image extension; the label comes from ``.cls`` (an integer),
    ``.txt`` (a class name) or ``.json`` (its ``label``), as ``label_from`` says, or ``none``.
    An image member larger than :data:`~featbank.images.MAX_IMAGE_BYTES` (from its header), a
    member name or label HDF5 cannot store (a NUL byte) or a truncated member is a skipped row with
    its reason. One sample is one row: a member repeated in a tar, or a key repeated across tars
    with the same image bytes, collapses into the first with a
    :class:`~featbank.errors.DuplicateRowsWarning`; repeats that differ (bytes or label) are an error.

    Raises:
        ConfigError: an unknown ``label_from``; a pattern naming more than :data:`MAX_PATTERN_NAMES` tars.
        DatasetError: no tar found, a single class, or repeated samples that disagree (listed).
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
    out = _TarListing()
    counts: dict[str, int] = {}
    for name in names:
        if not (root / name).exists():
            out.skipped.append((f"{name}/", "tar not found", (0, 0)))
            continue
        why = unstorable(name, "tar's file name")
        if why:
            out.skipped.append((f"{_shown(name)}/", why, (0, 0)))
            continue
        counts[name] = _list_tar(root / name, name, label_from, out)
    if out.clashes:
        shown = "; ".join(out.clashes[:10]) + (f" (and {len(out.clashes) - 10} more)" if len(out.clashes) > 10 else "")
        raise DatasetError(f"The WebDataset '{spec}' repeats a sample key with other contents: {shown}. One sample is "
                           "one row: give each sample its own key.")
    _collapse_across_tars(root, out, counts)
    out.dups.check(f"The WebDataset '{spec}'", "the same sample",
                   "One sample is one row: give each sample its own key, and one label.")
    source = _to_source(root, out.found, out.skipped, "webdataset", f"'{spec}'", out.members, list(counts.items()))
    source.duplicates = out.dups.collapsed
    return source


class TarImages:
    """Map-style dataset over tar members (one open tar per worker process); bad members give a reason.

    ``members[row]`` is ``"<tar>\\0<member name>"`` as :func:`read_webdataset` lists it. A member is
    bounded as an image file is: its size (from the tar header) before a byte is read, its pixels
    from the image header, and it is decoded from the tar as a stream, never read whole.
    """

    def __init__(self, root: Path, keys: Sequence[str], members: Sequence[str], rows: np.ndarray, cfg: PreprocessConfig):
        self.root, self.keys, self.members, self.rows, self.cfg = root, keys, members, rows, cfg
        self._open: dict[str, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _tar(self, tar: str) -> tarfile.TarFile:
        tf = self._open.get(tar)
        if tf is None:
            tf = self._open[tar] = tarfile.open(fileobj=open_regular_file(self.root / tar), mode="r:")
        return tf

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        from .images import DEFAULT_MAX_PIXELS, decode_image

        row = int(self.rows[i])
        tar, _, member = self.members[row].partition("\0")
        try:
            tf = self._tar(tar)
            info = tf.getmember(member)
            check_image_bytes(info.size)
            fh = tf.extractfile(info)
            if fh is None:
                return row, None, "not a regular tar member"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = decode_image(fh, DEFAULT_MAX_PIXELS, window=self.cfg.window, name=member)
                return row, preprocess_image(img, self.cfg), ""
        except ImageReadError as e:
            return row, None, e.reason
        except NotRegularFileError:
            return row, None, "the tar is not a regular file"
        except (KeyError, tarfile.TarError, EOFError) as e:
            return row, None, f"corrupt tar member: {e}"
        except Exception as e:  # noqa: BLE001 - a bad member must not kill a long run
            return row, None, f"truncated or corrupt: {type(e).__name__}: {e}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}
