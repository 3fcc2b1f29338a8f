"""Scan an image folder into an index of paths, labels, classes and splits.

Three layouts are recognised (``DATA`` is the folder given)::

    DATA/<class>/**/<image>                 "imagefolder": labelled, any depth below the class
    DATA/{train,val,test}/<class>/**/<image> "splits": labelled, the split is kept per image
    DATA/<image>                            "flat": unlabelled (labels are -1)

The order is deterministic (sorted by relative POSIX path) and class indices follow the sorted
class names, as in torchvision's ``ImageFolder``. Each image carries a fingerprint
``(size in bytes, mtime_ns)`` from the same ``stat`` call, so a cache can tell changed files
apart without reading them. One file is one row: paths that are the same file (a symlink or a hard
link to an image listed elsewhere in the folder) collapse into the first when their class and
split agree, and are an error when they do not (an image in train and in test).

Images are recognised by their extension (:data:`featbank.images.IMAGE_EXTENSIONS`, ``.dcm``
included); a file without an extension, or with a numeric one (DICOM files named by UID), counts
when it carries the DICOM preamble (``DICM`` at byte 128).
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featbank.dicom import is_dicom_file
from featbank.errors import DatasetError, DuplicateRowsWarning
from featbank.images import IMAGE_EXTENSIONS

__all__ = ["SPLIT_NAMES", "ImageIndex", "scan_folder", "is_image_file"]

#: Split codes are indices into this tuple; -1 means the folder has no split folders.
SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")

_SPLIT_ALIASES = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}
_LAYOUT_HELP = (
    "Expected DATA/<class>/<image> (one folder per class), "
    "DATA/{train,val,test}/<class>/<image>, or images directly in DATA for unlabelled extraction"
)


@dataclass
class ImageIndex:
    """The images found in a folder, in a fixed order.

    Attributes:
        root: the scanned folder, absolute and resolved.
        layout: ``"imagefolder"``, ``"splits"`` or ``"flat"``.
        classes: sorted class names; empty for a flat folder.
        paths: POSIX paths relative to ``root``, sorted as strings.
        labels: ``int64`` array ``(n_samples,)``: index into ``classes``, -1 for a flat folder.
        splits: ``int8`` array ``(n_samples,)``: index into :data:`SPLIT_NAMES`, -1 when the
            folder has no split folders.
        fingerprints: ``int64`` array ``(n_samples, 2)``: file size in bytes and ``st_mtime_ns``.
        ignored: sorted relative paths of files that were seen but not indexed (other extensions,
            stray images beside class folders, names that are not valid UTF-8, broken links).
            Hidden files and folders (name starting with ``.``) are skipped without a mention.
        duplicates: ``(path, kept path)`` of paths that are the same file as an earlier (kept) row,
            with the same class and split; they are not rows.
    """

    root: Path
    layout: str
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    splits: np.ndarray
    fingerprints: np.ndarray
    ignored: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


class _Walk:
    """Accumulates images and ignored paths while walking; one instance per scan."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.paths: list[str] = []
        self.labels: list[str | None] = []
        self.splits: list[int] = []
        self.sizes: list[int] = []
        self.mtimes: list[int] = []
        self.identities: list[tuple[int, int] | str] = []
        self.ignored: list[str] = []
        self.n_files = 0

    def ignore(self, rel: str) -> None:
        self.ignored.append(_printable(rel))

    def add_file(self, entry: os.DirEntry[str], rel: str, label: str | None, split: int) -> None:
        self.n_files += 1
        if not _is_image_name(entry.name) and not (_may_be_dicom(entry.name) and is_dicom_file(entry.path)):
            self.ignore(rel)
            return
        try:
            # Follows a symlinked file to its target; a broken link lands in `ignored`.
            st = entry.stat()
        except OSError:
            self.ignore(rel)
            return
        if not stat.S_ISREG(st.st_mode):
            self.ignore(rel)
            return
        self.paths.append(rel)
        self.labels.append(label)
        self.splits.append(split)
        self.sizes.append(st.st_size)
        self.mtimes.append(st.st_mtime_ns)
        # A file system without inode numbers (st_ino 0) keys rows by path, as before.
        self.identities.append((st.st_dev, st.st_ino) if st.st_ino else rel)

    def walk(self, rel_dir: str, label: str | None, split: int) -> None:
        """Index every image below ``rel_dir`` (recursively), without following symlinked dirs."""
        stack = [rel_dir]
        while stack:
            current = stack.pop()
            for entry, rel, kind in _list_dir(self, current):
                if kind == "dir":
                    stack.append(rel)
                else:
                    self.add_file(entry, rel, label, split)


