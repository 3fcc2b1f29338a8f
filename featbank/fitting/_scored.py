"""What ``fit --auto`` / ``fit --cv K`` scores: a :class:`Candidate` (a route to a head) and its
:class:`Scored` record (its grid, its fold scores so far, their seconds), which gives its leaderboard row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..heads import jsonable

__all__ = ["Candidate", "Scored", "FeatureKey"]

#: (layers, views) of a feature matrix: the layers concatenated in network order, "plain" or "pooled".
FeatureKey = tuple[tuple[str, ...], str]


@dataclass(frozen=True)
class Candidate:
    """One route to a head: which features, how views are handled, the preprocessing and the head family.

    ``features`` names the feature set (``final``, ``auto``, ``all``, a span ``last2`` ..., or the
    layers given); ``layers`` are its layers in network order; ``views`` is ``plain`` or ``pooled``.
    ``tier``: round 1 leads with the candidates of tier 0, those of tier 1 after them (the suffix
    spans of ``--auto``, refinements between ``final`` and ``all``); not part of the leaderboard.
    """

    features: str
    layers: tuple[str, ...]
    views: str
    preprocess: str
    head: str
    tier: int = 0

    @property
    def key(self) -> FeatureKey:
        return (self.layers, self.views)

    def describe(self) -> dict[str, Any]:
        return {"features": self.features, "layers": list(self.layers), "views": self.views,
                "preprocessing": self.preprocess, "head": self.head}


@dataclass
class Scored:
    """A candidate's grid and its fold scores so far (``scores``: grid points x folds scored)."""

    candidate: Candidate
    grid: list[dict[str, Any]]
    scores: np.ndarray
    seconds: float = 0.0
    rounds: int = 0
    estimate: float = 0.0
    kernel_estimate: float | None = None  # the Gram's part of ``estimate``; None: the family shares no kernel
    est_done: float = 0.0  # the estimated seconds of the folds timed so far (``seconds`` is what they took)
    screen_scale: float = 1.0  # round 1's fold (a sample, see SCREEN_ROWS) against a whole fold, by the estimates
    screen_seconds: float = 0.0  # the part of ``seconds`` and ``est_done`` on round 1's sample
    screen_est: float = 0.0
    screen_scores: np.ndarray | None = None  # round 1's scores on the sample (``scores`` drops them in round 2)

    @property
    def n_fits(self) -> int:
        """Folds scored, round 1's sample included (a survivor's ``scores`` set its column aside)."""
        return int(self.scores.shape[1]) + (self.screen_scores is not None and self.rounds > 1)

    @property
    def on_sample(self) -> bool:
        """Its scores are those of round 1's sample (it went no further)."""
        return self.screen_scores is not None and self.rounds <= 1

    @property
    def group(self) -> tuple[FeatureKey, str] | None:
        """(features, preprocessing) of a family that works from a shared Gram matrix, else None."""
        return None if self.kernel_estimate is None else (self.candidate.key, self.candidate.preprocess)

    @property
    def best_index(self) -> int:
        means = self.scores.mean(axis=1)
        return int(np.flatnonzero(means >= means.max() - 1e-12)[0])  # ties: the first grid point

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.grid[self.best_index])

    @property
    def cv_mean(self) -> float:
        return float(self.scores[self.best_index].mean())

    @property
    def cv_std(self) -> float:
        return float(self.scores[self.best_index].std())

    def to_row(self, rank: int) -> dict[str, Any]:
        row = {"rank": rank, **self.candidate.describe(), "params": jsonable(self.params), "cv_mean": self.cv_mean,
               "cv_std": self.cv_std, "n_folds": int(self.scores.shape[1]), "rounds": self.rounds,
               "seconds": round(self.seconds, 3)}
        return {**row, "sample": True} if self.on_sample else row

