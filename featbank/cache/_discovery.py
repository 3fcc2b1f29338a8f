"""Where caches live: the default cache folder and the newest complete cache in it."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CacheError

__all__ = ["default_cache_dir", "find_latest_cache"]


def default_cache_dir() -> Path:
    """``$FEATBANK_CACHE_DIR``, else ``$XDG_CACHE_HOME/featbank``, else ``~/.cache/featbank``."""
    env = os.environ.get("FEATBANK_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "featbank"


def find_latest_cache(directory: Path | None = None) -> Path:
    """The most recently written complete cache in the default cache folder."""
    d = (directory or default_cache_dir()) / "caches"
    files = [p for p in d.glob("*.h5") if p.is_file()] if d.is_dir() else []
    if not files:
        raise CacheError(
            f"No feature cache found in {d}. Run 'featbank extract DATA' first, or pass the cache "
            "path explicitly."
        )
    return max(files, key=lambda p: p.stat().st_mtime_ns)