def _printable(rel: str) -> str:
    # Names that are not valid UTF-8 arrive with surrogate escapes, which cannot be written to
    # HDF5, JSON or most terminals; show their bytes instead.
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether a folder scan counts ``path`` as an image: a regular file with an image extension, or
    without one (or with a numeric one) and the DICOM preamble. The one rule of extract, predict and export."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        return False
    return _is_image_name(name) or (_may_be_dicom(name) and is_dicom_file(path))


def _may_be_dicom(name: str) -> bool:
    # Scanners write DICOM files without an extension (IM000001) or named by UID (1.2.840.113619.2.55.3);
    # only those are opened to look for the preamble, so a folder of other files costs no reads.
    dot = name.rfind(".")
    return dot <= 0 or name[dot + 1:].isdigit()


def _list_dir(walk: _Walk, rel_dir: str) -> list[tuple[os.DirEntry[str], str, str]]:
    """Visible entries of one directory as (entry, relative path, "dir" | "file")."""
    path = os.path.join(walk.root, rel_dir) if rel_dir else walk.root
    out: list[tuple[os.DirEntry[str], str, str]] = []
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError as e:
        if not rel_dir:
            raise DatasetError(
                f"Cannot read the data folder '{path}': {e.strerror or e}. Check its permissions."
            ) from None
        # An unreadable sub-folder: its files cannot be indexed; say so rather than fail the scan.
        walk.ignore(rel_dir + "/")
        return out
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        rel = f"{rel_dir}/{name}" if rel_dir else name
        if not _is_utf8(name):
            walk.n_files += 1
            walk.ignore(rel)
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if is_dir:
            out.append((entry, rel, "dir"))
            continue
        try:
            is_symlinked_dir = entry.is_symlink() and entry.is_dir()
        except OSError:
            is_symlinked_dir = False
        if is_symlinked_dir:
            # Not followed, so that a link to a parent cannot loop; listed so it is not a surprise.
            walk.ignore(rel + "/")
            continue
        out.append((entry, rel, "file"))
    return out


def scan_folder(root: str | os.PathLike[str], require_labels: bool = False) -> ImageIndex:
    """Find the images in a folder, with their labels and splits, in a deterministic order.

    Args:
        root: the ``DATA`` folder: ``DATA/<class>/**/<image>``,
            ``DATA/{train,val,test}/<class>/**/<image>`` (``valid`` and ``validation`` count as
            ``val``), or a flat folder of images.
        require_labels: refuse a flat (unlabelled) folder.

    Returns:
        An :class:`ImageIndex`.

    Raises:
        DatasetError: ``root`` is missing or not a folder; it holds no images; a labelled layout
            has a single class; or ``require_labels`` is set and the folder is flat.

    Example:
        >>> index = scan_folder("DATA")  # doctest: +SKIP
        >>> index.classes, len(index)
        (['cat', 'dog'], 2000)
    """
    root_path = _data_root(root)
    walk = _Walk(os.fspath(root_path))
    layout = _walk_layout(walk)
    ignored = sorted(walk.ignored)
    if not walk.paths:
        examples = ", ".join(f"'{p}'" for p in ignored[:3])
        seen = f"saw {walk.n_files} file(s), none of them usable"
        if examples:
            seen += f" (e.g. {examples})"
        raise DatasetError(
            f"No images found in '{root_path}': {seen}. {_LAYOUT_HELP}; "
            f"image extensions are {', '.join(sorted(IMAGE_EXTENSIONS))}."
        )

    order, duplicates = _one_row_per_file(walk, root_path)
    paths = [walk.paths[i] for i in order]
    fingerprints = np.empty((len(paths), 2), dtype=np.int64)
    fingerprints[:, 0] = np.asarray(walk.sizes, dtype=np.int64)[order]
    fingerprints[:, 1] = np.asarray(walk.mtimes, dtype=np.int64)[order]
    splits = np.asarray(walk.splits, dtype=np.int8)[order]
    classes, labels = _classes_and_labels(walk, order, layout, root_path, require_labels)
    return ImageIndex(
        root=root_path,
        layout=layout,
        classes=classes,
        paths=paths,
        labels=labels,
        splits=splits,
        fingerprints=fingerprints,
        ignored=ignored,
        duplicates=duplicates,
    )


