"""``compare``: a backbone bake-off on one data folder (extract what is missing, probe each, one table).

Each backbone's cache is the one ``featbank extract DATA --backbone NAME`` writes by default
(:func:`~featbank.extraction.default_cache_path`), so caches extracted before are reused and
``featbank fit`` finds the ones written here. Each cache gets the default probe of
``featbank fit`` (a linear head, C chosen on validation, refitted on train+val), in memory: no
bundle is written. Throughput comes from the extraction that filled the cache: this run's, or the
one recorded beside the cache (``<cache>.throughput.json``) when a previous ``compare`` embedded
more images than this run.

The package is a noun (``comparison``) so that ``featbank.compare`` stays the function even after
``import featbank.comparison``, as ``featbank.fit`` lives in ``featbank.fitting``. Inside:
``config`` (:class:`CompareConfig`, the run's settings, checked once), ``_run`` (checks, then extract and fit
per backbone), ``_throughput`` (img/s and its record),
``_table`` (the row type, the table, the plot).
"""

from __future__ import annotations

from ._run import compare
from ._table import CompareRow, default_plot_path, format_table, plot_comparison
from ._throughput import THROUGHPUT_SOURCES
from .config import CompareConfig, parse_backbones

__all__ = [
    "CompareConfig",
    "CompareRow",
    "compare",
    "parse_backbones",
    "default_plot_path",
    "format_table",
    "plot_comparison",
    "THROUGHPUT_SOURCES",
]
