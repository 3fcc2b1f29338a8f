"""One select-on-validation-then-refit of a head, its kind doing the work (:mod:`featbank.heads.kinds`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..heads import COARSE_GRID, SKLEARN_C_GRID, HeadSpec, ValSplit
from ._rows import CacheRows

if TYPE_CHECKING:
    from ..cache import FeatureCache
    from ..heads import Estimator, HeadKind
    from ._layers import FeatureTable

__all__ = ["COARSE_GRID", "SKLEARN_C_GRID", "HeadSpec", "Selection", "make_head", "select_and_refit"]


@dataclass
class Selection:
    """One select-on-val-then-refit: the estimator, its kind, the chosen setting and the evidence."""

    estimator: Estimator
    kind: HeadKind
    chosen: dict[str, Any]
    sweep: list[dict[str, Any]]
    val_metrics: dict[str, Any]
    val_proba: np.ndarray | None
    val_view_probas: list[np.ndarray] = field(default_factory=list)

    @property
    def htype(self) -> str:
        """The bundle's ``head.type``: the kind's name."""
        return self.kind.name


def make_head(spec: HeadSpec, seed: int) -> tuple[Estimator, str]:
    """An unfitted estimator for ``spec`` and its kind's name; every parameter is checked here, before any work.

    Raises:
        ConfigError: unknown head or parameter, a parameter value the head refuses, a class weight
            the classifier cannot take.
    """
    kind = spec.kind
    return kind.build(spec, seed), kind.name


def select_and_refit(cache: FeatureCache | FeatureTable, source: CacheRows, spec: HeadSpec, seed: int,
                     rows: tuple[np.ndarray, np.ndarray, np.ndarray], val_views: Sequence[np.ndarray] = ()) -> Selection:
    """Select the head's setting on ``val`` (C sweep, MLP early stopping), then refit on ``refit_rows``.

    ``rows``: ``(train, val, refit_rows)``. ``val_views``: rows of the augmented views of ``val``
    (one array per view); their probabilities under the head fitted on ``train`` (before the refit)
    go to ``Selection.val_view_probas``, for the test-time augmentation choice.
    """
    from ..heads import estimator_proba
    from ..report import compute_metrics

    train, val, refit_rows = rows
    k = len(cache.classes)
    kind = spec.kind
    est = kind.build(spec, seed)
    has_val = len(val) > 0
    data = ValSplit(source(train), cache.labels[np.sort(train)], source(val) if has_val else None,
                    cache.labels[np.sort(val)] if has_val else None, k, spec.class_weight == "balanced")
    sel = kind.select(est, data, spec)
    val_metrics = compute_metrics(data.yv, sel.val_proba, cache.classes) if sel.val_proba is not None else {}
    view_probas = []
    if sel.val_proba is not None:
        view_probas = [estimator_proba(sel.estimator, kind.rows(source(r)), k) for r in val_views]
    if len(refit_rows) != len(train) or not np.array_equal(np.sort(refit_rows), np.sort(train)):
        kind.refit(sel.estimator, sel.chosen, source(refit_rows), cache.labels[np.sort(refit_rows)], spec)
    return Selection(sel.estimator, kind, sel.chosen, sel.sweep, val_metrics, sel.val_proba, view_probas)
