"""``fit``: the linear-probe protocol over a cache, K-shot runs, and the head bundle it writes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._files import check_bundle_dir, slugify
from .._manifest import BackboneIdentity, build_manifest
from ..errors import ConfigError
from ..splits import sample_shots, stratified_holdout
from ._layers import TTA_CHOICES, VIEW_POOL, FeatureTable, LayerChoice, mean_proba, resolve_layers, select_layers
from ._rows import CacheRows, opened_cache, parse_memory, split_rows
from ._select import HeadSpec, Selection, make_head, select_and_refit

__all__ = ["FitResult", "MODELS_ROOT", "bundle_dir", "fit"]


@dataclass
class FitResult:
    """What one ``fit`` did.

    Attributes:
        path: the bundle folder (``None`` when ``save=False``).
        head: ``linear``, ``mlp`` or the scikit-learn class name.
        estimator: the fitted estimator (refitted on train+val), mapping embeddings -> probabilities.
        classes: class names.
        chosen: the selected hyperparameter, e.g. ``{"C": 0.01}`` or ``{"epochs": 14}``.
        sweep: one dict per tried value: C, val top-1, val log loss, L-BFGS iterations.
        metrics: ``{"val": {...}, "test": {...}}`` (and ``"shots"`` for K-shot runs).
        eval_split: which split the headline metrics come from (``test`` or ``val``).
        cache_path: the cache used; ``streaming``: whether rows were streamed from disk.
    """

    path: Path | None
    head: str
    estimator: Any
    classes: list[str]
    chosen: dict[str, Any]
    sweep: list[dict[str, Any]]
    metrics: dict[str, Any]
    eval_split: str
    cache_path: Path
    streaming: bool = False
    seconds: float = 0.0
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    notes: list[str] = field(default_factory=list)
    search: dict[str, Any] | None = None

    @property
    def headline(self) -> dict[str, Any]:
        return self.metrics.get(self.eval_split, {})

    def summary(self) -> str:
        from ..report import format_metrics

        chosen = ", ".join(f"{k}={_fmt(v)}" for k, v in self.chosen.items()) or "-"
        lines = [
            f"Head {self.head} on {self.cache_path.name}: {self.n_train} train / {self.n_val} val / {self.n_test} test"
            f"{' (streamed)' if self.streaming else ''}; chosen {chosen}; {self.seconds:.1f} s",
        ]
        lines += [f"Note: {n}" for n in self.notes]
        if self.search is not None:
            from ._report import search_lines

            lines += search_lines(self.search, self.headline)
        lines += _features_lines(self.metrics.get("features"))
        if "shots" in self.metrics:
            s = self.metrics["shots"]
            lines.append(
                f"{s['shots']}-shot over seeds {s['seeds']}: top-1 {s['top1_mean']:.4f} ± {s['top1_std']:.4f}, "
                f"balanced acc {s['balanced_accuracy_mean']:.4f} ± {s['balanced_accuracy_std']:.4f}, "
                f"macro F1 {s['macro_f1_mean']:.4f} ± {s['macro_f1_std']:.4f}"
            )
        if "val" in self.metrics and self.eval_split != "val":
            v = self.metrics["val"]
            if v.get("n_samples"):
                lines.append(f"Validation (model fit on train only): top-1 {v['top1']:.4f}, balanced acc "
                             f"{v['balanced_accuracy']:.4f} (n={v['n_samples']})")
        lines.append(format_metrics(self.headline, f"{self.eval_split.capitalize()} metrics:"))
        if self.path is not None:
            lines.append(f"Bundle: {self.path}")
            for f in ("metrics.json", "confusion_matrix.png", "per_class_recall.png", "misclassified.png"):
                if (self.path / f).exists():
                    lines.append(f"  {self.path / f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None, "head": self.head, "classes": self.classes,
            "chosen": self.chosen, "sweep": self.sweep, "metrics": self.metrics, "eval_split": self.eval_split,
            "cache": str(self.cache_path), "streaming": self.streaming, "seconds": self.seconds,
            "n_train": self.n_train, "n_val": self.n_val, "n_test": self.n_test, "notes": self.notes,
            **({"leaderboard": self.search["leaderboard"], "search": self.search} if self.search else {}),
        }


def _features_lines(feats: dict[str, Any] | None) -> list[str]:
    """The layers, views and TTA lines of a fit's summary (nothing for a plain fit)."""
    if not feats or (feats["layers"] == ["final"] and not feats["n_views"] and "selection" not in feats):
        return []
    dims = "+".join(str(feats["layer_dims"][t]) for t in feats["layers"])
    lines = [f"Layers {','.join(feats['layers'])} ({dims} = {sum(feats['layer_dims'].values())} features, "
             f"pooling {feats['pooling']})"]
    sel = feats.get("selection")
    if sel:
        from ._layers import LayerChoice

        lines.append(LayerChoice(tuple(sel["layers"]), sel["val_score"], sel["rounds"], sel["scorer"],
                                 sel["n_train_rows"]).summary())
    if feats.get("view_pool"):
        lines.append(f"Views: {feats['n_views']} {feats['augment']} view(s) per image, pooled ({feats['view_pool']} of each "
                     f"feature over the plain and augmented views: one row of {2 * sum(feats['layer_dims'].values())} "
                     "features per image, no TTA)")
    elif feats["n_views"]:
        t = feats["tta_choice"]
        why = (f"validation top-1 {t['val_plain']:.4f} plain vs {t['val_tta']:.4f} averaged"
               if "val_plain" in t else f"--tta {t['mode']}")
        lines.append(f"Views: {feats['n_views']} {feats['augment']} view(s) per image; trained on "
                     f"{'plain + views' if feats['views_used'] else 'the plain view only'}; TTA "
                     f"{'on' if feats['tta'] else 'off'} ({why})")
        if "eval_tta_top1" in t:
            lines.append(f"Evaluation top-1 without TTA {t['eval_plain_top1']:.4f}, with TTA {t['eval_tta_top1']:.4f}")
    return lines


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _identity(cache: Any) -> BackboneIdentity:
    md = cache.metadata
    return BackboneIdentity(backbone=md.get("backbone"), weights=md.get("weights"),
                            weights_sha256=md.get("weights_sha256"), transform=md.get("transform"),
                            embed_dim=int(cache.embed_dim))


