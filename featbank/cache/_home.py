"""Where featbank keeps its caches by default (the ground floor of ``featbank.cache``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``$FEATBANK_CACHE_DIR``, else ``$XDG_CACHE_HOME/featbank``, else ``~/.cache/featbank``."""
    env = os.environ.get("FEATBANK_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "featbank"
