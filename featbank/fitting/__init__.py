"""Fit a head on a feature cache with a linear-probe protocol (evaluate and predict: :mod:`featbank.inference`).

Protocol (Kornblith et al. 2019, CLIP linear probes): a validation split — the cache's own ``val``
split, else a deterministic stratified ``val_split`` of ``train`` — selects the hyperparameter
(for ``linear`` a log-spaced sweep of ``C``: a coarse grid, then a finer one around the best,
each fit warm-started from the nearest solution); the head is then refitted on train+val (unless
``refit=False``) and evaluated on the ``test`` split when there is one (otherwise the reported
numbers are those of the validation split, which selected the model and so are slightly optimistic).
"""

from __future__ import annotations

from ._auto import bootstrap_interval, column_blocks, feature_matrices, spans
from ._layers import pool_views
from ._rows import opened_cache, parse_memory, split_rows
from ._scored import Candidate
from ._search import AutoSearch, make_folds, parse_budget
from ._select import COARSE_GRID
from .config import FitConfig
from .probe import FitResult, fit

__all__ = ["FitResult", "FitConfig", "fit", "COARSE_GRID", "parse_memory", "AutoSearch", "Candidate", "parse_budget",
           "bootstrap_interval", "opened_cache", "pool_views", "feature_matrices", "column_blocks", "spans", "split_rows",
           "make_folds"]