def _slug(text: str) -> str:
    return slugify(text, "model").lower()


#: ``--layers auto`` scores candidate layers on at most this many training rows (a stratified
#: sample): a ridge fit costs min(rows, columns)^3, and the ranking of layers settles well before.
_SELECT_ROWS = 2000

#: Where bundles named by ``name`` (and unnamed ones) go.
MODELS_ROOT = Path("models")


def bundle_dir(out: str | Path | None, name: str | None, default_name: str) -> Path:
    """The bundle folder: ``out`` itself, else ``models/<name>`` (``name`` defaults to ``default_name``).

    Raises:
        ConfigError: both ``out`` and ``name`` are given (the old form, where ``--out`` was the
            root folder of bundles named by ``--name``).
    """
    if out is not None and name is not None:
        target = Path(out) / _slug(name)
        raise ConfigError(
            f"--out is the bundle folder itself and --name the name of a bundle under {MODELS_ROOT}/; give one of "
            f"them, e.g. --out {target} (or --name {_slug(name)} for {MODELS_ROOT / _slug(name)})."
        )
    if out is not None:
        return Path(out).expanduser()
    return MODELS_ROOT / _slug(name or default_name)


def fit(
    cache: Any = None,
    head: str = "linear",
    *,
    params: dict[str, Any] | None = None,
    standardize: bool = True,
    l2_normalize: bool = False,
    val_split: float = 0.2,
    class_weight: str | None = None,
    shots: int | None = None,
    seeds: Sequence[int] = (0,),
    max_memory: int | str | None = None,
    device: str = "auto",
    out: str | Path | None = None,
    name: str | None = None,
    seed: int = 0,
    save: bool = True,
    grid: Sequence[float] | None = None,
    refit: bool = True,
    overwrite: bool = False,
    layers: str | Sequence[str] | None = "final",
    tta: str | bool = "auto",
    train_views: bool = True,
    pool_views: bool = False,
    auto: bool = False,
    cv: int | None = None,
    budget: str | float | None = None,
    cv_repeats: int | None = None,
    families: Any = None,
) -> FitResult:
    """Fit a head on a feature cache with the linear-probe protocol and save a model bundle.

    Args:
        cache: a cache path or an open :class:`~featbank.cache.FeatureCache`; ``None`` = the most
            recent cache in the default folder.
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
    from ..bundle import save_bundle

    t0 = time.perf_counter()
    seeds = _check_options(class_weight, shots, seeds, seed, device)
    tta = _check_tta(tta)
    spec = HeadSpec(head, dict(params or {}), bool(standardize), bool(l2_normalize), class_weight, device, grid)
    _check_family_head(head, auto or cv is not None or budget is not None, class_weight, families)
    if auto or cv is not None or budget is not None:
        return _fit_searched(cache, spec, auto=auto, cv=cv, budget=budget, repeats=cv_repeats, seed=seed,
                             layers=layers, pool_views=pool_views, save=save, out=out, name=name, overwrite=overwrite,
                             shots=shots, train_views=train_views, tta=tta, families=families)
    budget = parse_memory(max_memory)
    if save:
        bundle_dir(out, name, "model")  # --out with --name: refused before the cache is opened
    with opened_cache(cache) as (cache_obj, cache_path):
        wanted = resolve_layers(layers, cache_obj)
        if tta == "on" and not cache_obj.n_views:
            raise ConfigError(f"--tta on needs augmented views in the cache; {str(cache_path)!r} has none. Extract "
                              "with 'featbank extract DATA --views K --augment hflip|dihedral|crops', or use --tta auto.")
        if pool_views:
            tta = _check_pool_views(cache_obj, cache_path, tta)
        table0 = FeatureTable(cache_obj, wanted or cache_obj.layers, train_views, pool_views)
        rows = _plan_rows(cache_obj, table0, spec, val_split, seed, budget, max_memory)
        # Validate the head, its parameters and the output folder before any work is done.
        make_head(spec, seed)
        bundle_path = _bundle_target(out, name, cache_path, head, shots, overwrite) if save else None
        choice = None
        if wanted is None:
            max_rows = None if budget is None else max(64, budget // (4 * 4 * table0.embed_dim))
            choice = select_layers(cache_obj, rows.train, rows.val, balanced=class_weight == "balanced",
                                   max_rows=min(_SELECT_ROWS, max_rows or _SELECT_ROWS), seed=seed)
            wanted = choice.layers
        table = FeatureTable(cache_obj, wanted, train_views, pool_views)
        plan = _Plan(spec, rows, shots, val_split, refit, table, tta, choice)
        data = cache_obj if table.plain_final else table
        source = CacheRows(data, plan.used_rows(), rows.chunk_rows)  # one read of every row fit needs
        source.check_finite()
        result, first = _fit_seeds(data, cache_path, source, plan, seeds if shots is not None else [seed], head)
        if save:
            manifest, files = _bundle_contents(cache_obj, cache_path, plan, first, result.metrics, seed)
            result.path = save_bundle(bundle_path, manifest, files, overwrite=overwrite)
        result.seconds = time.perf_counter() - t0
        return result


def _fit_searched(cache: Any, spec: HeadSpec, *, auto: bool, cv: int | None, budget: Any, repeats: int | None,
                  seed: int, layers: Any, pool_views: bool, save: bool, out: Any, name: str | None, overwrite: bool,
                  shots: int | None, train_views: bool, tta: str, families: Any = None) -> FitResult:
    """``fit --auto`` / ``fit --cv K``: the search of :mod:`featbank.fitting._auto`, then the bundle."""
    from ._auto import SearchSettings, bundle_name, fit_search
    from ._search import DEFAULT_BUDGET, DEFAULT_CV, DEFAULT_REPEATS

    if shots is not None:
        raise ConfigError("--shots samples a few images per class; it does not combine with --auto or --cv. Drop one.")
    if tta == "on":
        raise ConfigError("--auto and --cv score plain or pooled rows and use no TTA; drop --tta on.")
    settings = SearchSettings(auto=bool(auto), cv=DEFAULT_CV if cv is None else cv,
                              repeats=DEFAULT_REPEATS if repeats is None else int(repeats),
                              budget=DEFAULT_BUDGET if budget is None else budget, seed=seed,
                              device="cpu" if spec.device == "auto" and not _cuda() else
                              ("cuda" if spec.device == "auto" else spec.device))
    if settings.repeats < 1:
        raise ConfigError(f"cv_repeats must be at least 1; got {repeats!r}.")
    from ._search import parse_budget

    parse_budget(settings.budget)  # a bad budget exits before the cache is opened
    target = None
    if save:
        bundle_dir(out, name, "model")
        with opened_cache(cache) as (_, cache_path):
            default = bundle_name(cache_path, settings, spec.head)
        target = _bundle_target(out, name, cache_path, default, None, overwrite, default_name=default)
    return fit_search(cache, spec, settings, layers=layers, pool_views=pool_views, save=save, bundle_path=target,
                      families=families)


def _check_family_head(head: str, searched: bool, class_weight: Any, families: Any) -> None:
    """A head family (svm-rbf, knn...) is scored by K-fold CV, so it needs --cv; families fit unweighted."""
    from .. import heads

    families = families if families is not None else getattr(heads, "HEAD_FAMILIES", {})
    if head in families and head not in ("linear", "mlp") and not searched:
        raise ConfigError(f"--head {head} is a head family of --auto; its grid is chosen by K-fold CV: add --cv 5 "
                          f"(featbank fit CACHE --head {head} --cv 5).")
    if searched and class_weight is not None and (head in families or head == "linear"):
        raise ConfigError("--class-weight does not combine with --auto or a head family's --cv: the families fit and "
                          "score unweighted (top-1). Drop --class-weight, or use a scikit-learn head (--head SVC --cv 5).")


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


def _bundle_target(out: Any, name: str | None, cache_path: Path, head: str, shots: int | None, overwrite: bool,
                   default_name: str | None = None) -> Path:
    """The bundle folder, checked writable (and replaceable with ``overwrite``) before any work."""
    from ..bundle import check_bundle_target

    default = default_name or f"{cache_path.stem}-{head}" + (f"-{shots}shot" if shots else "")
    return check_bundle_dir(check_bundle_target(bundle_dir(out, name, default), overwrite))


def _fit_seeds(cache: Any, cache_path: Path, source: CacheRows, plan: _Plan, seeds: list[int],
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


def _check_options(class_weight: Any, shots: Any, seeds: Sequence[int], seed: int, device: str) -> list[int]:
    if class_weight not in (None, "balanced"):
        raise ConfigError(f"class_weight must be None or 'balanced'; got {class_weight!r}.")
    if shots is not None and (not isinstance(shots, (int, np.integer)) or shots < 1):
        raise ConfigError(f"--shots must be a positive integer; got {shots!r}.")
    seed_list = [int(s) for s in seeds] or [seed]
    if shots is None and len(seed_list) > 1:
        raise ConfigError("--seeds repeats K-shot sampling; give --shots K with it (e.g. --shots 10 --seeds 0,1,2).")
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda; got {device!r}.")
    return seed_list


def _plan_rows(cache: Any, table: FeatureTable, spec: HeadSpec, val_split: float, seed: int, budget: int | None,
               max_memory: Any) -> _Rows:
    """Train/val/test rows, and the chunk size when they do not fit in ``budget`` bytes.

    ``table`` gives the width (every layer the fit may read) and how many views each image brings.
    """
    train, val, test, val_source = split_rows(cache, val_split, seed)
    d = table.embed_dim
    n_rows = (len(train) + len(val) + len(test)) * table.n_slots
    need = n_rows * d * 4 * 4  # float32 rows, a split's copy, standardised copies
    chunk_rows = None
    if budget is not None and need > budget:
        chunk_rows = int(max(64, min(65536, budget // (d * 4 * 8))))
    if chunk_rows is not None and not spec.is_torch:
        raise ConfigError(
            f"--max-memory {max_memory} is below the {need / 1e9:.2f} GB the {spec.head} head needs in memory; only "
            "'linear' and 'mlp' stream from disk. Raise --max-memory or use --head linear / mlp."
        )
    return _Rows(train, val, test, val_source, chunk_rows)


def _seed_rows(cache: Any, plan: _Plan, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, refit, eval) rows of one seed: the splits, or a K-shot sample of them."""
    rows = plan.rows
    if plan.shots is None:
        refit_rows = np.concatenate([rows.train, rows.val]) if plan.refit else rows.train
        return rows.train, rows.val, refit_rows, rows.test if len(rows.test) else rows.val
    return _shot_rows(cache, plan, seed)


