"""The probe autopilot's search: candidates scored by repeated stratified K-fold CV within a time budget.

:class:`AutoSearch` is an estimator over *candidates* (a feature set, a view handling, a
preprocessing and a head family with its grid). It owns its folds and its scores and says what it
chose. It is handed the training images' feature matrices and labels only (``fit(data, y)``): it
never sees a test row, because the caller never gives it one.

Folds are over images: every row of a matrix it is handed is one image (the plain view, or the
image's views pooled into one row), so an image's views cannot straddle a fold. Repeat ``r`` uses
its own seeded :class:`~sklearn.model_selection.StratifiedKFold` shuffle.

Successive halving over folds and repeats, planned by *measured* speed. Each family's
``relative_cost`` is a rough estimate of its seconds per fold; the search times every fold it
scores and keeps, per family, the ratio of measured to estimated seconds (before a family has been
timed: the ratio over the families timed so far, else 1). A candidate's predicted seconds are its
estimated work (its estimate per fold, less the Gram matrix's part where a shared one is already
there: ``kernel_cost`` of the SVM and kNN families) times its own measured / estimated ratio once
it has folds, else its family's ratio. So the
plan follows the machine it runs on: on a quiet machine whose families run 3x faster than their
estimates, 3x more is scored; on a busy one, less, and the budget still holds. The rounds are: the
first fold of repeat 1; its other K - 1 folds; then one whole repeat per round (:func:`_rungs`).
Where fold 1 has more than :data:`SCREEN_ROWS` fit rows, round 1 *screens*: it scores every candidate
on a stratified sample of fold 1 (that many fit rows, at most that many held-out rows), round 2
scores the survivors on fold 1 whole, round 3 on its other K - 1 folds, and so on; the sample's
score is set aside from round 2 on, so a mean beyond round 1 is over whole folds (successive halving over
rows, then over folds, as scikit-learn's ``HalvingGridSearchCV`` with ``resource="n_samples"``
spends rows).

1. Round 1: every candidate is scored on one fold while its prediction fits in the budget less
   the *reserve*: what the later rounds would take were it scored (the best :data:`KEEP`, at most
   :data:`MAX_KEEP`, of the round-1 candidates by their scores so far, on each later round's folds,
   each at its own measured seconds per fold), capped so that round 1 may always spend
   :data:`ROUND1_SHARE` of the budget and the later rounds always keep :data:`LATER_SHARE`. The
   rest are *skipped for budget*. The first candidate is always scored, so there is a winner.
   The order (:meth:`AutoSearch._first_round`): one candidate of each feature set and family
   (tier 0 before tier 1), the cheapest predicted first; then, family by family (the best scored
   first), the other view handling, then the other preprocessings, each most promising first by the
   scores so far (feature set, closest relative); a Gram-sharing candidate's group next; last, the
   families that run when the budget allows (the MLP), cheapest first.
2. Each later round scores the best :data:`KEEP` fraction of the previous round's candidates (at
   least one, at most :data:`MAX_KEEP`, and no more of them, best first, than are predicted to fit
   in what is left of the budget together, planned again at the round's measured speed once those
   are done) on its folds, each while its predicted seconds fit in what is left of the budget; the
   clock is also checked between a candidate's folds (a candidate stopped part-way keeps none of
   that round's folds). Once a single candidate is left and it has all K folds of the first
   repeat, the search ends.
3. A candidate's score is the best mean over its grid of its folds so far; the leaderboard ranks by
   the last round reached (counting only rounds that scored all their candidates: a round the
   budget cut short promotes no one), then that score (on round 1's sample, for everyone, where
   round 1 screened and round 2 was cut short).

Reproducibility: the folds, the grids and the ranking are fixed by the seed; *which* candidates fit
the budget depends on the measured speed. When the budget does not bind (every candidate is scored
on every round), the result is the same on any machine; when it binds, it is the same on machines
(and loads) of the same speed, and a faster machine scores more.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import ConfigError
from ..splits import stratified_sample
from ._clock import Clock
from ._scored import Candidate, FeatureKey, Scored

if TYPE_CHECKING:
    from ..heads import Block

__all__ = ["AutoSearch", "HeadFamilyLike", "parse_budget", "make_folds",
           "DEFAULT_BUDGET", "DEFAULT_CV", "DEFAULT_REPEATS", "KEEP", "MAX_KEEP", "ROUND1_SHARE", "LATER_SHARE",
           "SCREEN_ROWS"]

#: The default ``--budget``: ``fit`` spends it on the layer selection, loading and this search (not the refit).
DEFAULT_BUDGET = "90s"
DEFAULT_CV = 5
#: Repeats of the K folds (each with its own shuffle): round r of the halving uses repeat r.
DEFAULT_REPEATS = 3
#: The fraction of a round's candidates that go on to the next repeat ...
KEEP = 1 / 3
#: ... and the most that go on from round 1: the later rounds' cost (round 1's reserve) stays bounded
#: however many candidates round 1 scores, so a wide grid is scored on one fold before any is dropped.
MAX_KEEP = 6
#: The share of the budget round 1 may always spend, whatever the later rounds' reserve: where one
#: fold costs seconds (Fashion-MNIST 10k: 5,600 rows per fold), the reserve of 6 survivors alone
#: would exceed the budget and leave round 1 a handful of candidates.
ROUND1_SHARE = 0.5
#: ... and the share the later rounds always keep: the search's own bookkeeping between folds is in
#: no fold's measured time (with millisecond folds it took 15% of round 1), so a reserve of the folds'
#: time alone could leave the later rounds nothing.
LATER_SHARE = 0.1
#: Round 1 screens on a stratified sample of this many of fold 1's fit rows when it has at least twice
#: as many (and of as many of its held-out rows, when more): a kernel SVM's fold grows with the square of the rows
#: or faster, and on Fashion-MNIST 10k (5,600 fit rows) one fold of every candidate took seconds, so
#: 90 s scored 13 of 102 candidates. The later rounds score the survivors on whole folds, and a
#: screening score never enters their means. Caches of under 5,000 training images are never sampled.
SCREEN_ROWS = 2000

Folds = Sequence[tuple[np.ndarray, np.ndarray]]

_BUDGET = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|min|h)?\s*")
_UNIT = {None: 1.0, "s": 1.0, "ms": 1e-3, "m": 60.0, "min": 60.0, "h": 3600.0}


class HeadFamilyLike(Protocol):
    """What the search needs of a head family (``featbank.heads`` ``HeadFamily``)."""

    name: str

    def default_grid(self, n_samples: int, n_features: int, n_classes: int) -> list[dict[str, Any]]: ...

    def cv_scores(self, X: np.ndarray, y: np.ndarray, folds: Folds, grid: list[dict[str, Any]], *,
                  preprocess: str = "standardize", device: str = "cpu") -> np.ndarray: ...

    def build(self, params: dict[str, Any], *, preprocess: str = "standardize", seed: int = 0) -> Any: ...

    def relative_cost(self, n_samples: int, n_features: int, n_grid: int) -> float: ...


def _kernel_cost(fam: HeadFamilyLike, n_samples: int, n_features: int) -> float | None:
    """The Gram matrix's part of a family's cost when it works from a shared one (its ``kernel_cost``),
    else ``None`` (the family shares nothing)."""
    f = getattr(fam, "kernel_cost", None)
    return float(f(n_samples, n_features)) if callable(f) else None


def parse_budget(text: str | float | int) -> float:
    """Seconds of a ``--budget`` value: ``90s``, ``2m``, ``1.5min``, ``1h``, ``500ms`` or a number of seconds.

    Raises:
        ConfigError: anything else, or a budget that is not positive.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        try:
            seconds = float(text)
        except OverflowError:  # an int beyond a float (10**400): not a duration either
            seconds = math.inf
            text = f"an integer of {int(text.bit_length() * math.log10(2)) + 1} digits"  # repr() may refuse it
    else:
        m = _BUDGET.fullmatch(str(text))
        if not m:
            raise ConfigError(f"--budget must be a duration like 90s, 2m or 1h; got {text!r}.")
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"--budget must be a positive duration like 90s, 2m or 1h; got {text!r}.")
    return seconds


