"""The search's budget: the wall clock, and the measured speed of each head family against its estimates
(how :class:`~featbank.fitting._search.AutoSearch` predicts what a candidate's next folds will cost)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._scored import Scored

__all__ = ["Clock"]

#: The smallest measured / estimated speed ratio the plan believes (a family timed at ~0 s).
_MIN_RATIO = 1e-3


@dataclass
class Clock:
    """The budget: the wall clock, and how fast this machine runs each family against its estimates.

    ``ratio(family)`` is measured seconds / estimated seconds over the folds that family has
    been scored on so far (before any: the ratio over every family measured, else 1), so a
    family whose ``relative_cost`` is 3x too high on this machine is planned at a third of it.
    """

    budget_s: float
    now: Callable[[], float] = time.perf_counter
    t0: float = float("nan")
    est: dict[str, float] = field(default_factory=dict)
    real: dict[str, float] = field(default_factory=dict)
    screen_est: dict[str, float] = field(default_factory=dict)  # the part of est / real on round 1's sample
    screen_real: dict[str, float] = field(default_factory=dict)
    cut_by_clock: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if math.isnan(self.t0):
            self.t0 = self.now()

    @property
    def elapsed(self) -> float:
        return self.now() - self.t0

    def ratio(self, family: str) -> float:
        if self.est.get(family, 0.0) > 0:
            return max(self.real[family] / self.est[family], _MIN_RATIO)
        total = sum(self.est.values())
        return max(sum(self.real.values()) / total, _MIN_RATIO) if total > 0 else 1.0

    def predict(self, s: Scored, n_folds: int, cv: int, saved: float = 0.0, scale: float = 1.0) -> float:
        """Seconds ``s`` should take on ``n_folds`` more folds, whose estimated seconds are its estimate
        per fold less ``saved`` (the shared Gram matrices already there), times ``scale`` (round 1's
        sampled fold): scaled by its own measured / estimated ratio once it has folds, else by its family's."""
        work = (s.estimate / cv * n_folds - saved / cv) * scale
        whole_s, whole_e = s.seconds - s.screen_seconds, s.est_done - s.screen_est
        if scale == 1.0 and whole_s > 0 and whole_e > 0:
            return work * whole_s / whole_e
        if s.scores.shape[1] and s.seconds > 0 and s.est_done > 0:
            # timed on round 1's sample alone: whole folds at that speed, corrected by how much faster or
            # slower than the sample whole folds have run against their estimates so far
            return work * s.seconds / s.est_done * (self.whole_factor(s.candidate.head) if scale == 1.0 else 1.0)
        return work * self.ratio(s.candidate.head)

    def whole_factor(self, family: str) -> float:
        """Measured / estimated seconds of ``family``'s whole folds over that of its folds on round 1's
        sample, once it has both; else 1. (The estimates scale a fold by its fit rows alone; a sample's
        held-out rows, and what a fold costs whatever its size, can make it dearer than its estimate
        says, or cheaper. Another family's factor is no guide: on a 60,000-row cache the linear head's
        whole folds ran at 0.64 of its sample's ratio, the MLP's at 1.0, and the MLP planned with the
        linear head's factor overran the budget by 17%.)"""
        se, sr = self.screen_est.get(family, 0.0), self.screen_real.get(family, 0.0)
        we, wr = self.est.get(family, 0.0) - se, self.real.get(family, 0.0) - sr
        if se > 0 and sr > 0 and we > 0 and wr > 0:
            return max((wr / we) / (sr / se), _MIN_RATIO)
        return 1.0

    def fits(self, seconds: float, limit: float) -> bool:
        return self.elapsed + seconds <= limit

    def record(self, family: str, estimate: float, seconds: float, screen: bool = False) -> None:
        self.est[family] = self.est.get(family, 0.0) + estimate
        self.real[family] = self.real.get(family, 0.0) + seconds
        if screen:
            self.screen_est[family] = self.screen_est.get(family, 0.0) + estimate
            self.screen_real[family] = self.screen_real.get(family, 0.0) + seconds

    def calibration(self) -> dict[str, float]:
        """Measured / estimated seconds per family scored (the factor the plan applied to its estimates)."""
        return {f: round(self.real[f] / self.est[f], 4) for f in sorted(self.est) if self.est[f] > 0}