def _shot_rows(cache: Any, plan: _Plan, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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


def _fit_seed(cache: Any, source: CacheRows, plan: _Plan, seed: int) -> _SeedRun:
    from ..heads import estimator_proba
    from ..report import compute_metrics

    tr, va, refit_rows, eval_rows = _seed_rows(cache, plan, seed)
    va = np.sort(va)
    sel = select_and_refit(cache, source, plan.spec, seed, plan.expand(tr), va, plan.expand(refit_rows),
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


def _check_pool_views(cache: Any, cache_path: Path, tta: str) -> str:
    """``--pool-views`` needs views a new image can be given (hflip, dihedral) and leaves no TTA to choose."""
    from ..extraction._views import FIXED_VIEWS

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


def _check_tta(tta: Any) -> str:
    if isinstance(tta, bool):
        return "on" if tta else "off"
    if tta not in TTA_CHOICES:
        raise ConfigError(f"The 'tta' parameter must be one of {', '.join(TTA_CHOICES)}. Got {tta!r} instead.")
    return str(tta)


def _choose_tta(cache: Any, plan: _Plan, sel: Selection, val: np.ndarray) -> tuple[bool, dict[str, Any]]:
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
    out: dict[str, Any] = {
        "layers": list(table.layers), "layer_dims": dict(table.layer_dims),
        "pooling": getattr(table.cache, "pooling", "gap+2x2"),
        "views_used": table.n_views if table.train_views else 0, "augment": getattr(table.cache, "augment", ""),
        "view_seed": int(getattr(table.cache, "view_seed", 0) or 0), "n_views": table.n_views,
        "tta": bool(run.tta), "tta_choice": run.tta_info,
    }
    if table.pooled:
        out["view_pool"] = VIEW_POOL
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


def _head_files(run: _SeedRun, spec: HeadSpec) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest's ``head`` section and the head's weights file."""
    return head_files(run.estimator, run.selection.htype, run.chosen, spec)


def head_files(est: Any, htype: str, chosen: dict[str, Any], spec: HeadSpec) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest's ``head`` section and the weights file of a fitted head ``est`` of type ``htype``."""
    head_info: dict[str, Any] = {
        "type": htype, "estimator": type(est).__name__ if htype != "sklearn" else type(est[-1]).__name__,
        "preprocessing": {"standardize": spec.standardize, "l2_normalize": spec.l2_normalize},
        "class_weight": spec.class_weight, "chosen": chosen,
    }
    if htype == "sklearn":
        from ..bundle import serialize_sklearn

        fname, data, trusted = serialize_sklearn(est)
        head_info.update({"file": fname, "params": {k: repr(v) for k, v in est[-1].get_params().items()},
                          "user_params": {k: repr(v) for k, v in spec.params.items()},
                          "pipeline": [n for n, _ in est.steps], "trusted_types": trusted})
        return head_info, {fname: data}
    from safetensors.numpy import save as st_save

    from ..heads import head_state

    tensors, info = head_state(est)
    head_info.update(info)
    head_info["file"] = "head.safetensors"
    if htype == "linear":
        head_info["chosen_C"] = chosen.get("C")
    return head_info, {"head.safetensors": st_save(tensors, metadata={"format": "featbank-head", "type": htype})}


def _bundle_contents(cache: Any, cache_path: Path, plan: _Plan, run: _SeedRun, metrics: dict[str, Any],
                     seed: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and files of the bundle of the first seed's head."""
    from ..report import write_report_files

    head_info, files = _head_files(run, plan.spec)
    abs_paths = [str(cache.abspath(cache.paths[r])) for r in run.eval_rows]
    files.update(write_report_files(metrics, cache.classes, abs_paths, cache.labels[run.eval_rows], run.eval_proba))
    eval_split, rows = plan.eval_split, plan.rows
    headline = {k: v for k, v in run.eval_metrics.items() if not isinstance(v, (dict, list))}
    manifest = build_manifest(
        "head", list(cache.classes), _identity(cache), cache_key=cache.cache_key, head=head_info,
        metrics={"eval_split": eval_split, eval_split: headline,
                 **({"shots": metrics["shots"]} if "shots" in metrics else {})},
        validation={"root": str(cache.root), "paths": [cache.paths[r] for r in np.sort(run.val)]},
        features=metrics["features"],
        training={
            "cache": str(Path(cache_path).resolve()), "val_source": rows.val_source, "seed": seed,
            "n_train": len(run.train), "n_val": len(run.val), "n_test": len(rows.test), "shots": plan.shots,
            "fitted_on": "train+val" if plan.refit else "train",
            "streaming": rows.chunk_rows is not None, "sweep": run.sweep,
        },
    )
    return manifest, files
