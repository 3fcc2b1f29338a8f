"""Where rows come from: an image folder, a manifest (CSV, TSV, parquet) or WebDataset shards.

One module per kind (:mod:`~featbank.sources.folders`, :mod:`~featbank.sources.manifests`,
:mod:`~featbank.sources.webdataset`) and :mod:`~featbank.sources.rows` for what they share.

Every kind gives a :class:`RowSource` (sorted unique row keys with fingerprints, labels and
splits). :func:`create_source` picks the reader by kind, like timm's ``create_reader``;
:func:`source_kind` tells the kind of a ``DATA`` argument from its name.

Example:
    >>> from featbank.sources import create_source, source_kind
    >>> source = create_source(source_kind("data/"), "data/")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .folders import SPLIT_NAMES, ImageIndex, is_image_file, scan_folder
from .manifests import read_manifest
from .rows import RowSource
from .webdataset import LABEL_SOURCES, MAX_PATTERN_NAMES, TarImages, count_braces, expand_braces, read_webdataset

__all__ = [
    "SOURCE_KINDS",
    "SPLIT_NAMES",
    "LABEL_SOURCES",
    "MAX_PATTERN_NAMES",
    "ImageIndex",
    "RowSource",
    "TarImages",
    "create_source",
    "source_kind",
    "is_manifest",
    "is_webdataset",
    "scan_folder",
    "is_image_file",
    "read_manifest",
    "read_webdataset",
    "expand_braces",
    "count_braces",
]

_MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet")


def is_webdataset(data: str | os.PathLike[str]) -> bool:
    """``data`` names WebDataset shards: a ``.tar`` file, a brace pattern of them, or a folder holding ``.tar`` files."""
    data = os.fspath(data)
    if "{" in data and data.endswith(".tar"):
        return True
    p = Path(data).expanduser()
    if p.is_file():
        return p.suffix == ".tar"
    if p.is_dir():
        try:
            return any(c.suffix == ".tar" and c.is_file() for c in p.iterdir())
        except OSError:
            return False
    return False


def is_manifest(data: str | os.PathLike[str]) -> bool:
    """``data`` names a manifest file (``.csv``, ``.tsv`` or ``.parquet``)."""
    return Path(data).suffix.lower() in _MANIFEST_SUFFIXES


def source_kind(data: str | os.PathLike[str]) -> str:
    """The kind of source ``data`` names: ``manifest``, ``webdataset`` or ``folder``."""
    if is_manifest(data):
        return "manifest"
    if is_webdataset(data):
        return "webdataset"
    return "folder"


def _folder(data: str | os.PathLike[str], **options: Any) -> RowSource:
    return RowSource.from_index(scan_folder(data, **options))


#: kind -> reader of ``(data, **options)`` giving a :class:`RowSource`.
SOURCE_KINDS: dict[str, Callable[..., RowSource]] = {
    "folder": _folder,
    "manifest": read_manifest,
    "webdataset": read_webdataset,
}


def create_source(kind: str, data: str | os.PathLike[str], **options: Any) -> RowSource:
    """List the rows of ``data`` with the reader of ``kind``.

    Args:
        kind: ``folder`` (options: ``require_labels``), ``manifest`` (``path_column``,
            ``label_column``, ``split_column``) or ``webdataset`` (``label_from``);
            :func:`source_kind` tells it from ``data``.
        data: the folder, manifest file, or shards (folder, ``.tar`` or brace pattern).

    Raises:
        ConfigError: an unknown kind.
        DatasetError: what the reader refuses (see :func:`scan_folder`, :func:`read_manifest`,
            :func:`read_webdataset`).
    """
    reader = SOURCE_KINDS.get(kind)
    if reader is None:
        raise ConfigError(f"The 'kind' parameter of create_source must be one of {', '.join(SOURCE_KINDS)}. "
                          f"Got {kind!r} instead.")
    return reader(data, **options)
