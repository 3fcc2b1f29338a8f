"""``fit --auto`` and ``fit --cv K``: choose by cross-validation on train+val, refit, score test once.

The order of work keeps the test split out of every choice: the candidates' feature matrices are
built from the train+val images only and handed to :class:`~featbank.fitting._search.AutoSearch`;
the test rows are read only after the search has returned its winner, for the one final score.

``--auto`` candidates (the grid, documented in docs/commands/fit.md, "fit --auto"):

- feature sets: ``final``; the suffix spans ``last2``, ``last4``, ... (:func:`spans`; for the
  families that share a Gram matrix only: SVMs, kNN); ``auto`` (the greedy layer selection of
  ``--layers auto``, scored on a stratified 20% holdout of train+val, at most about 2,000 rows of it,
  never on test); ``all``
  layers. Duplicates are dropped (a cache with one layer has ``final`` alone).
- views: ``plain`` (the plain view of each image); ``pooled`` (``[mean | max]`` over the plain and
  augmented views, ``--pool-views``) when the cache holds hflip or dihedral views. Training on
  the views with TTA is left out: it multiplies the rows by K + 1 (8 with dihedral views), so a
  kernel SVM's cost by up to 64, and on the #15 benchmarks it never beat pooling.
- preprocessing: ``standardize``; ``l2`` (centre on the fit rows' mean, then L2-normalise rows);
  ``sqrt`` (the signed square root of every entry, then standardise: power normalisation), for the
  families that share a Gram matrix (:mod:`featbank.heads._preprocess`).
- heads: every family of ``featbank.heads.HEAD_FAMILIES`` with its ``default_grid``.

``--budget`` covers everything before the refit: the layer selection, loading the feature
matrices, then the CV search, which gets what is left (at least :data:`MIN_SEARCH_SHARE` of the
budget) and plans it by the measured speed of what it scores (see :mod:`featbank.fitting._search`).
It all runs with BLAS, OpenMP and torch limited to the cores other work leaves idle
(:func:`search_threads`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..features import DEFAULT_POOLING, VIEW_POOL, FeatureSpec
from ._layers import FeatureTable, LayerChoice, resolve_layers, select_layers
from ._rows import check_finite, opened_cache, split_rows
from ._scored import Candidate, FeatureKey
from ._search import DEFAULT_BUDGET, DEFAULT_CV, DEFAULT_REPEATS, AutoSearch, parse_budget
from ._select import HeadSpec
from .config import family_preprocess

if TYPE_CHECKING:
    from ..cache import FeatureCache
    from ..heads import Block, Estimator

__all__ = ["SearchSettings", "fit_search", "spans", "SPAN_NAMES", "feature_matrices", "column_blocks",
           "bootstrap_interval", "PREPROCESSING", "N_BOOTSTRAP", "MIN_SEARCH_SHARE",
           "idle_cores", "search_threads"]

PREPROCESSING = ("standardize", "l2", "sqrt")
#: Names :func:`spans` may give (last2 ... last512): feature sets for the Gram-sharing families only.
SPAN_NAMES = frozenset(f"last{2 ** i}" for i in range(1, 10))
#: Resamples of the test rows for the 95% interval of the test top-1.
N_BOOTSTRAP = 1000
#: Training rows the greedy layer selection of ``--auto`` scores on (``--layers auto``: 2000): a ridge
#: fit costs min(rows, columns)^3, it runs about (layers^2)/2 times, and it spends the search's budget.
_SELECT_ROWS = 1000
#: The share of ``--budget`` the CV search gets however long the layer selection and loading took
#: before it (they spend the same budget): so the whole stays within 120% of the budget as long as
#: they took no more than all of it.
MIN_SEARCH_SHARE = 0.2


@dataclass(frozen=True)
class SearchSettings:
    """What ``fit --auto`` / ``fit --cv K`` searches: the mode, folds, repeats, budget and seed."""

    auto: bool = False
    cv: int = DEFAULT_CV
    repeats: int = DEFAULT_REPEATS
    budget: str | float = DEFAULT_BUDGET
    seed: int = 0
    device: str = "cpu"
    max_memory: int | str | None = None  # --max-memory: the bound of :mod:`featbank.fitting._memory`
    fit_config: dict[str, Any] | None = field(default=None, compare=False)  # stored in the bundle's manifest


def bootstrap_interval(correct: np.ndarray, n: int = N_BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``correct`` (0/1 per test image), seeded."""
    correct = np.asarray(correct, np.float64)
    if len(correct) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), (n, len(correct)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def _feature_sets(cache: FeatureCache, layers: Any, train: np.ndarray, val: np.ndarray, auto: bool,
                  seed: int) -> tuple[dict[str, tuple[str, ...]], LayerChoice | None]:
    """``{name: layers}`` to try, and the greedy selection when one was made (on train/val, never test;
    also when its layers are another set's, which then stands for it)."""
    held = tuple(getattr(cache, "layers", ("final",)) or ("final",))
    wanted = resolve_layers("auto" if auto else layers, cache)
    choice = None
    if wanted is None:
        # A sample only where it leaves rows of every class out (a holdout of 1000 of 1006 cannot).
        sample = _SELECT_ROWS if len(train) > _SELECT_ROWS + 2 * len(cache.classes) else None
        # at most about 2 x _SELECT_ROWS validation rows: bounded however many images (see _memory)
        choice = (select_layers(cache, train, val, max_rows=sample, max_val_rows=2 * _SELECT_ROWS, seed=seed)
                  if len(held) > 1 else LayerChoice(("final",), float("nan")))
        wanted = choice.layers
    if not auto:
        name = "auto" if layers == "auto" else ",".join(wanted)
        return {name: wanted}, choice
    sets: dict[str, tuple[str, ...]] = {}
    for name, ls in (("final", ("final",)), *spans(held).items(), ("auto", wanted), ("all", held)):
        if ls not in sets.values():
            sets[name] = ls
    return sets, choice


def spans(layers: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The suffix spans ``--auto`` adds: ``last<k>``, the last k layers (network order), for k = 2, 4, 8, ...
    while k is at most half the layers (10 layers: last2, last4; ``final`` is k = 1 and ``all`` the whole)."""
    layers = tuple(layers)
    out, k = {}, 2
    while k <= len(layers) // 2:
        out[f"last{k}"] = layers[-k:]
        k *= 2
    return out


def _view_modes(cache: FeatureCache, auto: bool, pool_views: bool) -> list[str]:
    from ..features import FIXED_VIEWS

    poolable = bool(getattr(cache, "n_views", 0)) and getattr(cache, "augment", "") in FIXED_VIEWS
    if auto:
        return ["plain", "pooled"] if poolable else ["plain"]
    return ["pooled" if pool_views else "plain"]


def _candidates(sets: Mapping[str, tuple[str, ...]], views: Sequence[str], route: _Route) -> list[Candidate]:
    """Every feature set x views x preprocessing x head, less the preprocessings a family does not offer
    and less the suffix spans (:func:`spans`) for a family that does not share Gram matrices (whose cost
    grows with the width per setting: the linear head, the MLP)."""
    def offers(head: str, pre: str, name: str) -> bool:
        fam = route.families[head]
        if name in SPAN_NAMES and not callable(getattr(fam, "kernel_cost", None)):
            return False
        return pre in getattr(fam, "preprocesses", (pre,))

    return [Candidate(name, ls, v, p, h, tier=int(name in SPAN_NAMES)) for name, ls in sets.items() for v in views
            for p in route.preprocess for h in route.heads if offers(h, p, name)]


def feature_matrices(cache: FeatureCache, keys: Sequence[FeatureKey], rows: np.ndarray) -> dict[FeatureKey, np.ndarray]:
    """The feature matrix of each key for ``rows`` (sorted images), as ``FeatureTable`` makes it for predict.

    Every layer any key needs is read once per view (not once per key); a key's columns are then
    sliced out, pooled ones as ``[mean | max]`` of its own columns, the layout of a pooled table.
    """
    from ._layers import pool_views

    keys = list(dict.fromkeys(keys))
    table = _union_table(cache, keys)
    plain = table.load_embeddings(rows)
    _check_finite(plain, cache, rows)
    pooled = None
    if any(v == "pooled" for _, v in keys):
        views = (plain if v is None else cache.load_features(rows, table.layers, v, np.float32)
                 for v in [None, *range(table.n_views)])
        pooled = pool_views(views)
        _check_finite(pooled, cache, rows)
    out = {}
    d = plain.shape[1]
    for layers, views in keys:
        idx = _columns(table, layers)
        out[(layers, views)] = plain[:, idx] if views == "plain" else pooled[:, np.concatenate([idx, idx + d])]
    return out


def column_blocks(cache: FeatureCache, keys: Sequence[FeatureKey]) -> dict[FeatureKey, list[Block]]:
    """Each key's matrix (as :func:`feature_matrices` lays it out) as column blocks, one per layer, named
    ``(layer, views)``: the same numbers in every key's matrix, so their Gram matrices are shared
    (:class:`~featbank.heads.FoldKernels`). A pooled matrix's block of a layer is its ``mean`` columns
    and its ``max`` columns."""
    keys = list(dict.fromkeys(keys))
    dims = _union_table(cache, keys).layer_dims
    out = {}
    for layers, views in keys:
        starts = np.cumsum([0, *(dims[t] for t in layers)])
        width = int(starts[-1])
        blocks = []
        for t, a, b in zip(layers, starts[:-1], starts[1:], strict=True):
            cols = np.arange(a, b)
            blocks.append(((t, views), cols if views == "plain" else np.concatenate([cols, cols + width])))
        out[(layers, views)] = blocks
    return out


def _union_table(cache: FeatureCache, keys: Sequence[FeatureKey]) -> FeatureTable:
    """The plain table of every layer any of ``keys`` reads, in the cache's (network) order."""
    held = list(getattr(cache, "layers", ("final",)) or ("final",))
    return FeatureTable(cache, tuple(t for t in held if any(t in k[0] for k in keys)), train_views=False)


def _columns(table: FeatureTable, layers: Sequence[str]) -> np.ndarray:
    """Column indices of ``layers`` in ``table``'s rows (its layers concatenated in network order)."""
    starts = np.cumsum([0, *table.layer_dims.values()])
    pos = {t: (starts[i], starts[i + 1]) for i, t in enumerate(table.layers)}
    return np.concatenate([np.arange(*pos[t]) for t in layers])


def _check_finite(X: np.ndarray, cache: FeatureCache, rows: np.ndarray) -> None:
    from ..heads import Features

    check_finite(Features(X), cache, rows)


@dataclass
class _Route:
    """The search's inputs: which families, how each candidate's preprocessing maps onto a head spec."""

    families: Mapping[str, Any]
    heads: list[str]
    preprocess: list[str]
    spec: HeadSpec
    excluded: dict[str, str] = field(default_factory=dict)  # family -> why --auto leaves it out


def _route(spec: HeadSpec, settings: SearchSettings, families: Mapping[str, Any] | None) -> _Route:
    """The families and preprocessing: every family for ``--auto``; for ``--cv`` the one head (a family or a spec)."""
    from ._spec_family import SpecFamily, spec_preprocess

    if families is None:
        from .. import heads

        families = getattr(heads, "HEAD_FAMILIES", {})
    if settings.auto:
        if not families:
            raise ConfigError("--auto needs the head families of featbank.heads; this installation has none.")
        heads = [n for n, f in families.items() if getattr(f, "exportable", True)]
        excluded = {n: getattr(f, "reason", "") for n, f in families.items() if n not in heads}
        return _Route(families, heads, list(PREPROCESSING), spec, excluded)
    from ..heads import searched_as_spec

    if not searched_as_spec(spec.head, bool(spec.params), families=families):
        pre = family_preprocess(spec.head, spec.standardize, spec.l2_normalize, families[spec.head])
        return _Route(families, [spec.head], [pre], spec)
    fam = SpecFamily(spec, settings.seed)
    return _Route({spec.head: fam}, [spec.head], [spec_preprocess(spec)], spec)


def _check_savable(route: _Route) -> None:
    """A bundle's loader checks its head against the family it names (``featbank.heads.family_mismatch``):
    only a family of ``featbank.heads.HEAD_FAMILIES`` (or the one ``--head`` of ``--cv``) can be saved."""
    from .. import heads
    from ._spec_family import SpecFamily

    known = getattr(heads, "HEAD_FAMILIES", {})
    odd = [n for n in route.heads if not isinstance(route.families[n], SpecFamily) and route.families[n] is not known.get(n)]
    if odd:
        raise ConfigError(f"The head families {odd} are not those of featbank.heads.HEAD_FAMILIES: a bundle of them "
                          "could not be checked when it is loaded. Search them with save=False, or use the registry's.")


def _within_memory(cache: FeatureCache, cands: list[Candidate], route: _Route, settings: SearchSettings,
                   n_images: int) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates that fit the memory bound, and the families left out (for exports or for memory)."""
    from ._memory import plan_memory, search_memory_bound
    from ._rows import parse_memory

    bound = search_memory_bound(parse_memory(settings.max_memory))
    dims = _union_table(cache, [c.key for c in cands]).layer_dims if cands else {}
    kept, excluded = plan_memory(dims, cands, route.families, auto=settings.auto, n_images=n_images, bound=bound,
                                 given=settings.max_memory)
    return kept, {**route.excluded, **excluded}


def idle_cores() -> int:
    """The cores this process may use that other work leaves idle: the usable cores less those busy now
    (:func:`~featbank._machine.busy_cpus`, half a second of ``/proc/stat``; where that cannot be read,
    the 1-minute load average), rounded, at least 1, at most an explicit ``OMP_NUM_THREADS`` /
    ``OPENBLAS_NUM_THREADS``."""
    from .._machine import busy_cpus

    try:
        usable = set(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = set(range(os.cpu_count() or 1))
    busy = busy_cpus(usable)
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform
            busy = 0.0
    cores = len(usable)
    n = max(1, min(cores, int(cores - busy + 0.5)))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            n = min(n, int(os.environ[var]))
    return n


@contextmanager
def search_threads(n: int | None = None) -> Iterator[int]:
    """BLAS, OpenMP and torch threads limited to ``n`` (default :func:`idle_cores`) for the search and refit.

    Multithreaded BLAS and torch on cores that other work keeps busy wait on each other: on the
    shared 2-core machine at a load of ~6, one fold of each family ran 2-8x faster on one thread
    than on two (linear head 22.8 s -> 3.0 s, RBF SVM 2.6 s -> 1.2 s, the layer selection's
    eigendecompositions 62 s -> 9.6 s). On an idle machine every core is used.
    """
    import torch
    from threadpoolctl import threadpool_limits

    n = idle_cores() if n is None else max(1, int(n))
    before = torch.get_num_threads()
    with threadpool_limits(limits=n):
        torch.set_num_threads(n)
        try:
            yield n
        finally:
            torch.set_num_threads(before)


def fit_search(cache: FeatureCache, spec: HeadSpec, settings: SearchSettings, *, layers: Any = "final", pool_views: bool = False,
               families: Mapping[str, Any] | None = None, save: bool = True,
               bundle_path: Path | None = None) -> Any:
    """Search on train+val by CV, refit the winner on train+val, score it once on test, save the bundle.

    Returns:
        A :class:`~featbank.fitting.FitResult` whose ``search`` holds the report of
        :class:`AutoSearch` (settings, ``leaderboard``, skipped candidates, rounds) and whose
        ``metrics["test"]`` has ``top1_ci95``, the 95% bootstrap interval of the test top-1.

    Raises:
        ConfigError: a bad ``--cv`` or ``--budget``, a head family that does not exist, too few
            images per class for K folds, a budget too short to score anything.
        CacheError: the cache problems ``fit`` refuses.
    """
    t0 = time.perf_counter()
    budget_s = parse_budget(settings.budget)
    route = _route(spec, settings, families)
    if save:
        _check_savable(route)
    with opened_cache(cache) as (c, cache_path), search_threads() as n_threads:
        train, val, test, _ = split_rows(c, 0.2, settings.seed)
        pool = np.sort(np.concatenate([train, val]))
        sets, choice = _feature_sets(c, layers, train, val, settings.auto, settings.seed)
        cands = _candidates(sets, _view_modes(c, settings.auto, pool_views), route)
        cands, route.excluded = _within_memory(c, cands, route, settings, len(pool))
        t_load = time.perf_counter()
        data = feature_matrices(c, [k.key for k in cands], pool)
        load_s = time.perf_counter() - t_load
        prep_s = time.perf_counter() - t0  # the layer selection and loading spend the same budget
        search = AutoSearch(cands, route.families, cv=settings.cv, repeats=settings.repeats,
                            budget_s=max(budget_s - prep_s, budget_s * MIN_SEARCH_SHARE), seed=settings.seed,
                            device=settings.device).fit(data, c.labels[pool], column_blocks(c, list(data)))
        del data
        found = _refit_and_score(c, route, search, pool, test, settings.seed)
        found.update(cache_path=cache_path, classes=list(c.classes), choice=choice, pool=pool, test=test, cache=c,
                     t_start=t0)
        found["search"].update(load_s=round(load_s, 3), prep_s=round(prep_s, 3), total_budget_s=budget_s,
                               threads=n_threads)
        found["search"]["excluded"] = [{"head": h, "reason": why} for h, why in route.excluded.items()]
        found["search"]["feature_sets"] = {name: list(ls) for name, ls in sets.items()}
        found["search"]["layer_selection"] = choice is not None  # --auto, or --layers auto with --cv
        if settings.auto and choice is not None:
            found["search"]["auto_layers"] = list(choice.layers)  # the greedy selection, listed or not
            if choice.rounds:  # its scores on the holdout of train+val: the record a leak would change
                found["search"]["auto_selection"] = choice.to_dict()
        return search_result(found, spec, settings, save=save, bundle_path=bundle_path)


def _refit_and_score(cache: FeatureCache, route: _Route, search: AutoSearch, pool: np.ndarray, test: np.ndarray,
                     seed: int) -> dict[str, Any]:
    """The winner refitted on every train+val image, then (only now) the test rows read and scored once."""
    from ..heads import estimator_proba
    from ..report import compute_metrics

    best = search.best_
    cand = best.candidate
    table = FeatureTable(cache, cand.layers, train_views=False, pooled=cand.views == "pooled")
    t0 = time.perf_counter()
    est = route.families[cand.head].build(best.params, preprocess=cand.preprocess, seed=seed)
    est.fit(table.load_embeddings(pool), cache.labels[pool])
    refit_s = time.perf_counter() - t0
    metrics: dict[str, Any] = {}
    proba = None
    if len(test):
        proba = estimator_proba(est, table.load_embeddings(test), len(cache.classes))
        metrics = compute_metrics(cache.labels[test], proba, cache.classes)
        lo, hi = bootstrap_interval(proba.argmax(1) == cache.labels[test], seed=seed)
        metrics["top1_ci95"] = [lo, hi]
    report = search.report()
    report["refit_s"] = round(refit_s, 3)
    return {"search": report, "estimator": est, "htype": head_type(est), "winner": report["leaderboard"][0],
            "table": table, "test_metrics": metrics, "test_proba": proba, "refit_s": refit_s}


def head_type(est: Estimator) -> str:
    """The bundle's head type of a fitted estimator: the name of its kind (:mod:`featbank.heads.kinds`)."""
    from ..heads import kind_of

    return kind_of(est).name


def features_section(table: FeatureTable, choice: LayerChoice | None, winner: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``features`` of the winner: its layers, its views (pooled or plain), no TTA."""
    cache = table.cache
    spec = FeatureSpec(tuple(table.layers), dict(table.layer_dims), getattr(cache, "pooling", DEFAULT_POOLING),
                       table.n_views, getattr(cache, "augment", "") or "", int(getattr(cache, "view_seed", 0) or 0),
                       view_pool=VIEW_POOL if table.pooled else "")
    out = {**spec.to_dict(), "tta_choice": {"mode": "off", "used": False, "n_views": 0,
                                            "reason": "--auto and --cv fit and score rows without TTA"}}
    if choice is not None and winner["features"] == "auto" and choice.rounds:
        out["selection"] = choice.to_dict()
    return out


def bundle_name(cache_path: Path, settings: SearchSettings, head: str) -> str:
    return f"{cache_path.stem}-{'auto' if settings.auto else head + '-cv'}"


def search_result(found: dict[str, Any], spec: HeadSpec, settings: SearchSettings, *, save: bool,
                  bundle_path: Path | None) -> Any:
    """The ``FitResult`` of a search (and its bundle, written when ``save``)."""
    from ._result import FitResult

    winner, report, metrics = found["winner"], found["search"], found["test_metrics"]
    eval_split = "test" if metrics else "cv"
    cv_metrics = {"top1": winner["cv_mean"], "top1_std": winner["cv_std"], "n_folds": winner["n_folds"],
                  **({"sample": True} if winner.get("sample") else {})}
    all_metrics: dict[str, Any] = {"cv": cv_metrics, "chosen": winner["params"], "search": report,
                                   "features": features_section(found["table"], found["choice"], winner)}
    if metrics:
        all_metrics["test"] = metrics
    notes = [] if metrics else ["the cache has no test split; the headline is the CV score of the winner, which "
                                "chose it (optimistic). Add a test/ split folder for an unbiased estimate."]
    result = FitResult(
        path=None, head=winner["head"], estimator=found["estimator"], classes=found["classes"],
        chosen=dict(winner["params"]), sweep=[], metrics=all_metrics, eval_split=eval_split,
        cache_path=found["cache_path"], n_train=len(found["pool"]), n_val=0, n_test=len(found["test"]), notes=notes,
        search=report,
    )
    if save and bundle_path is not None:
        result.path = _save(found, spec, all_metrics, settings, bundle_path)
    result.seconds = time.perf_counter() - found["t_start"]
    return result


def _save(found: dict[str, Any], spec: HeadSpec, metrics: dict[str, Any], settings: SearchSettings,
          path: Path) -> Path:
    from dataclasses import replace

    from ._bundle import FittedHead, HeadBundle, save_head_bundle

    cache, winner = found["cache"], found["winner"]
    pre = winner["preprocessing"]
    head_spec = replace(spec, head=winner["head"], params=dict(winner["params"]),
                        standardize=pre in ("standardize", "sqrt"), l2_normalize=pre == "l2")
    head = FittedHead(found["estimator"], head_spec, dict(winner["params"]), {"family": winner["head"], "preprocess": pre})
    test = found["test"]
    headline = {k: v for k, v in (metrics.get("test") or metrics["cv"]).items()
                if not isinstance(v, (dict, list)) or k == "top1_ci95"}
    eval_split = "test" if "test" in metrics else "cv"
    parts = HeadBundle(
        metrics={"eval_split": eval_split, "cv": metrics["cv"], eval_split: headline}, features=metrics["features"],
        sections={"search": found["search"], **({"fit_config": settings.fit_config} if settings.fit_config else {})},
        training={"cache": str(Path(found["cache_path"]).resolve()), "val_source": f"{settings.cv}-fold CV",
                  "seed": settings.seed, "n_train": len(found["pool"]), "n_val": 0, "n_test": len(test),
                  "shots": None, "fitted_on": "train+val", "streaming": False, "sweep": []},
        report_metrics=metrics, eval_rows=test if len(test) else None, eval_proba=found["test_proba"],
    )
    return save_head_bundle(path, cache, head, parts, overwrite=True)