def _one_row_per_file(walk: _Walk, root_path: Path) -> tuple[list[int], list[tuple[str, str]]]:
    """Row order (sorted by path) with repeats of one file (same st_dev, st_ino) dropped after the first.

    Raises:
        DatasetError: one file under two classes or two splits (each such pair listed).
    """
    order = sorted(range(len(walk.paths)), key=walk.paths.__getitem__)
    first: dict[tuple[int, int] | str, int] = {}
    keep: list[int] = []
    duplicates: list[tuple[str, str]] = []
    conflicts: list[str] = []
    for i in order:
        j = first.setdefault(walk.identities[i], i)
        if j == i:
            keep.append(i)
        elif (walk.labels[i], walk.splits[i]) == (walk.labels[j], walk.splits[j]):
            duplicates.append((walk.paths[i], walk.paths[j]))
        else:
            conflicts.append(f"'{walk.paths[j]}' and '{walk.paths[i]}'")
    if conflicts:
        more = f" (and {len(conflicts) - 10} more)" if len(conflicts) > 10 else ""
        raise DatasetError(
            f"The data folder '{root_path}' holds one file under two classes or splits (links to one file): "
            f"{'; '.join(conflicts[:10])}{more}. One file is one row: keep one copy, where it belongs."
        )
    if duplicates:
        warnings.warn(
            f"The data folder '{root_path}': {len(duplicates)} path(s) are the same file as an earlier path (e.g. "
            f"'{duplicates[0][0]}' is '{duplicates[0][1]}', a link); each is counted once.",
            DuplicateRowsWarning, stacklevel=3,
        )
    return keep, duplicates


def _data_root(root: str | os.PathLike[str]) -> Path:
    """The resolved DATA folder, or a DatasetError saying what to pass."""
    given = Path(root).expanduser()
    if not given.exists():
        raise DatasetError(
            f"The data folder '{given}' does not exist. "
            "Pass the folder that holds your images (DATA/<class>/<image>)."
        )
    if not given.is_dir():
        raise DatasetError(
            f"The data folder '{given}' is not a directory. "
            "Pass the folder that holds your images (DATA/<class>/<image>), not a single file."
        )
    return given.resolve()


def _walk_layout(walk: _Walk) -> str:
    """Walk the folder into ``walk`` and return its layout: ``splits``, ``imagefolder`` or ``flat``."""
    top = _list_dir(walk, "")
    top_dirs = [(entry, rel) for entry, rel, kind in top if kind == "dir"]
    top_files = [(entry, rel) for entry, rel, kind in top if kind == "file"]

    if top_dirs and all(entry.name.lower() in _SPLIT_ALIASES for entry, _ in top_dirs):
        for _, rel in top_files:
            walk.n_files += 1
            walk.ignore(rel)
        for split_entry, split_rel in top_dirs:
            split = _SPLIT_ALIASES[split_entry.name.lower()]
            for entry, rel, kind in _list_dir(walk, split_rel):
                if kind == "dir":
                    walk.walk(rel, entry.name, split)
                else:
                    # Images directly in DATA/train/ carry no class.
                    walk.n_files += 1
                    walk.ignore(rel)
        return "splits"
    for entry, rel in top_dirs:
        walk.walk(rel, entry.name, -1)
    if walk.paths:
        for _, rel in top_files:
            # Images beside class folders carry no class.
            walk.n_files += 1
            walk.ignore(rel)
        return "imagefolder"
    # No sub-folder holds an image; their other files are already listed as ignored.
    for entry, rel in top_files:
        walk.add_file(entry, rel, None, -1)
    return "flat"


def _classes_and_labels(walk: _Walk, order: list[int], layout: str, root_path: Path,
                        require_labels: bool) -> tuple[list[str], np.ndarray]:
    """Sorted class names and each row's class index (-1 for a flat folder)."""
    n = len(order)
    if layout == "flat":
        if require_labels:
            raise DatasetError(
                f"The data folder '{root_path}' has {n} image(s) but no class folders, "
                "and labels are required here. Put the images into one folder per class: "
                "DATA/<class>/<image>."
            )
        return [], np.full(n, -1, dtype=np.int64)
    classes = sorted({label for label in walk.labels if label is not None})
    if len(classes) == 1:
        raise DatasetError(
            f"Found only one class '{classes[0]}' in '{root_path}' ({n} image(s)); "
            "a classifier needs at least two. Add a folder per class, or put images directly "
            "in DATA for unlabelled extraction."
        )
    class_index = {name: i for i, name in enumerate(classes)}
    raw = np.asarray([class_index[label] for label in walk.labels], dtype=np.int64)  # type: ignore[index]
    return classes, raw[order]
