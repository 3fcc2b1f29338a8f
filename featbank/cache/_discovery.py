"""Which cache ``fit`` uses when none is named (a rule the user can see), and :func:`open_cache`.

This module stands on the reader: it opens caches to judge them, and ``open_cache(None)`` opens its pick.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CacheError
from ._home import default_cache_dir
from ._reader import FeatureCache

__all__ = ["CacheChoice", "choose_cache", "find_latest_cache", "open_cache"]


@dataclass
class CacheChoice:
    """The cache :func:`choose_cache` picked, and why (one sentence for the user).

    Attributes:
        path: the chosen cache file.
        reason: the rule that picked it, in words ("the only complete cache in ...").
        root: the data folder it was extracted from.
        passed_over: ``[(path, why)]`` for cache files in the folder that were not eligible.
    """

    path: Path
    reason: str
    root: str = ""
    passed_over: list[tuple[Path, str]] = field(default_factory=list)


def _candidates(folder: Path) -> tuple[list[tuple[Path, str, int]], list[tuple[Path, str]]]:
    """(complete valid caches as (path, data folder, mtime_ns), [(other .h5 file, why not)])."""
    good, other = [], []
    files = sorted(p for p in folder.glob("*.h5") if p.is_file()) if folder.is_dir() else []
    for p in files:
        try:
            with FeatureCache(p) as c:
                good.append((p, str(c.metadata.get("root", "")), p.stat().st_mtime_ns))
        except CacheError as e:
            other.append((p, "incomplete" if "incomplete" in str(e) else "not a valid cache"))
        except OSError as e:
            other.append((p, f"unreadable ({e.strerror or e})"))
    return good, other


def choose_cache(directory: Path | None = None) -> CacheChoice:
    """Pick the cache ``fit`` uses when none is named, by a rule the user can see.

    The rule: only complete, valid caches in ``<directory>/caches`` count (an interrupted
    ``extract`` leaves ``complete=False``; damaged files are passed over). If they all come from one
    data folder, the most recently written one is chosen (the folder may have caches of several
    backbones). If they come from more than one data folder, the choice would be a guess between
    data sets, so nothing is chosen.

    Args:
        directory: the featbank cache folder; default :func:`default_cache_dir`.

    Returns:
        A :class:`CacheChoice` whose ``reason`` says why this cache (print it).

    Raises:
        CacheError: no eligible cache, or caches of more than one data folder (the message lists
            them and says to pass one).
    """
    d = (directory or default_cache_dir()) / "caches"
    good, other = _candidates(d)
    if not good:
        extra = "".join(f"\n  {p} ({why})" for p, why in other)
        raise CacheError(
            f"No complete feature cache found in {d}.{' Passed over:' + extra if extra else ''}\n"
            "Run 'featbank extract DATA' first (rerun it to finish an interrupted one), or pass the cache "
            "path explicitly."
        )
    roots = sorted({r for _, r, _ in good})
    if len(roots) > 1:
        listing = "".join(f"\n  {p}  (data: {r or '?'})" for p, r, _ in sorted(good, key=lambda g: (g[1], g[0])))
        raise CacheError(
            f"{d} holds caches of {len(roots)} data folders, so which one to fit is a guess:{listing}\n"
            "Pass the cache to use, e.g. 'featbank fit " + str(good[0][0]) + "'."
        )
    path, root, _ = max(good, key=lambda g: g[2])
    n = len(good)
    reason = (f"the only complete cache in {d} (data: {root})" if n == 1 else
              f"the most recently written of the {n} complete caches in {d}, all of data {root}")
    if other:
        reason += f"; passed over {len(other)} incomplete or invalid file(s)"
    return CacheChoice(path, reason, root, other)


def find_latest_cache(directory: Path | None = None) -> Path:
    """The path :func:`choose_cache` picks (kept for callers that need only the path)."""
    return choose_cache(directory).path


def open_cache(path: str | os.PathLike | None = None, *, extreme: str = "raise",
               allow_incomplete: bool = False) -> FeatureCache:
    """Open a featbank cache for reading; with no path, the one :func:`choose_cache` picks.

    Opening validates everything but the embedding values: the format and schema version, that
    every dataset is there with the right shape and one row per embedding, labels within the
    classes, split codes within ``split_names``, JSON attributes. Embedding values are checked as
    rows are read (NaN/inf always refused; see ``extreme``), so opening a large cache stays cheap.

    Args:
        path: the cache file; ``None`` for :func:`choose_cache`'s pick in the default folder.
        extreme: rows with a value beyond ``EXTREME_VALUE`` (finite but huge, e.g. 1e38):
            ``"raise"`` (default) refuses them with a :class:`CacheError` naming them, ``"warn"``
            returns them with an :class:`ExtremeEmbeddingsWarning`, ``"ignore"`` returns them.
        allow_incomplete: open a cache that an interrupted extract left with ``complete=False``.

    Raises:
        CacheError: missing, unreadable, damaged (the message names the field and the value),
            incomplete, or of another schema version. :class:`NotACacheError` (a subclass) when the
            file is not a featbank cache at all.

    Example:
        >>> with open_cache("runs/elpv.h5") as cache:
        ...     X = cache.load_embeddings(cache.split_mask("train"))
    """
    return FeatureCache(path if path is not None else find_latest_cache(), extreme=extreme,
                        allow_incomplete=allow_incomplete)