def make_folds(y: np.ndarray, k: int, repeats: int, seed: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Repeated stratified K-fold over images: ``repeats`` lists of K ``(fit_rows, held_out_rows)``.

    Raises:
        ConfigError: K below 2, or a class with fewer images than K.
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"--cv must be an integer >= 2 (the number of folds); got {k!r}.")
    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min())
    if smallest < k:
        raise ConfigError(f"--cv {k} needs at least {k} training images in every class; the smallest class has "
                          f"{smallest}. Use --cv {max(2, smallest)} or fewer folds." if smallest >= 2 else
                          f"--cv needs at least 2 training images in every class; the smallest class has {smallest}.")
    out = []
    for r in range(repeats):
        skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed + r)
        out.append([(np.sort(a), np.sort(b)) for a, b in skf.split(np.zeros(len(y)), y)])
    return out


class AutoSearch:
    """Successive halving over candidates by repeated stratified K-fold CV, within a time budget.

    Args:
        candidates: the routes to score (their ``head`` names keys of ``families``).
        families: head family by name (``featbank.heads.HEAD_FAMILIES`` by default in ``fit``).
        cv: folds per repeat.
        repeats: at most this many repeats (rounds of the halving).
        budget_s: seconds the search may take (the CV scoring; the caller loads features and refits).
        seed: of the folds (repeat r shuffles with ``seed + r``).
        device: passed to the families (``cpu``, ``cuda``).
        clock: the time source (``time.perf_counter``); seconds as a float.
        kernel_bytes: bound of the :class:`~featbank.heads.FoldKernels` the families with a
            ``kernel_cost`` (the SVMs, ``knn``) share one Gram matrix per (features, preprocessing,
            fold) through; 0 shares nothing.
        screen_rows: round 1 scores on a stratified sample of this many of fold 1's fit rows (and at most
            this many of its held-out rows) when it has more (:data:`SCREEN_ROWS`); ``None``: whole
            folds. A lone candidate is never screened.

    Attributes (after :meth:`fit`):
        folds_: the folds of each repeat, over the rows (images) handed to ``fit``.
        screen_: round 1's sampled ``(fit_rows, held_out_rows)``, or ``None`` (round 1 is fold 1 whole).
        scored_: every candidate that was scored, in leaderboard order.
        skipped_: candidates never scored, with the reason (``budget``: their predicted seconds did
            not fit; ``clock``: stopped part-way) and ``estimate_s`` / ``predicted_s``.
        best_: the winner (``scored_[0]``).
        rounds_: per round, the candidates scored and their folds.
        calibration_: measured / estimated seconds per family.
        kernels_: how many fold Gram matrices were computed, reused and refused (too large).
    """

    def __init__(self, candidates: Sequence[Candidate], families: Mapping[str, HeadFamilyLike], *,
                 cv: int = DEFAULT_CV, repeats: int = DEFAULT_REPEATS, budget_s: float = 90.0, seed: int = 0,
                 device: str = "cpu", clock: Callable[[], float] = time.perf_counter, kernel_bytes: int | None = None,
                 screen_rows: int | None = SCREEN_ROWS):
        self.candidates = list(candidates)
        self.families = families
        self.cv, self.repeats, self.budget_s, self.seed, self.device = cv, repeats, budget_s, seed, device
        self.clock = clock
        self.kernel_bytes = kernel_bytes
        self.screen_rows = screen_rows

    def fit(self, data: Mapping[FeatureKey, np.ndarray], y: np.ndarray,
            blocks: Mapping[FeatureKey, Sequence[Block]] | None = None) -> AutoSearch:
        """Score the candidates on ``data`` (one matrix per feature key, one row per image) and labels ``y``.

        ``blocks`` (optional): each matrix's column blocks (:func:`~featbank.fitting.column_blocks`), so
        matrices that share columns share the Gram matrices of those columns on each fold.

        Raises:
            ConfigError: no candidate could be scored within the budget, or bad folds (see :func:`make_folds`).
        """
        from ..heads import FoldKernels

        # a fresh store per fit: nothing of an earlier fit's data (or of one that raised) is handed out
        self._kernels = FoldKernels() if self.kernel_bytes is None else FoldKernels(self.kernel_bytes)
        try:
            return self._fit(data, y, blocks or {})
        finally:
            self._kernels.clear()

    def _fit(self, data: Mapping[FeatureKey, np.ndarray], y: np.ndarray,
             blocks: Mapping[FeatureKey, Sequence[Block]]) -> AutoSearch:
        y = np.asarray(y)
        self.folds_ = make_folds(y, self.cv, self.repeats, self.seed)
        self.n_classes_ = int(y.max()) + 1
        self.screen_ = self._screen_fold(y)
        self._sampled = self.screen_ is not None
        self.rungs_ = _rungs(self.cv, self.repeats, self._sampled)
        clock = Clock(self.budget_s, self.clock)
        for key, key_blocks in blocks.items():
            if key in data:
                self._kernels.register(data[key], key_blocks)
        scored = [self._prepare(c, data[c.key]) for c in self.candidates]
        self.skipped_: list[dict[str, Any]] = []
        self._leaders: list[Scored] = []  # round 1's best so far, at most MAX_KEEP (see _try)
        self.rounds_: list[dict[str, Any]] = []
        alive = self._first_round(scored, data, y, clock)
        for r in range(1, len(self.rungs_)):
            keep = _keep(len(alive))
            if len(alive) <= 1 and r >= 2 + self._sampled:  # a lone candidate still completes its first K folds
                break
            alive = self._round(r, _ranked(alive, r, self.cv, self._sampled)[:keep], data, y, clock)
            if not alive:
                break
        # A round the budget cut short ranks no one above the rest: only complete rounds count.
        complete = next((i for i, r in enumerate(self.rounds_) if not r["complete"]), len(self.rounds_))
        self.scored_ = _ranked([s for s in scored if s.rounds > 0], max(1, complete), self.cv, self._sampled)
        if not self.scored_:
            raise ConfigError(
                f"--budget {self.budget_s:g}s is too short to score any candidate on {self.cv} folds (the cheapest "
                f"is estimated at {min(s.estimate for s in scored):.1f} s). Raise --budget."
            )
        self.best_ = self.scored_[0]
        self.kernels_ = self._kernels.stats()
        self.clock_cut_ = list(clock.cut_by_clock)
        self.calibration_ = clock.calibration()
        self.seconds_ = clock.elapsed
        return self

    def _screen_fold(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Round 1's fold when it is sampled (see :data:`SCREEN_ROWS`): a stratified sample of fold 1's fit
        rows and of its held-out rows, each at most ``screen_rows``; ``None`` when fold 1 has fewer than
        twice that many fit rows (a sample of more than half a fold saves too little to pay for the
        round it adds), or for a lone candidate (it is scored on whole folds anyway)."""
        fit, held = self.folds_[0][0]
        n = self.screen_rows
        if not n or len(self.candidates) < 2 or len(fit) < 2 * n:
            return None
        return stratified_sample(fit, y[fit], n, self.seed), stratified_sample(held, y[held], n, self.seed + 1)

    @property
    def _fold0(self) -> tuple[np.ndarray, np.ndarray]:
        """Round 1's fold: the sample when screening, else fold 1 of repeat 1."""
        return self.screen_ if self._sampled else self.folds_[0][0]

    def _round_folds(self, r: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The (fit, held-out) rows of each fold round ``r`` scores."""
        repeat, idx = self.rungs_[r]
        return [self._fold0] if r == 0 else [self.folds_[repeat][i] for i in idx]

    def _prepare(self, cand: Candidate, X: np.ndarray) -> Scored:
        fam = self.families[cand.head]
        n_fit = int(round(X.shape[0] * (self.cv - 1) / self.cv))
        # the grid must hold on every fold it is scored on, round 1's sample the smallest (knn's k <= rows / 2)
        grid = fam.default_grid(min(n_fit, len(self.screen_[0])) if self._sampled else n_fit, X.shape[1],
                                self.n_classes_)
        est = float(fam.relative_cost(n_fit, X.shape[1], len(grid))) * self.cv
        k = _kernel_cost(fam, n_fit, X.shape[1])
        scale = 1.0
        if self._sampled and est > 0:
            # one fold's cost at the sample's fit rows, with the grid of the whole fold it stands for
            scale = min(1.0, float(fam.relative_cost(len(self.screen_[0]), X.shape[1], len(grid))) * self.cv / est)
        return Scored(cand, grid, np.zeros((len(grid), 0)), estimate=est,
                      kernel_estimate=None if k is None else min(k * self.cv, est), screen_scale=scale)

    def _saved(self, s: Scored, X: np.ndarray, fold: tuple[np.ndarray, np.ndarray]) -> float:
        """The estimated seconds (over all K folds, as ``estimate``) that the Gram matrices already shared
        save ``s``: its whole kernel estimate when its fold is stored, the stored blocks' share of it else."""
        if s.kernel_estimate is None:
            return 0.0
        return s.kernel_estimate * self._kernels.stored_share(X, fold[0], fold[1], s.candidate.preprocess)

    def _saved_in_round(self, s: Scored, data: Mapping[FeatureKey, np.ndarray], r: int) -> float:
        """:meth:`_saved` summed over round ``r``'s folds."""
        return sum(self._saved(s, data[s.candidate.key], fold) for fold in self._round_folds(r))

    def _first_round(self, scored: list[Scored], data: Mapping[FeatureKey, np.ndarray], y: np.ndarray,
                     clock: Clock) -> list[Scored]:
        """Every candidate on one fold, in three passes, while its prediction fits (see :meth:`_try`).

        Pass 1 (breadth first): one candidate of every (feature set, family), its cheapest estimate,
        those of tier 0 before those of tier 1, the cheapest *predicted* first (renewed after each
        timing, and counting a Gram matrix it would share as already paid). Pass 2, the variants, *most
        promising first* by the scores so far (:class:`_Promise`, renewed after each one): the family
        with the best score first; within it, the other view handling (same preprocessing as the
        pass-1 candidate of its feature set and family) before the other preprocessings (the smaller
        change: normalisations of the same rows); then the (feature set, family) with the best score,
        a view handling that pair has not tried, the best of that pair with the same views (the rows it
        will see), then with the same preprocessing; then the cheapest estimate. Once a
        candidate of a family that shares Gram matrices is scored there, the other such candidates of
        its (features, preprocessing) come next (cheapest first), while the fold's Gram matrix is there
        to share. Pass 3: the candidates of a family that runs *when the budget allows* (its
        ``when_budget_allows``: the MLP, whose every setting and fold is a training run), after every
        other candidate was scored or skipped, the cheapest predicted first.
        """
        done: list[Scored] = []
        late = [i for i, s in enumerate(scored) if getattr(self.families[s.candidate.head], "when_budget_allows", False)]
        self._main_round(scored, set(late), done, data, y, clock)
        self._first_pass([(i, scored[i]) for i in late], done, data, y, clock)
        self.rounds_.append({"round": 0, "repeat": 0, "folds": [0], "n_candidates": len(done), "complete": True,
                             "n_folds": 1, "candidates": [_label(s.candidate) for s in done]})
        if self._sampled:
            fit, held = self.folds_[0][0]
            self.rounds_[-1]["sample"] = {"fit_rows": len(self.screen_[0]), "of_fit_rows": len(fit),
                                          "held_out_rows": len(self.screen_[1]), "of_held_out_rows": len(held)}
        return done

    def _main_round(self, scored: list[Scored], late: set[int], done: list[Scored],
                    data: Mapping[FeatureKey, np.ndarray], y: np.ndarray, clock: Clock) -> None:
        """Round 1's passes 1 and 2 over the candidates not in ``late`` (see :meth:`_first_round`)."""
        first: dict[tuple[str, str], int] = {}
        for i, s in enumerate(scored):
            if i in late:
                continue
            pair = (s.candidate.features, s.candidate.head)
            if pair not in first or s.estimate < scored[first[pair]].estimate:
                first[pair] = i
        lead = set(first.values())
        for tier in sorted({s.candidate.tier for s in scored}):
            self._first_pass([(i, scored[i]) for i in range(len(scored)) if i in lead and scored[i].candidate.tier == tier],
                             done, data, y, clock)
        todo = [scored[i] for i in range(len(scored)) if i not in lead and i not in late]
        follow: list[Scored] = []  # the rest of a Gram matrix's group, while the matrix is there
        promise = _Promise(done, scored)
        while todo or follow:
            if follow:
                s = follow.pop(0)
            else:
                s = min(todo, key=promise.key)
                todo.remove(s)
            if self._try(s, done, data, y, clock):
                promise.add(s)
                if s.group is not None:
                    follow += sorted((t for t in todo if t.group == s.group),
                                     key=lambda t: t.estimate - (t.kernel_estimate or 0))
                    todo = [t for t in todo if t.group != s.group]
            elif self._skip_rest(follow + todo, len(done), data, clock):
                break

    def _first_pass(self, todo: list[tuple[int, Scored]], done: list[Scored], data: Mapping[FeatureKey, np.ndarray],
                    y: np.ndarray, clock: Clock) -> None:
        """Pass 1 over ``todo`` (index, candidate): the cheapest *predicted* first, renewed after each one is
        scored (its family's measured speed; a Gram matrix it would share, already there).

        Within a family the order by estimate is fixed (one ratio scales them all), so only the head of
        each family's queue competes, and the candidates whose Gram matrix a scored one has made.
        """
        fold = self._fold0
        queues: dict[str, list[tuple[float, int, Scored]]] = {}
        for i, s in todo:
            queues.setdefault(s.candidate.head, []).append((s.estimate, i, s))
        for q in queues.values():
            q.sort(key=lambda e: (e[0], e[1]), reverse=True)  # pop() takes the cheapest
        ready: list[tuple[float, int, Scored]] = []  # their group's Gram matrix was made

        def predicted(e: tuple[float, int, Scored]) -> tuple[float, int]:
            s = e[2]
            return clock.predict(s, 1, self.cv, self._saved(s, data[s.candidate.key], fold), s.screen_scale), e[1]

        while ready or any(queues.values()):
            heads = [q[-1] for q in queues.values() if q]
            e = min(ready + heads, key=predicted)
            if any(t[1] == e[1] for t in ready):
                ready = [t for t in ready if t[1] != e[1]]
            else:
                queues[e[2].candidate.head].pop()
            s = e[2]
            if self._try(s, done, data, y, clock) and s.group is not None:
                for f, q in queues.items():
                    ready += [t for t in q if t[2].group == s.group]
                    queues[f] = [t for t in q if t[2].group != s.group]

    def _try(self, s: Scored, done: list[Scored], data: Mapping[FeatureKey, np.ndarray], y: np.ndarray,
             clock: Clock) -> bool:
        """Score ``s`` on round 1's fold when its prediction fits in the budget less the reserve the later
        rounds would need were it scored (:meth:`_reserve`, at most 1 - :data:`ROUND1_SHARE` of the
        budget); the first is always scored. Else it is skipped for budget. Returns whether it was scored."""
        X = data[s.candidate.key]
        predicted = clock.predict(s, 1, self.cv, self._saved(s, X, self._fold0), s.screen_scale)
        if done and not clock.fits(predicted + self._round1_reserve(len(done) + 1, clock), self.budget_s):
            self._skip(s, predicted)
            return False
        if self._score(s, 0, X, y, clock):
            done.append(s)
            # the leaders by score so far, the reserve's survivors, in the order _ranked promotes them on
            # one fold (ties: the cheaper estimate, then the first scored)
            at = next((i for i, t in enumerate(self._leaders) if (t.cv_mean, -t.estimate) < (s.cv_mean, -s.estimate)),
                      len(self._leaders))
            self._leaders = (self._leaders[:at] + [s] + self._leaders[at:])[:MAX_KEEP]
            return True
        return False

    def _skip(self, s: Scored, predicted: float) -> None:
        """``predicted``: its seconds on round 1's fold; recorded as seconds for K whole folds, as ``estimate_s``."""
        self.skipped_.append({**s.candidate.describe(), "reason": "budget", "estimate_s": round(s.estimate, 3),
                              "predicted_s": round(predicted / (s.screen_scale or 1.0) * self.cv, 3)})

    def _round1_reserve(self, n: int, clock: Clock) -> float:
        """:meth:`_reserve` after ``n`` candidates, at least :data:`LATER_SHARE` and at most
        1 - :data:`ROUND1_SHARE` of the budget."""
        reserve = max(self._reserve(self._leaders, n, clock), LATER_SHARE * self.budget_s)
        return min(reserve, (1.0 - ROUND1_SHARE) * self.budget_s)

    def _skip_rest(self, rest: Sequence[Scored], n_done: int, data: Mapping[FeatureKey, np.ndarray],
                   clock: Clock) -> bool:
        """Skip every one of ``rest`` for budget when not even the cheapest of them, counting its Gram matrix
        as shared, fits with the reserve (so a long list is not walked one by one once the time is spent).
        Each is recorded with its prediction as it stands (the Gram matrices already there taken off)."""
        if not rest:
            return False
        cheapest = min(clock.predict(t, 1, self.cv, t.kernel_estimate or 0.0, t.screen_scale) for t in rest)
        if clock.fits(cheapest + self._round1_reserve(n_done + 1, clock), self.budget_s):
            return False
        fold = self._fold0
        for t in rest:
            self._skip(t, clock.predict(t, 1, self.cv, self._saved(t, data[t.candidate.key], fold), t.screen_scale))
        return True

    def _reserve(self, leaders: Sequence[Scored], n: int, clock: Clock) -> float:
        """Seconds the later rounds would take after ``n`` candidates on round 1: the best :func:`_keep` of
        them (``leaders``, by their scores so far: those that would go on) on each later round's folds, each at its own
        measured speed, a Gram matrix paid once per fold by the survivors that share it. (A mean over every
        candidate done would let the cheap ones - a kNN on a shared matrix costs milliseconds - hide what
        the survivors cost.)"""
        top = list(leaders)
        total, alive = 0.0, n
        for r in range(1, len(self.rungs_)):
            if alive <= 1 and r >= 2 + self._sampled:
                break
            alive = _keep(alive)
            folds, paid = len(self.rungs_[r][1]), set()
            for s in top[:alive]:  # a Gram matrix is paid once per fold by its group
                shared = s.group in paid and s.kernel_estimate is not None
                total += clock.predict(s, folds, self.cv, s.kernel_estimate * folds if shared else 0.0)
                paid.add(s.group)
        return total

    def _affordable(self, r: int, todo: list[Scored], data: Mapping[FeatureKey, np.ndarray],
                    clock: Clock) -> list[Scored]:
        """The longest prefix of ``todo`` (best first) whose predicted seconds on round ``r``'s folds fit in
        what is left of the budget together (a Gram matrix counted once per fold for a group): empty
        when not even the first fits. A round then completes, and ranks those it scored on its folds,
        instead of being cut short after the first few and falling back to the round before (on ELPV
        4-class: 1 fold)."""
        n_folds = len(self.rungs_[r][1])
        total, paid, out = 0.0, set(), []
        for s in todo:
            saved = self._saved_in_round(s, data, r)
            if s.group in paid and s.kernel_estimate is not None:
                saved = s.kernel_estimate * n_folds
            total += clock.predict(s, n_folds, self.cv, saved)
            if not clock.fits(total, self.budget_s):
                break
            out.append(s)
            paid.add(s.group)
        return out

    def _round(self, r: int, promoted: list[Scored], data: Mapping[FeatureKey, np.ndarray], y: np.ndarray,
               clock: Clock) -> list[Scored]:
        """The promoted candidates (best first) on round ``r``'s folds: those the budget left affords
        together (:meth:`_affordable`), planned again once they are done, at the speed this round's
        folds ran (after a sampled round 1, the first whole folds correct its speeds); the rest are
        *trimmed*. When not even the first is predicted to fit, each is tried alone, and the round,
        cut short, ranks no one above the rest (:func:`_ranked`)."""
        done: list[Scored] = []
        repeat, idx = self.rungs_[r]
        n_folds = len(self.rungs_[r][1])
        todo = self._affordable(r, promoted, data, clock)
        alone = not todo
        todo = list(promoted) if alone else todo
        planned, i = len(todo), 0
        while i < len(todo):
            s = todo[i]
            i += 1
            scored = self._score_in_round(s, r, n_folds, data, y, clock, done)
            if not scored and i > planned:  # one the plan added stopped: it and the rest are trimmed
                todo = todo[:i - 1]
                break
            if scored and i == len(todo) and not alone:  # all it planned for: plan the rest at the speed measured
                todo += self._affordable(r, promoted[len(todo):], data, clock)
        self.rounds_.append({"round": r, "repeat": repeat, "folds": list(idx), "n_candidates": len(done),
                             "complete": len(done) == len(todo), "n_folds": _folds_through(r + 1, self.cv, self._sampled),
                             "candidates": [_label(t.candidate) for t in done],
                             # the promoted that the budget left could not afford (a prefix is kept, best first)
                             "trimmed": [_label(t.candidate) for t in promoted[len(todo):]]})
        return done

    def _score_in_round(self, s: Scored, r: int, n_folds: int, data: Mapping[FeatureKey, np.ndarray], y: np.ndarray,
                        clock: Clock, done: list[Scored]) -> bool:
        """Score ``s`` on round ``r``'s folds if its predicted seconds fit in the budget (appended to ``done``);
        else, or when the clock stops it part-way, it is named in ``cut_by_clock``. Returns whether scored."""
        name = _label(s.candidate)
        if not clock.fits(clock.predict(s, n_folds, self.cv, self._saved_in_round(s, data, r)), self.budget_s):
            clock.cut_by_clock.append(f"round {r + 1}: {name}")
            return False
        if self._score(s, r, data[s.candidate.key], y, clock):
            done.append(s)
            return True
        clock.cut_by_clock.append(f"round {r + 1}: {name} (stopped after a fold)")
        return False

    def _score(self, s: Scored, r: int, X: np.ndarray, y: np.ndarray, clock: Clock) -> bool:
        """Score ``s`` on the folds of round ``r``, one fold per call so the clock is checked between folds.

        Returns ``False`` (and keeps none of this round's folds) when the next fold, at the speed of
        this round's folds so far, would end past the budget.
        """
        fam = self.families[s.candidate.head]
        shared = {"kernels": self._kernels} if s.kernel_estimate is not None else {}
        screen = r == 0 and self._sampled
        scale = s.screen_scale if screen else 1.0
        cols, seconds, estimated = [], 0.0, 0.0
        for j, fold in enumerate(self._round_folds(r)):
            if j and not clock.fits(seconds / j, self.budget_s):
                clock.record(s.candidate.head, estimated, seconds, screen)
                return False
            estimated += (s.estimate - self._saved(s, X, fold)) / self.cv * scale
            t0 = clock.now()
            sc = np.asarray(fam.cv_scores(X, y, [fold], s.grid, preprocess=s.candidate.preprocess,
                                          device=self.device, **shared), dtype=np.float64)
            seconds += clock.now() - t0
            if sc.shape != (len(s.grid), 1) or not np.isfinite(sc).all():
                raise RuntimeError(f"internal error: family {fam.name!r} returned scores of shape {sc.shape}")
            cols.append(sc)
        # Round 2 after a sampled round 1 scores fold 1 whole: the sample's score is set aside (kept in
        # screen_scores), so every later mean is over whole folds (those of _folds_through).
        kept = s.scores[:, :0] if r == 1 and self._sampled else s.scores
        s.scores = np.concatenate([kept, *cols], axis=1)
        if screen:
            s.screen_scores = s.scores
        s.seconds += seconds
        s.rounds = r + 1
        s.est_done += estimated
        if screen:
            s.screen_seconds += seconds
            s.screen_est += estimated
        clock.record(s.candidate.head, estimated, seconds, screen)
        return True

    def leaderboard(self) -> list[dict[str, Any]]:
        """One dict per scored candidate: rank, features, layers, views, preprocessing, head, params, CV mean/std..."""
        return [s.to_row(i + 1) for i, s in enumerate(self.scored_)]

    def report(self) -> dict[str, Any]:
        """The search as stored in a bundle and printed by ``--json``: settings, leaderboard, skips, rounds."""
        n_scored = sum(s.n_fits for s in self.scored_)
        return {"cv": self.cv, "repeats": self.repeats, "seed": self.seed, "budget_s": self.budget_s,
                "seconds": round(self.seconds_, 3), "n_candidates": len(self.candidates),
                "n_scored": len(self.scored_), "n_fold_fits": n_scored, "leaderboard": self.leaderboard(),
                "skipped": self.skipped_, "rounds": self.rounds_, "cut_by_clock": self.clock_cut_,
                "calibration": self.calibration_, "kernels": self.kernels_}


def _rungs(k: int, repeats: int, sampled: bool = False) -> list[tuple[int, list[int]]]:
    """(repeat, fold indices) of each round: fold 1 of repeat 1, its other K - 1 folds, then a whole repeat
    each; ``sampled``: round 1 on a sample of fold 1 before them (:data:`SCREEN_ROWS`)."""
    return [(0, [0])] * (1 + sampled) + [(0, list(range(1, k)))] + [(r, list(range(k))) for r in range(1, repeats)]


def _keep(n: int) -> int:
    """How many of a round's ``n`` candidates go on: the best :data:`KEEP`, at least 1, at most :data:`MAX_KEEP`."""
    return max(1, min(MAX_KEEP, math.ceil(n * KEEP)))


class _Promise:
    """The order of round 1's pass 2 (see :meth:`AutoSearch._first_round`): :meth:`key`, smallest first,
    from the candidates scored so far (:meth:`add` each as it is scored). A family, pair or relative
    not yet scored counts as -1; a view handling the pair has not tried, as 2 (above any score)."""

    def __init__(self, done: Sequence[Scored], scored: Sequence[Scored]):
        self.index = {id(t): i for i, t in enumerate(scored)}
        self.fam: dict[str, float] = {}
        self.pair: dict[tuple[str, str], float] = {}
        self.first_pre: dict[tuple[str, str], str] = {}
        self.views: dict[tuple[str, str, str], float] = {}
        self.pre: dict[tuple[str, str, str], float] = {}
        for d in done:
            self.add(d)

    def add(self, d: Scored) -> None:
        c, m = d.candidate, d.cv_mean
        pair = (c.features, c.head)
        self.fam[c.head] = max(self.fam.get(c.head, -1.0), m)
        self.pair[pair] = max(self.pair.get(pair, -1.0), m)
        self.first_pre.setdefault(pair, c.preprocess)
        self.views[(*pair, c.views)] = max(self.views.get((*pair, c.views), -1.0), m)
        self.pre[(*pair, c.preprocess)] = max(self.pre.get((*pair, c.preprocess), -1.0), m)

    def key(self, s: Scored) -> tuple[float, int, float, float, float, float, int]:
        c = s.candidate
        pair = (c.features, c.head)
        other_pre = int(pair in self.first_pre and c.preprocess != self.first_pre[pair])
        return (-self.fam.get(c.head, -1.0), other_pre, -self.pair.get(pair, -1.0), -self.views.get((*pair, c.views), 2.0),
                -self.pre.get((*pair, c.preprocess), -1.0), s.estimate, self.index[id(s)])


def _ranked(scored: Sequence[Scored], complete: int, cv: int, sampled: bool = False) -> list[Scored]:
    """Later rounds first (up to the last complete one); within a round, the best CV mean on the folds
    every candidate of that round has, so a candidate scored on more folds is compared on the same
    folds, not on its longer mean; ties: the lower spread, then the cheaper estimate."""
    def key(s: Scored) -> tuple[float, ...]:
        tier = min(s.rounds, complete)
        # round 1 after a sampled fold: every candidate on the sample (a survivor's scores are now whole folds)
        common = (s.screen_scores if tier <= 1 and s.screen_scores is not None
                  else s.scores[:, :_folds_through(tier, cv, sampled)])
        return (-tier, -round(float(common.mean(axis=1).max()), 12), round(s.cv_std, 12), s.estimate)

    return sorted(scored, key=key)


def _folds_through(rounds: int, cv: int, sampled: bool = False) -> int:
    """Folds a candidate has by the end of round ``rounds`` (see :func:`_rungs`): 1, then K, then K more a
    round; ``sampled``: 1 (the sample), 1 (fold 1 whole, the sample set aside), then K, then K more a round."""
    rounds -= sampled
    return 1 if rounds <= 1 else cv * (rounds - 1)


def _label(c: Candidate) -> str:
    return f"{c.features}/{c.views}/{c.preprocess}/{c.head}"
