"""The rows a source lists: :class:`RowSource` (sorted unique keys with fingerprints, labels and
splits) and what every reader of a source shares: refusing text HDF5 cannot store, collapsing
repeated rows, and turning the rows found into a source."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatasetError, DuplicateRowsWarning

if TYPE_CHECKING:
    from .folders import ImageIndex

__all__ = ["RowSource", "Row", "Duplicates", "unstorable", "printable", "to_source"]


@dataclass
class RowSource:
    """The rows to extract, in key order, and how to read them.

    Attributes:
        root: folder that relative keys are read from (a manifest's folder, the data folder).
        keys: sorted unique row keys (relative paths, absolute paths, or ``<tar>/<__key__>``).
        fingerprints, labels, splits: per row, as in :class:`featbank.sources.ImageIndex`.
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
    def from_index(cls, index: ImageIndex) -> RowSource:
        """From a :class:`featbank.sources.ImageIndex` (a scanned folder)."""
        return cls(Path(index.root), list(index.paths), index.fingerprints, index.labels, index.splits,
                   list(index.classes), index.layout, duplicates=list(getattr(index, "duplicates", [])))


def unstorable(text: str, what: str) -> str:
    """Why ``text`` cannot be stored as an HDF5 string ("" when it can): a NUL byte, or not UTF-8."""
    if "\0" in text:
        return f"the {what} holds a NUL byte, which the cache (HDF5) cannot store"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"the {what} is not valid UTF-8, which the cache (HDF5) cannot store"
    return ""


def printable(text: str) -> str:
    """``text`` safe to store and print: NUL bytes and undecodable bytes written as escapes."""
    return text.replace("\0", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class Row:
    key: str
    label: str
    split: int
    fingerprint: tuple[int, int]
    line: int


class Duplicates:
    """Rows keyed by the file's identity ((st_dev, st_ino) or a member's content): repeats that agree on
    label and split collapse into the first row; repeats that disagree are collected for one error."""

    def __init__(self) -> None:
        self.first: dict[Any, Row] = {}
        self.collapsed: list[tuple[str, str]] = []
        self.conflicts: list[tuple[Row, Row]] = []

    def add(self, identity: Any, row: Row) -> bool:
        """True when ``row`` is new; a repeat is recorded (collapsed or in conflict) and gives False."""
        kept = self.first.get(identity)
        if kept is None:
            self.first[identity] = row
            return True
        if (kept.label, kept.split) == (row.label, row.split):
            self.collapsed.append((printable(row.key), kept.key))
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


def _describe(row: Row) -> str:
    split = {0: "train", 1: "val", 2: "test"}.get(row.split, "none")
    where = f"line {row.line} " if row.line else ""
    return f"{where}{printable(row.key)!r} (label {printable(row.label)!r}, split {split})"


def to_source(root: Path, found: dict[str, tuple[str, int, tuple[int, int]]], skipped: list,
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
