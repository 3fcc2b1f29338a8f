"""``fit``: the linear-probe protocol over a cache, K-shot runs, and the head bundle it writes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._files import check_bundle_dir
from ..errors import ConfigError
from ..features import DEFAULT_POOLING, VIEW_POOL, FeatureSpec
from ..splits import sample_shots, stratified_holdout
from ._bundle import FittedHead, HeadBundle, bundle_dir, save_head_bundle
from ._layers import FeatureTable, LayerChoice, mean_proba, resolve_layers, select_layers
from ._result import FitResult
from ._rows import CacheRows, opened_cache, split_rows
from ._select import HeadSpec, Selection, make_head, select_and_refit
from .config import FitConfig

if TYPE_CHECKING:
    from ..cache import FeatureCache

__all__ = ["FitResult", "FitConfig", "fit"]

#: (train, val, refit, eval) rows of one seed.
_SeedRows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


#: ``--layers auto`` scores candidate layers on at most this many training rows (a stratified
#: sample): a ridge fit costs min(rows, columns)^3, and the ranking of layers settles well before.
_SELECT_ROWS = 2000


def fit(
    cache: str | Path | FeatureCache | None = None,
    head: str | None = None,
    *,
    config: FitConfig | None = None,
    **options: Any,
) -> FitResult:
    """Fit a head on a feature cache with the linear-probe protocol and save a model bundle.

    Every option is a field of :class:`~featbank.fitting.FitConfig`: pass them as keywords, or a
    ``config`` (keywords then change it). The config is checked before the cache is opened and
    stored in the bundle's manifest (``fit_config``).

    Args:
        cache: a cache path or an open :class:`~featbank.cache.FeatureCache`; ``None`` = the most
            recent cache in the default folder.
        config: a :class:`~featbank.fitting.FitConfig` (default: built from the keywords).

    Options (keywords; the fields of :class:`~featbank.fitting.FitConfig`):
        head: ``"linear"`` (L-BFGS logistic regression with a C sweep), ``"mlp"``, or a
            scikit-learn classifier class name (``"SVC"``, ``"KNeighborsClassifier"``, ...).
        params: head parameters (``{"C": 0.1}`` fixes C and skips the sweep, for ``linear`` and
            for a scikit-learn head that has a ``C``, such as ``SVC``; MLP:
            ``hidden_sizes``, ``dropout``, ``lr``...; scikit-learn: its constructor arguments).
        standardize, l2_normalize: feature preprocessing, stored with the head.
        val_split: fraction of ``train`` held out (stratified, seeded) when the cache has no
            ``val`` split.
        class_weight: ``None`` or ``"balanced"``.
        shots, seeds: K images per class sampled per seed; metrics are reported as mean ± std
            over the seeds and the bundle holds the first seed's head.
        max_memory: bytes (or ``"2GB"``) the embeddings may take in memory; below the size of the
            rows used, ``linear``/``mlp`` stream chunks from the HDF5 file.
        device: ``auto``, ``cpu`` or ``cuda`` for the torch heads.
        out: the bundle folder, e.g. ``models/elpv-linear`` (an earlier bundle there is replaced).
        name: instead of ``out``, the bundle ``models/<name>``; neither: ``models/<cache>-<head>``.
        seed: seed of the validation split and the heads.
        save: write the bundle (``False``: just return the fitted head and metrics).
        grid: the coarse C grid of the sweep (default: :data:`COARSE_GRID`, 1e-6 .. 1e2, for
            ``linear``; :data:`SKLEARN_C_GRID`, 0.01 .. 100, for a scikit-learn head with a ``C``).
        refit: refit the selected head on train+val (default). ``False`` keeps the head fitted on
            train alone, so the validation images stay unseen: what a probe that starts
            ``featbank finetune --init-head`` (LP-FT) needs for a clean best-epoch choice.
        overwrite: replace an existing bundle at the output location (otherwise refused).
        layers: the cache's layers the head reads: ``"final"`` (the embedding, default), ``"auto"``
            (greedy forward selection on the validation split, see :mod:`featbank.fitting._layers`),
            ``"all"``, or names / ranges (``"stage5,stage6,final"``, ``"stage5-final"``).
        tta: test-time augmentation over the cache's augmented views: ``"auto"`` (used when it
            scores higher on the validation split), ``"on"`` or ``"off"``.
        train_views: train on every augmented view of the training images as well (when the
            cache has views). Views of one image never straddle the validation split.
        pool_views: describe each image by the mean and the max of every feature over its plain
            and augmented views (one row per image, twice the width; see
            :mod:`featbank.fitting._layers`). Needs a cache with ``hflip`` or ``dihedral`` views,
            which ``predict`` and ``export`` can make of a new image; replaces ``train_views``
            and TTA.
        auto: the probe autopilot: search feature sets, view handling, preprocessing and head
            families by repeated stratified K-fold CV on train+val within ``budget``, refit the
            winner on train+val, score it once on test (see :mod:`featbank.fitting._auto`).
            ``head``, ``params``, ``layers`` and ``pool_views`` are then chosen, not given.
        cv: K folds: with ``auto``, the folds of the search (default 5); alone, the head's
            hyperparameter sweep by K-fold CV on train+val instead of one validation split.
        budget: seconds (or ``"90s"``, ``"2m"``, ``"1h"``) the search may take, the layer selection
            and loading included (default 90 s; the refit comes on top).
        cv_repeats: at most this many repeats of the K folds (successive halving; default 3).
        families: the head families ``auto`` searches, by name (default:
            :data:`featbank.heads.HEAD_FAMILIES`).

    Returns:
        FitResult with the fitted estimator, chosen hyperparameter, sweep, metrics and bundle path.

    Raises:
        CacheError: missing/corrupt/non-featbank cache, no labels, NaN/inf embeddings.
        BundleError: the output is an existing bundle and ``overwrite`` is False.
        ConfigError: unknown head or parameter, a layer the cache does not hold, single class, a class with < 2 training images,
            sklearn heads with ``max_memory`` below the data size, both ``out`` and ``name``, an
            ``out`` that is a file or a folder of other files, an output folder that cannot be written.

    Example:
        >>> result = fit("runs/elpv.h5", head="linear", class_weight="balanced")
        >>> result.chosen, result.headline["top1"], result.path
    """

    t0 = time.perf_counter()
    config = _build_config(config, head, options)
    if config.searched:
        return _fit_searched(cache, config)
    spec = config.spec()
    with opened_cache(cache) as (cache_obj, cache_path):
        wanted, tta = _check_features(cache_obj, cache_path, config)
        table0 = FeatureTable(cache_obj, wanted or cache_obj.layers, config.train_views, config.pool_views)
        rows = _plan_rows(cache_obj, table0, spec, config)
        # Validate the head, its parameters and the output folder before any work is done.
        make_head(spec, config.seed)
        bundle_path = _bundle_target(cache_path, config) if config.save else None
        choice = None
        if wanted is None:
            budget = config.memory_bytes
            max_rows = None if budget is None else max(64, budget // (4 * 4 * table0.embed_dim))
            choice = select_layers(cache_obj, rows.train, rows.val, balanced=config.class_weight == "balanced",
                                   max_rows=min(_SELECT_ROWS, max_rows or _SELECT_ROWS), seed=config.seed)
            wanted = choice.layers
        table = FeatureTable(cache_obj, wanted, config.train_views, config.pool_views)
        plan = _Plan(spec, rows, config.shots, config.val_split, config.refit, table, tta, choice)
        data = cache_obj if table.plain_final else table
        source = CacheRows(data, plan.used_rows(), rows.chunk_rows)  # one read of every row fit needs
        source.check_finite()
        result, first = _fit_seeds(data, cache_path, source, plan, config.run_seeds, config.head)
        if config.save:
            result.path = _save_bundle(bundle_path, cache_obj, cache_path, (plan, first), result.metrics, config)
        result.seconds = time.perf_counter() - t0
        return result


def _build_config(config: FitConfig | None, head: str | None, options: dict[str, Any]) -> FitConfig:
    """The fit's config: ``config`` (or the defaults) changed by ``head`` and the keyword options, checked."""
    from dataclasses import fields, replace

    known = {f.name for f in fields(FitConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise TypeError(f"fit() got unexpected keyword argument(s) {', '.join(map(repr, bad))}; its options are the "
                        f"fields of FitConfig: {', '.join(sorted(known))}.")
    if head is not None:
        options["head"] = head
    return FitConfig(**options) if config is None else replace(config, **options)


def _check_features(cache: FeatureCache, cache_path: Path, config: FitConfig) -> tuple[tuple[str, ...] | None, str]:
    """The layers the head reads (``None``: chosen by ``--layers auto``) and the TTA mode, checked against the cache."""
    wanted = resolve_layers(config.layers, cache)
    tta = config.tta
    if tta == "on" and not cache.n_views:
        raise ConfigError(f"--tta on needs augmented views in the cache; {str(cache_path)!r} has none. Extract "
                          "with 'featbank extract DATA --views K --augment hflip|dihedral|crops', or use --tta auto.")
    if config.pool_views:
        tta = _check_pool_views(cache, cache_path, tta)
    return wanted, tta


def _fit_searched(cache: str | Path | FeatureCache | None, config: FitConfig) -> FitResult:
    """``fit --auto`` / ``fit --cv K``: the search of :mod:`featbank.fitting._auto`, then the bundle."""
    from ._auto import SearchSettings, bundle_name, fit_search
    from ._search import DEFAULT_BUDGET, DEFAULT_CV, DEFAULT_REPEATS

    spec = config.spec()
    device = "cpu" if spec.device == "auto" and not _cuda() else ("cuda" if spec.device == "auto" else spec.device)
    settings = SearchSettings(auto=bool(config.auto), cv=DEFAULT_CV if config.cv is None else config.cv,
                              repeats=DEFAULT_REPEATS if config.cv_repeats is None else int(config.cv_repeats),
                              budget=DEFAULT_BUDGET if config.budget is None else config.budget, seed=config.seed,
                              device=device, max_memory=config.max_memory, fit_config=config.to_dict())
    target = None
    if config.save:
        with opened_cache(cache) as (_, cache_path):
            default = bundle_name(cache_path, settings, spec.head)
        target = _bundle_target(cache_path, config, default_name=default)
    return fit_search(cache, spec, settings, layers=config.layers, pool_views=config.pool_views, save=config.save,
                      bundle_path=target, families=config.families)


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch is a dependency; be safe about broken CUDA set-ups
        return False


# --------------------------------------------------------------------------------------------
# The steps of fit
# --------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    """The cache's rows as fit uses them, and whether they stream from disk (``chunk_rows``)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_source: str
    chunk_rows: int | None

    @property
    def used(self) -> np.ndarray:
        return np.concatenate([self.train, self.val, self.test])


@dataclass
class _Plan:
    """What every seed of one fit shares."""

    spec: HeadSpec
    rows: _Rows
    shots: int | None
    val_split: float
    refit: bool
    table: FeatureTable | None = None
    tta: str = "auto"
    choice: LayerChoice | None = None

    @property
    def n_tta_views(self) -> int:
        """Augmented views TTA may average over (0: none, or ``--tta off``)."""
        return 0 if self.table is None or self.tta == "off" else self.table.n_tta_views

    def expand(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.table is None else self.table.expand(rows)

    def view_rows(self, rows: np.ndarray) -> list[np.ndarray]:
        return [self.table.view_rows(rows, k) for k in range(self.n_tta_views)]

    def used_rows(self) -> np.ndarray:
        """Every (virtual) row a fit reads: training images with their views, val/test with theirs for TTA."""
        r = self.rows
        held = np.concatenate([r.val, r.test])
        parts = [self.expand(np.concatenate([r.train, r.val])), r.test, *self.view_rows(held)]
        return np.unique(np.concatenate(parts))

    @property
    def eval_split(self) -> str:
        # K-shot runs without a test split evaluate on the labelled rows they did not sample.
        return "test" if len(self.rows.test) or self.shots is not None else "val"


@dataclass
class _SeedRun:
    """One seed's fitted head, and the rows and numbers it was selected and evaluated on."""

    seed: int
    selection: Selection
    train: np.ndarray
    val: np.ndarray
    eval_rows: np.ndarray
    eval_proba: np.ndarray | None
    eval_metrics: dict[str, Any]
    tta: bool = False
    tta_info: dict[str, Any] = field(default_factory=dict)

    @property
    def estimator(self) -> Any:
        return self.selection.estimator

    @property
    def chosen(self) -> dict[str, Any]:
        return self.selection.chosen

    @property
    def sweep(self) -> list[dict[str, Any]]:
        return self.selection.sweep


def _bundle_target(cache_path: Path, config: FitConfig, default_name: str | None = None) -> Path:
    """The bundle folder, checked writable (and replaceable with ``overwrite``) before any work."""
    from ..bundles import check_bundle_target

    shots = config.shots
    default = default_name or f"{cache_path.stem}-{config.head}" + (f"-{shots}shot" if shots else "")
    return check_bundle_dir(check_bundle_target(bundle_dir(config.out, config.name, default), config.overwrite))


def _fit_seeds(cache: FeatureCache | FeatureTable, cache_path: Path, source: CacheRows, plan: _Plan, seeds: list[int],
               head: str) -> tuple[FitResult, _SeedRun]:
    """Fit one head per seed; the result holds the first seed's head and the metrics over all seeds."""
    runs = [_fit_seed(cache, source, plan, s) for s in seeds]
    first = runs[0]
    result = FitResult(
        path=None, head=head, estimator=first.estimator, classes=list(cache.classes), chosen=first.chosen,
        sweep=first.sweep, metrics=_collect_metrics(runs, plan), eval_split=plan.eval_split, cache_path=cache_path,
        streaming=plan.rows.chunk_rows is not None, n_train=len(first.train), n_val=len(first.val),
        n_test=len(first.eval_rows) if plan.eval_split == "test" else 0, notes=_notes(plan),
    )
    return result, first


def _plan_rows(cache: FeatureCache, table: FeatureTable, spec: HeadSpec, config: FitConfig) -> _Rows:
    """Train/val/test rows, and the chunk size when they do not fit in ``budget`` bytes.

    ``table`` gives the width (every layer the fit may read) and how many views each image brings.
    """
    train, val, test, val_source = split_rows(cache, config.val_split, config.seed)
    budget = config.memory_bytes
    d = table.embed_dim
    n_rows = (len(train) + len(val) + len(test)) * table.n_slots
    need = n_rows * d * 4 * 4  # float32 rows, a split's copy, standardised copies
    chunk_rows = None
    if budget is not None and need > budget:
        chunk_rows = int(max(64, min(65536, budget // (d * 4 * 8))))
    if chunk_rows is not None and not spec.is_torch:
        raise ConfigError(
            f"--max-memory {config.max_memory} is below the {need / 1e9:.2f} GB the {spec.head} head needs in memory; only "
            "'linear' and 'mlp' stream from disk. Raise --max-memory or use --head linear / mlp."
        )
    return _Rows(train, val, test, val_source, chunk_rows)


def _seed_rows(cache: FeatureCache | FeatureTable, plan: _Plan, seed: int) -> _SeedRows:
    """(train, val, refit, eval) rows of one seed: the splits, or a K-shot sample of them."""
    rows = plan.rows
    if plan.shots is None:
        refit_rows = np.concatenate([rows.train, rows.val]) if plan.refit else rows.train
        return rows.train, rows.val, refit_rows, rows.test if len(rows.test) else rows.val
    return _shot_rows(cache, plan, seed)


def _shot_rows(cache: FeatureCache | FeatureTable, plan: _Plan, seed: int) -> _SeedRows:
    rows = plan.rows
    stratified = rows.val_source.startswith("strat")
    pool = np.concatenate([rows.train, rows.val]) if stratified else rows.train
    sample = sample_shots(pool, cache.labels[pool], plan.shots, seed, list(cache.classes))
    if stratified and plan.shots >= 2:
        # n_v of each class's K shots validate (the same count per class: K per class in, stratified).
        n_v = min(plan.shots - 1, max(1, int(round(plan.shots * plan.val_split))))
        tr, va = stratified_holdout(sample, cache.labels[sample], n_v * len(np.unique(cache.labels[sample])), seed)
    elif stratified:
        tr, va = sample, np.zeros(0, np.int64)
    else:
        tr, va = sample, rows.val
    ev = rows.test if len(rows.test) else np.setdiff1d(np.concatenate([rows.train, rows.val]),
                                                      np.concatenate([sample, va]))
    return tr, va, sample if plan.refit else tr, ev


def _fit_seed(cache: FeatureCache | FeatureTable, source: CacheRows, plan: _Plan, seed: int) -> _SeedRun:
    from ..heads import estimator_proba
    from ..report import compute_metrics

    tr, va, refit_rows, eval_rows = _seed_rows(cache, plan, seed)
    va = np.sort(va)
    sel = select_and_refit(cache, source, plan.spec, seed, (plan.expand(tr), va, plan.expand(refit_rows)),
                           val_views=plan.view_rows(va))
    use_tta, tta_info = _choose_tta(cache, plan, sel, va)
    ev_rows = np.sort(eval_rows)
    k = len(cache.classes)
    if plan.eval_split == "test":
        plain = estimator_proba(sel.estimator, source(ev_rows), k)
        views = [estimator_proba(sel.estimator, source(r), k) for r in plan.view_rows(ev_rows)]
    else:
        plain, views = sel.val_proba, sel.val_view_probas
    ev_proba = mean_proba([plain, *views]) if use_tta else plain
    ev_metrics = compute_metrics(cache.labels[ev_rows], ev_proba, cache.classes)
    if views:
        tta_info["eval_plain_top1"] = float(np.mean(plain.argmax(1) == cache.labels[ev_rows]))
        tta_info["eval_tta_top1"] = float(np.mean(mean_proba([plain, *views]).argmax(1) == cache.labels[ev_rows]))
    return _SeedRun(seed, sel, tr, va, ev_rows, ev_proba, ev_metrics, use_tta, tta_info)


def _check_pool_views(cache: FeatureCache | FeatureTable, cache_path: Path, tta: str) -> str:
    """``--pool-views`` needs views a new image can be given (hflip, dihedral) and leaves no TTA to choose."""
    from ..features import FIXED_VIEWS

    if not cache.n_views or cache.augment not in FIXED_VIEWS:
        held = f"{cache.n_views} {cache.augment} view(s)" if cache.n_views else "no augmented views"
        raise ConfigError(
            f"--pool-views needs hflip or dihedral views in the cache; {str(cache_path)!r} holds {held}. Extract with "
            "'featbank extract DATA --views 7 --augment dihedral' (or --views 1 --augment hflip). crops views depend "
            "on the image's path in the cache, so predict could not make them of a new image."
        )
    if tta == "on":
        raise ConfigError("--pool-views and --tta on exclude each other: a pooled row already holds every view of "
                          "its image. Drop --tta on.")
    return "off"


def _choose_tta(cache: FeatureCache | FeatureTable, plan: _Plan, sel: Selection, val: np.ndarray) -> tuple[bool, dict[str, Any]]:
    """Whether to average over the views at prediction time, decided on the validation split."""
    if not plan.n_tta_views or sel.val_proba is None:
        return plan.tta == "on", {"mode": plan.tta, "used": plan.tta == "on", "n_views": plan.n_tta_views}
    y = cache.labels[val]
    balanced = plan.spec.class_weight == "balanced"
    from ._layers import selection_score

    plain = selection_score(y, sel.val_proba.argmax(1), balanced)
    avg = selection_score(y, mean_proba([sel.val_proba, *sel.val_view_probas]).argmax(1), balanced)
    used = plan.tta == "on" or (plan.tta == "auto" and avg > plain)
    return used, {"mode": plan.tta, "used": used, "n_views": plan.n_tta_views, "val_plain": plain, "val_tta": avg}


def _collect_metrics(runs: list[_SeedRun], plan: _Plan) -> dict[str, Any]:
    """The first seed's val and eval metrics, K-shot mean ± std over the seeds, the choice and the sweep."""
    first = runs[0]
    metrics: dict[str, Any] = {"val": first.selection.val_metrics, plan.eval_split: first.eval_metrics}
    if plan.shots is not None:
        agg: dict[str, Any] = {"shots": int(plan.shots), "seeds": [r.seed for r in runs]}
        for key in ("top1", "balanced_accuracy", "macro_f1"):
            vals = np.array([r.eval_metrics.get(key, np.nan) for r in runs])
            agg[f"{key}_mean"], agg[f"{key}_std"] = float(np.mean(vals)), float(np.std(vals))
            agg[f"{key}_per_seed"] = vals.tolist()
        agg["chosen_per_seed"] = [r.chosen for r in runs]
        metrics["shots"] = agg
    metrics["chosen"] = first.chosen
    metrics["sweep"] = first.sweep
    metrics["features"] = _features_section(plan, first)
    return metrics


def _features_section(plan: _Plan, run: _SeedRun) -> dict[str, Any]:
    """What the head reads and how it predicts: layers (and why), views used in training, TTA."""
    table = plan.table
    spec = FeatureSpec(
        tuple(table.layers), dict(table.layer_dims), getattr(table.cache, "pooling", DEFAULT_POOLING), table.n_views,
        getattr(table.cache, "augment", "") or "", int(getattr(table.cache, "view_seed", 0) or 0),
        views_used=table.n_views if table.train_views else 0, tta=bool(run.tta), view_pool=VIEW_POOL if table.pooled else "",
    )
    out = {**spec.to_dict(), "tta_choice": run.tta_info}
    if plan.choice is not None:
        out["selection"] = plan.choice.to_dict()
    return out


def _notes(plan: _Plan) -> list[str]:
    if len(plan.rows.test):
        return []
    if plan.shots is not None:
        return ["the cache has no test split; K-shot metrics are on the labelled rows not sampled."]
    return ["the cache has no test split; metrics are on the validation split that selected the "
            "model (optimistic). Add a test/ split folder for an unbiased estimate."]


def _save_bundle(path: Path, cache: FeatureCache, cache_path: Path, fitted: tuple[_Plan, _SeedRun],
                 metrics: dict[str, Any], config: FitConfig) -> Path:
    """The bundle of the first seed's head, its config in the manifest."""
    plan, run = fitted
    seed = config.seed
    eval_split, rows = plan.eval_split, plan.rows
    headline = {k: v for k, v in run.eval_metrics.items() if not isinstance(v, (dict, list))}
    parts = HeadBundle(
        metrics={"eval_split": eval_split, eval_split: headline,
                 **({"shots": metrics["shots"]} if "shots" in metrics else {})},
        features=metrics["features"],
        training={
            "cache": str(Path(cache_path).resolve()), "val_source": rows.val_source, "seed": seed,
            "n_train": len(run.train), "n_val": len(run.val), "n_test": len(rows.test), "shots": plan.shots,
            "fitted_on": "train+val" if plan.refit else "train",
            "streaming": rows.chunk_rows is not None, "sweep": run.sweep,
        },
        sections={"validation": {"root": str(cache.root), "paths": [cache.paths[r] for r in np.sort(run.val)]},
                  "fit_config": config.to_dict()},
        report_metrics=metrics, eval_rows=run.eval_rows, eval_proba=run.eval_proba,
    )
    return save_head_bundle(path, cache, FittedHead(run.estimator, plan.spec, run.chosen), parts,
                            overwrite=config.overwrite)
