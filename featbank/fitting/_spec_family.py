"""``fit --cv K`` for a head that is not one of the autopilot's families (``--head SVC``, ``LogisticRegression``...).

:class:`SpecFamily` presents one ``--head`` (with its ``--param`` values and preprocessing flags)
as a head family: when the head has a ``C`` that ``--param`` does not fix, its grid is every C
that ``fit``'s validation sweep can reach (the coarse grid, :data:`~featbank.heads.SKLEARN_C_GRID`
or ``--grid``, then half a decade either side of the best): the coarse values and the half
decades between and beyond them (0.01 .. 100 gives 0.00316 .. 316, 11 values; the linear head's
1e-6 .. 1e2, 19), so a C at the
coarse grid's edge is followed past it, as the validation sweep follows it; else the one setting
given. Each grid point is
fitted afresh on every fold's fit rows (no shared kernel or warm start: the families of
``featbank.heads`` do that for their heads).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ..heads import half_decades
from ._select import HeadSpec, make_head

__all__ = ["SpecFamily", "spec_preprocess"]


def spec_preprocess(spec: HeadSpec) -> str:
    """The preprocessing of a head's flags, as the leaderboard names it."""
    parts = [p for p, on in (("standardize", spec.standardize), ("l2-normalize", spec.l2_normalize)) if on]
    return "+".join(parts) or "none"


class SpecFamily:
    """One ``--head`` with its parameters as a family: its C grid (when free), fitted per fold."""

    def __init__(self, spec: HeadSpec, seed: int = 0):
        self.spec, self.seed = spec, seed
        self.name = spec.head

    def _has_free_c(self) -> bool:
        kind = self.spec.kind
        params = kind.classifier(kind.build(self.spec, self.seed)).get_params()
        return "C" in params and "C" not in self.spec.params

    def default_grid(self, n_samples: int, n_features: int, n_classes: int) -> list[dict[str, Any]]:
        """Each setting in full: the ``--param`` values, and C where it is free (so the leaderboard and the
        bundle's ``chosen`` say every parameter the head was fitted with)."""
        fixed = dict(self.spec.params)
        if not self._has_free_c():
            return [fixed]
        return [{**fixed, "C": c} for c in half_decades(self.spec.grid or self.spec.kind.c_grid)]

    def build(self, params: dict[str, Any], *, preprocess: str = "standardize", seed: int = 0) -> Any:
        est, _ = make_head(replace(self.spec, params={**self.spec.params, **params}), seed)
        return est

    def cv_scores(self, X: np.ndarray, y: np.ndarray, folds: Any, grid: list[dict[str, Any]], *,
                  preprocess: str = "standardize", device: str = "cpu") -> np.ndarray:
        kind = self.spec.kind
        out = np.zeros((len(grid), len(folds)))
        for j, (fit_rows, held) in enumerate(folds):
            for i, params in enumerate(grid):
                est = kind.fit(self.build(params, seed=self.seed), X[fit_rows], y[fit_rows], self.spec.class_weight)
                out[i, j] = float(np.mean(est.predict(X[held]) == y[held]))
        return out

    def relative_cost(self, n_samples: int, n_features: int, n_grid: int) -> float:
        # A crude guess (one fit ~ n * d * 2e-8 s, kernels n^2 * d): the plan orders by it and the clock guards.
        return n_grid * (n_samples * n_features * 2e-8 + n_samples**2 * n_features * 1e-11)
