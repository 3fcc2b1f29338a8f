"""`featbank.extract`: the library's one entry point for extraction; its run is :mod:`~featbank.extraction.job`."""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import ConfigError
from ._report import ExtractReport
from .config import ExtractConfig

__all__ = ["extract"]


def extract(
    config: ExtractConfig | str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    **options: object,
) -> ExtractReport:
    """Embed every image of a folder with a frozen backbone into an HDF5 cache.

    Reruns are incremental (only new or changed files are embedded, deleted ones dropped) and
    resume after a crash or Ctrl-C. A cache made with other settings is refused unless
    ``overwrite``. The cache's index stores the run's :class:`ExtractConfig` as JSON
    (:func:`~featbank.extraction.read_extract_config` reads it back).

    The cache is schema v2 (docs/formats.md): the rows are cut into shards of about
    ``shard_size`` rows, each written to a part file, and ``out`` is a small index over them, so a
    rerun rewrites only the parts whose files changed. A schema-v1 cache at ``out`` is migrated
    first. At scale (docs/at-scale.md): ``procs`` local processes, torchrun (``WORLD_SIZE`` > 1),
    Ray, or the slices of a job array (``rank``/``world``, then ``finalize``) run the shards; a
    manifest or WebDataset ``data`` is read as rows.

    Args:
        config: the run's :class:`ExtractConfig`; or, as a shorthand, its ``data`` (a folder,
            manifest or WebDataset shards), with ``out`` and the other fields as keywords
            (``featbank.extract("data/elpv", "runs/elpv.h5", batch_size=64)``).
        out: the cache file (shorthand form only).
        on_progress: called as ``on_progress(done, total)`` after every batch (``procs=1``) or
            finished part (more processes, Ray); raising ``KeyboardInterrupt`` there stops the run.
        **options: the other fields of :class:`ExtractConfig` (shorthand form only).

    Returns:
        An :class:`ExtractReport`.

    Raises:
        ConfigError: an unknown ``window``; an option past its bound (``shard_size`` over 1,000,000,
            ``views`` over 64, ...) or a backbone name with more than one ``@SIZE``, before any work; a
            brace pattern naming more than 1,000,000 tars.
        DatasetError: missing or empty folder, a single class, one file named by rows (or links) that
            disagree on its label or split.
        CacheKeyMismatch: the existing cache was made with other settings (file untouched).
        CacheError: another process is writing the same cache (``<out>.lock`` is held).
        CacheError: a damaged cache at ``out`` (untouched), not enough space (checked first).
        CacheError: ``finalize`` while slices of the job array have not run or not finished (it
            names the shards, and the ranks when ``world`` is given; nothing is published).
        Interrupted: Ctrl-C; finished rows are kept and a rerun resumes.

    Example:
        >>> report = featbank.extract("data/elpv", backbone="efficientnet_lite0")
        >>> print(report.summary())
    """
    from .job import run_extract

    if isinstance(config, ExtractConfig):
        if out is not None or options:
            raise ConfigError("featbank.extract(config) takes the ExtractConfig alone; to change a field, pass "
                              "dataclasses.replace(config, ...). Got also: "
                              + ", ".join([*(["out"] if out is not None else []), *options]) + ".")
    else:
        config = ExtractConfig(os.fspath(config), None if out is None else os.fspath(out), **options)  # type: ignore[arg-type]
    return run_extract(config, on_progress)
