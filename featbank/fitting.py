"""Fit a head on a feature cache with a linear-probe protocol; evaluate and predict with bundles.

Protocol (Kornblith et al. 2019, CLIP linear probes): a validation split — the cache's own ``val``
split, else a deterministic stratified ``val_split`` of ``train`` — selects the hyperparameter
(for ``linear`` a log-spaced sweep of ``C``: a coarse grid, then a finer one around the best,
each fit warm-started from the nearest solution); the head is then refitted on train+val (unless
``refit=False``) and evaluated on the ``test`` split when there is one (otherwise the reported numbers are those of
the validation split, which selected the model and so are slightly optimistic).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import BundleError, CacheError, ConfigError

__all__ = ["FitResult", "EvalResult", "Prediction", "fit", "evaluate", "predict", "COARSE_GRID", "parse_memory"]

#: Coarse grid of C (inverse L2 strength, scikit-learn's convention) for the linear sweep.
COARSE_GRID = tuple(float(c) for c in np.logspace(-6, 2, 9))
_REFINE = (-0.5, 0.5)  # decades around the best coarse C
_SWEEP_MAX_ITER = 150
_SWEEP_TOL = 1e-3  # sweep fits only rank C on val (same choice as 5e-4 on the benchmarks; 2e-3 changed it)
_PATIENCE = 3


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

    @property
    def headline(self) -> dict[str, Any]:
        return self.metrics.get(self.eval_split, {})

    def summary(self) -> str:
        from .report import format_metrics

        chosen = ", ".join(f"{k}={_fmt(v)}" for k, v in self.chosen.items()) or "-"
        lines = [
            f"Head {self.head} on {self.cache_path.name}: {self.n_train} train / {self.n_val} val / {self.n_test} test"
            f"{' (streamed)' if self.streaming else ''}; chosen {chosen}; {self.seconds:.1f} s",
        ]
        lines += [f"Note: {n}" for n in self.notes]
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
        }


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def parse_memory(text: str | int | float | None) -> int | None:
    """``"2GB"``, ``"512MiB"``, ``"1e9"`` -> bytes."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?[bB]?)\s*", str(text))
    if not m:
        raise ConfigError(f"--max-memory must look like 2GB, 512MB or a number of bytes; got {text!r}.")
    try:
        value = float(m.group(1))
    except ValueError:
        raise ConfigError(f"--max-memory must look like 2GB, 512MB or a number of bytes; got {text!r}.") from None
    base = 1024 if m.group(3).lower().startswith("i") else 1000
    mult = {"": 1, "k": base, "m": base**2, "g": base**3, "t": base**4}[m.group(2).lower()]
    if value <= 0:
        raise ConfigError(f"--max-memory must be positive; got {text!r}.")
    return int(value * mult)


# --------------------------------------------------------------------------------------------
# Data: splits, checks
# --------------------------------------------------------------------------------------------


def _open(cache: Any) -> tuple[Any, Path]:
    from .cache import FeatureCache, find_latest_cache, open_cache

    if isinstance(cache, FeatureCache):
        return cache, cache.path
    path = Path(cache) if cache is not None else find_latest_cache()
    if path.is_dir():
        raise CacheError(f"{str(path)!r} is a folder; pass a cache file written by 'featbank extract' (an .h5 file).")
    return open_cache(path), path


def _check_finite(feats: Any, cache: Any, rows: np.ndarray) -> None:
    for pos, x in feats.chunks():
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            r = int(rows[pos[np.flatnonzero(bad)[0]]]) if rows is not None else int(pos[np.flatnonzero(bad)[0]])
            where = cache.paths[r] if cache is not None else f"row {r}"
            raise CacheError(
                f"The cache has NaN or infinite embeddings ({int(bad.sum())} in one chunk; first: {where!r}). "
                "Re-extract with 'featbank extract DATA --overwrite' (with --dtype float32 if it was float16)."
            )


def _split_rows(cache: Any, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(train rows, val rows, test rows, where val came from)."""
    labels = cache.labels
    labelled = labels >= 0
    if not labelled.any():
        raise CacheError(
            f"Cache {str(cache.path)!r} has no labels (it was extracted from a flat folder of images). "
            "Fitting needs an ImageFolder: DATA/<class>/<image>. Re-extract a labelled folder."
        )
    names = cache.split_names
    splits = cache.splits
    test = np.flatnonzero(labelled & (splits == names.index("test"))) if "test" in names else np.zeros(0, np.int64)
    val = np.flatnonzero(labelled & (splits == names.index("val"))) if "val" in names else np.zeros(0, np.int64)
    pool = np.setdiff1d(np.flatnonzero(labelled), np.concatenate([test, val]))
    _check_classes(cache, np.concatenate([pool, val]), "train+val")
    if len(val):
        return pool, val, test, "val split of the cache"
    if not 0.0 < val_split < 1.0:
        raise ConfigError(f"--val-split must be between 0 and 1 (exclusive); got {val_split!r}.")
    from sklearn.model_selection import train_test_split

    y = labels[pool]
    n_classes = len(np.unique(y))
    n_val = max(n_classes, int(round(val_split * len(pool))))
    if len(pool) - n_val < n_classes:
        raise ConfigError(
            f"Too few labelled training images ({len(pool)}) to hold out a stratified validation split of "
            f"{val_split} for {n_classes} classes. Add images, or use a cache with a val/ split folder."
        )
    tr, va = train_test_split(pool, test_size=n_val, random_state=seed, stratify=y)
    return np.sort(tr), np.sort(va), test, f"stratified {val_split:g} of train (seed {seed})"


def _check_classes(cache: Any, rows: np.ndarray, what: str) -> None:
    counts = np.bincount(cache.labels[rows], minlength=len(cache.classes))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        only = cache.classes[present[0]] if len(present) else "(none)"
        raise ConfigError(
            f"The {what} rows of {str(cache.path)!r} hold a single class ({only!r}); a classifier needs at "
            "least 2 classes. Add a folder per class: DATA/<class>/<image>."
        )
    few = [(cache.classes[i], int(counts[i])) for i in range(len(counts)) if 0 < counts[i] < 2]
    if few:
        listed = ", ".join(f"{c!r} ({n})" for c, n in few[:10])
        raise ConfigError(
            f"Each class needs at least 2 training images; these have fewer: {listed}. Add images or remove "
            "those class folders, then re-run 'featbank extract'."
        )


def _shot_rows(cache: Any, pool: np.ndarray, shots: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(cache.labels[pool]):
        rows = pool[cache.labels[pool] == c]
        if len(rows) < shots:
            raise ConfigError(
                f"--shots {shots} asks for {shots} training images per class, but class "
                f"{cache.classes[c]!r} has only {len(rows)}. Use a smaller --shots."
            )
        out.append(rng.choice(rows, size=shots, replace=False))
    return np.sort(np.concatenate(out))


# --------------------------------------------------------------------------------------------
# Head fitting
# --------------------------------------------------------------------------------------------


class _RowSource:
    """Embedding rows of a cache as :class:`Features`: read once into memory (``chunk_rows`` None),
    or streamed from the file in chunks."""

    def __init__(self, cache: Any, rows: np.ndarray, chunk_rows: int | None):
        self.cache, self.chunk_rows = cache, chunk_rows
        self.rows = np.sort(rows)
        self.X = cache.load_embeddings(self.rows) if chunk_rows is None else None

    def __call__(self, rows: np.ndarray) -> Any:
        from .train import Features

        rows = np.sort(rows)
        if self.X is None:
            return Features(cache=self.cache, rows=rows, chunk_rows=self.chunk_rows)
        if len(rows) == len(self.rows) and np.array_equal(rows, self.rows):
            return Features(self.X)
        pos = np.searchsorted(self.rows, rows)
        if len(rows) and (pos[-1] >= len(self.rows) or not np.array_equal(self.rows[pos], rows)):
            raise RuntimeError("internal error: rows requested that were not read")
        return Features(self.X[pos])

    def check_finite(self) -> None:
        from .train import Features

        feats = Features(self.X) if self.X is not None else Features(cache=self.cache, rows=self.rows,
                                                                      chunk_rows=self.chunk_rows)
        _check_finite(feats, self.cache, self.rows)


def _val_score(est: Any, Xv: Any, yv: np.ndarray, k: int, balanced: bool) -> tuple[float, float, np.ndarray]:
    proba = _proba_of(est, Xv, k)
    pred = proba.argmax(1)
    if balanced:
        from sklearn.metrics import balanced_accuracy_score

        score = float(balanced_accuracy_score(yv, pred))
    else:
        score = float(np.mean(pred == yv))
    loss = float(-np.mean(np.log(np.clip(proba[np.arange(len(yv)), yv], 1e-15, 1.0))))
    return score, loss, proba


def _proba_of(est: Any, X: Any, k: int) -> np.ndarray:
    """(N, k) probabilities; columns follow class indices, as Bundle.predict_proba does."""
    from .train import Features

    if isinstance(X, Features):
        parts = [_proba_of(est, x, k) for _, x in X.chunks()]
        return np.concatenate(parts) if parts else np.zeros((0, k))
    try:
        p = np.asarray(est.predict_proba(X), np.float64)
    except AttributeError:
        d = np.asarray(est.decision_function(X), np.float64)
        if d.ndim == 1:
            d = np.stack([np.zeros_like(d), d], 1)
        d -= d.max(1, keepdims=True)
        p = np.exp(d)
        p /= p.sum(1, keepdims=True)
    cols = np.asarray(est.classes_).astype(np.int64)
    if p.shape[1] == k and np.array_equal(cols, np.arange(k)):
        return p
    out = np.zeros((p.shape[0], k))
    out[:, cols] = p
    return out


def _sweep_linear(head: Any, Xtr: Any, ytr: np.ndarray, Xv: Any, yv: np.ndarray, k: int, balanced: bool,
                  grid: Sequence[float]) -> tuple[float, list[dict[str, Any]], dict[float, tuple]]:
    results: list[dict[str, Any]] = []
    sols: dict[float, tuple] = {}

    def run(C: float) -> None:
        if sols:  # warm start from the nearest solution in log C
            near = min(sols, key=lambda c: abs(np.log10(c) - np.log10(C)))
            head._w, head._b = sols[near][0].copy(), sols[near][1].copy()
        head.set_params(C=C, warm_start=bool(sols))
        head.fit(Xtr, ytr)
        sols[C] = (head._w.copy(), head._b.copy())
        score, loss, _ = _val_score(head, Xv, yv, k, balanced)
        results.append({"C": C, "val_score": score, "val_log_loss": loss, "n_iter": head.n_iter_})

    def best() -> float:
        return max(results, key=lambda r: (round(r["val_score"], 12), -r["val_log_loss"]))["C"]

    # Sweep fits only rank C values, so they stop early (loose tolerance); the refit is exact.
    final = head.get_params()
    head.set_params(max_iter=min(int(final["max_iter"]), _SWEEP_MAX_ITER), tol=max(float(final["tol"]), _SWEEP_TOL))
    worse = 0
    for C in sorted(grid):
        run(float(C))
        # Weak regularisation costs the most iterations, and the validation curve of an L2 sweep
        # has one peak: stop once a step past the best C is worse in both score and log loss, or
        # after _PATIENCE steps with a worse score.
        top = max(results, key=lambda r: (round(r["val_score"], 12), -r["val_log_loss"]))
        last = results[-1]
        if top["C"] < C and last["val_score"] < top["val_score"]:
            worse += 1
            if worse >= _PATIENCE or last["val_log_loss"] > top["val_log_loss"]:
                break
        else:
            worse = 0
    c0 = best()
    for d in _REFINE:
        C = float(c0 * 10**d)
        if not any(np.isclose(C, r["C"], rtol=1e-6) for r in results):
            run(C)
    head.set_params(max_iter=final["max_iter"], tol=final["tol"])
    return best(), sorted(results, key=lambda r: r["C"]), sols


def _make_head(head: str, params: dict[str, Any], *, standardize: bool, l2_normalize: bool, class_weight: Any,
               device: str, seed: int) -> tuple[Any, str]:
    from .heads import LinearHead, MLPHead, make_sklearn_head

    def build(cls: type, extra: dict[str, Any]) -> Any:
        valid = cls().get_params()
        bad = [k for k in params if k not in valid]
        if bad:
            raise ConfigError(
                f"The {head} head has no parameter {', '.join(map(repr, bad))}. Its parameters are: "
                f"{', '.join(sorted(valid))}."
            )
        kw = {"standardize": standardize, "l2_normalize": l2_normalize, "class_weight": class_weight,
              "device": device, **extra, **params}
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(f"Invalid parameters for the {head} head: {e}") from None

    if head == "linear":
        return build(LinearHead, {}), "linear"
    if head == "mlp":
        return build(MLPHead, {"random_state": seed}), "mlp"
    est = make_sklearn_head(head, params, standardize=standardize, l2_normalize=l2_normalize, random_state=seed)
    if class_weight is not None:
        if "class_weight" in est[-1].get_params():
            est.set_params(clf__class_weight=class_weight)
        else:
            import inspect

            if "sample_weight" not in inspect.signature(est[-1].fit).parameters:
                raise ConfigError(
                    f"{type(est[-1]).__name__} takes neither class_weight nor sample weights; drop --class-weight."
                )
    return est, "sklearn"


def _fit_sklearn(est: Any, X: np.ndarray, y: np.ndarray, class_weight: Any) -> Any:
    kw = {}
    if class_weight is not None and "class_weight" not in est[-1].get_params():
        from sklearn.utils.class_weight import compute_sample_weight

        kw["clf__sample_weight"] = compute_sample_weight(class_weight, y)
    try:
        return est.fit(X, y, **kw)
    except ValueError as e:
        raise ConfigError(f"{type(est[-1]).__name__} could not be fitted: {e}") from None


def _fit_once(
    cache: Any, train: np.ndarray, val: np.ndarray, refit_rows: np.ndarray, *, head: str, params: dict[str, Any],
    standardize: bool, l2_normalize: bool, class_weight: Any, device: str, seed: int, source: _RowSource,
    grid: Sequence[float] | None,
) -> tuple[Any, str, dict[str, Any], list[dict[str, Any]], dict[str, Any], np.ndarray | None]:
    """Select on val, refit on ``refit_rows``. Returns (estimator, type, chosen, sweep, val metrics, val proba)."""
    from .report import compute_metrics

    k = len(cache.classes)
    balanced = class_weight == "balanced"
    est, htype = _make_head(head, params, standardize=standardize, l2_normalize=l2_normalize,
                            class_weight=class_weight, device=device, seed=seed)
    Xtr, ytr = source(train), cache.labels[np.sort(train)]
    has_val = len(val) > 0
    Xv, yv = (source(val), cache.labels[np.sort(val)]) if has_val else (None, None)
    chosen: dict[str, Any] = {}
    sweep: list[dict[str, Any]] = []
    val_proba = None
    if htype == "linear":
        if has_val and "C" not in params:
            C, sweep, sols = _sweep_linear(est, Xtr, ytr, Xv, yv, k, balanced, grid or COARSE_GRID)
            est.set_params(C=C, warm_start=False)
            est._w, est._b = sols[C]
            est._set_coef()
        else:
            C = float(params.get("C", est.C))
            est.set_params(C=C).fit(Xtr, ytr)
        chosen = {"C": C}
        if has_val:
            val_proba = _proba_of(est, Xv, k)
    elif htype == "mlp":
        if has_val:
            est.fit(Xtr, ytr, eval_set=(Xv, yv))
            chosen = {"epochs": int(est.best_epoch_), "best_val_loss": float(est.best_val_loss_)}
            val_proba = _proba_of(est, Xv, k)
        else:
            est.fit(Xtr, ytr)
            chosen = {"epochs": int(est.n_epochs_)}
    else:
        _fit_sklearn(est, Xtr.to_array(), ytr, class_weight)
        if has_val:
            val_proba = _proba_of(est, Xv.X, k)
    val_metrics = compute_metrics(yv, val_proba, cache.classes) if val_proba is not None else {}

    # Refit on train+val with the chosen setting.
    if len(refit_rows) != len(train) or not np.array_equal(np.sort(refit_rows), np.sort(train)):
        Xall, yall = source(refit_rows), cache.labels[np.sort(refit_rows)]
        if htype == "linear":
            est.set_params(warm_start=True)
            est.fit(Xall, yall)
            est.set_params(warm_start=False)
        elif htype == "mlp":
            est.set_params(max_epochs=max(1, chosen["epochs"]), early_stopping=False)
            est.fit(Xall, yall)
        else:
            _fit_sklearn(est, Xall.to_array(), yall, class_weight)
    return est, htype, chosen, sweep, val_metrics, val_proba


def _identity(cache: Any) -> dict[str, Any]:
    md = cache.metadata
    transform = md.get("transform")
    return {"backbone": md.get("backbone"), "weights": md.get("weights"), "weights_sha256": md.get("weights_sha256"),
            "transform": transform, "embed_dim": int(cache.embed_dim)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


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
) -> FitResult:
    """Fit a head on a feature cache with the linear-probe protocol and save a model bundle.

    Args:
        cache: a cache path or an open :class:`~featbank.cache.FeatureCache`; ``None`` = the most
            recent cache in the default folder.
        head: ``"linear"`` (L-BFGS logistic regression with a C sweep), ``"mlp"``, or a
            scikit-learn classifier class name (``"SVC"``, ``"KNeighborsClassifier"``, ...).
        params: head parameters (``{"C": 0.1}`` fixes C and skips the sweep; MLP:
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
        out: root folder of bundles (default ``./models``); name: bundle name (default
            ``<cache>-<head>``); seed: seed of the validation split and the heads.
        save: write the bundle (``False``: just return the fitted head and metrics).
        grid: the coarse C grid of the sweep (default :data:`COARSE_GRID`, 1e-6 .. 1e2).
        refit: refit the selected head on train+val (default). ``False`` keeps the head fitted on
            train alone, so the validation images stay unseen: what a probe that starts
            ``featbank finetune --init-head`` (LP-FT) needs for a clean best-epoch choice.

    Returns:
        FitResult with the fitted estimator, chosen hyperparameter, sweep, metrics and bundle path.

    Raises:
        CacheError: missing/corrupt/non-featbank cache, no labels, NaN/inf embeddings.
        ConfigError: unknown head or parameter, single class, a class with < 2 training images,
            sklearn heads with ``max_memory`` below the data size.

    Example:
        >>> result = fit("runs/elpv.h5", head="linear", class_weight="balanced")
        >>> result.chosen, result.headline["top1"], result.path
    """
    from .bundle import save_bundle, serialize_sklearn
    from .report import compute_metrics, write_report_files

    t0 = time.perf_counter()
    params = dict(params or {})
    if class_weight not in (None, "balanced"):
        raise ConfigError(f"class_weight must be None or 'balanced'; got {class_weight!r}.")
    if shots is not None and (not isinstance(shots, (int, np.integer)) or shots < 1):
        raise ConfigError(f"--shots must be a positive integer; got {shots!r}.")
    seeds = [int(s) for s in seeds] or [seed]
    if shots is None and len(seeds) > 1:
        raise ConfigError("--seeds repeats K-shot sampling; give --shots K with it (e.g. --shots 10 --seeds 0,1,2).")
    budget = parse_memory(max_memory)
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda; got {device!r}.")
    cache_obj, cache_path = _open(cache)
    try:
        train, val, test, val_source = _split_rows(cache_obj, val_split, seed)
        d = cache_obj.embed_dim
        used = np.concatenate([train, val, test])
        need = len(used) * d * 4 * 4  # rows as float32, a split's copy, standardised copies while fitting
        chunk_rows = None
        if budget is not None and need > budget:
            chunk_rows = int(max(64, min(65536, budget // (d * 4 * 8))))
        is_torch = head in ("linear", "mlp")
        if chunk_rows is not None and not is_torch:
            raise ConfigError(
                f"--max-memory {max_memory} is below the {need / 1e9:.2f} GB the {head} head needs in memory; only "
                "'linear' and 'mlp' stream from disk. Raise --max-memory or use --head linear / mlp."
            )

        source = _RowSource(cache_obj, used, chunk_rows)  # one read of every row fit needs
        source.check_finite()
        # Validate the head and its parameters before any work is done.
        _make_head(head, params, standardize=standardize, l2_normalize=l2_normalize, class_weight=class_weight,
                   device=device, seed=seed)
        notes: list[str] = []
        k = len(cache_obj.classes)
        metrics: dict[str, Any] = {}
        eval_rows = test if len(test) else val
        eval_split = "test" if len(test) else "val"
        if not len(test):
            notes.append("the cache has no test split; metrics are on the validation split that selected the "
                         "model (optimistic). Add a test/ split folder for an unbiased estimate.")
        runs = []
        for s in (seeds if shots is not None else [seed]):
            if shots is None:
                tr, va, refit_rows = train, val, np.concatenate([train, val]) if refit else train
            else:
                sample = _shot_rows(cache_obj, np.concatenate([train, val]) if val_source.startswith("strat") else train,
                                    shots, s)
                if val_source.startswith("strat") and shots >= 2:
                    rng = np.random.default_rng(s)
                    n_v = max(1, int(round(shots * val_split)))
                    va = np.sort(np.concatenate([rng.choice(sample[cache_obj.labels[sample] == c], n_v, replace=False)
                                                 for c in np.unique(cache_obj.labels[sample])]))
                    tr = np.setdiff1d(sample, va)
                elif val_source.startswith("strat"):
                    tr, va = sample, np.zeros(0, np.int64)
                else:
                    tr, va = sample, val
                refit_rows = sample if refit else tr
                if not len(test):
                    eval_rows = np.setdiff1d(np.concatenate([train, val]), np.concatenate([sample, va]))
                    eval_split = "test"
            est, htype, chosen, sweep, val_metrics, val_proba = _fit_once(
                cache_obj, tr, va, refit_rows, head=head, params=params, standardize=standardize,
                l2_normalize=l2_normalize, class_weight=class_weight, device=device, seed=s, source=source,
                grid=grid,
            )
            ev_rows = np.sort(eval_rows)
            if eval_split == "test":
                ev_proba = _proba_of(est, source(ev_rows), k)
                ev_metrics = compute_metrics(cache_obj.labels[ev_rows], ev_proba, cache_obj.classes)
            else:
                ev_proba, ev_metrics = val_proba, val_metrics
            runs.append((s, est, htype, chosen, sweep, val_metrics, ev_metrics, ev_proba, ev_rows, tr, va))
        s0, est, htype, chosen, sweep, val_metrics, ev_metrics, ev_proba, ev_rows, tr, va = runs[0]
        metrics["val"] = val_metrics
        metrics[eval_split] = ev_metrics
        if shots is not None:
            notes = [n for n in notes if "no test split" not in n]
            if not len(test):
                notes.append("the cache has no test split; K-shot metrics are on the labelled rows not sampled.")
            agg: dict[str, Any] = {"shots": int(shots), "seeds": [r[0] for r in runs]}
            for key in ("top1", "balanced_accuracy", "macro_f1"):
                vals = np.array([r[6].get(key, np.nan) for r in runs])
                agg[f"{key}_mean"], agg[f"{key}_std"] = float(np.mean(vals)), float(np.std(vals))
                agg[f"{key}_per_seed"] = vals.tolist()
            agg["chosen_per_seed"] = [r[3] for r in runs]
            metrics["shots"] = agg
        metrics["chosen"] = chosen
        metrics["sweep"] = sweep
        result = FitResult(
            path=None, head=head, estimator=est, classes=list(cache_obj.classes), chosen=chosen, sweep=sweep,
            metrics=metrics, eval_split=eval_split, cache_path=cache_path, streaming=chunk_rows is not None,
            n_train=len(tr), n_val=len(va), n_test=len(ev_rows) if eval_split == "test" else 0, notes=notes,
        )
        if save:
            files: dict[str, bytes] = {}
            head_info: dict[str, Any] = {
                "type": htype, "estimator": type(est).__name__ if htype != "sklearn" else type(est[-1]).__name__,
                "preprocessing": {"standardize": bool(standardize), "l2_normalize": bool(l2_normalize)},
                "class_weight": class_weight, "chosen": chosen,
            }
            if htype in ("linear", "mlp"):
                from safetensors.numpy import save as st_save

                from .heads import head_state

                tensors, info = head_state(est)
                files["head.safetensors"] = st_save(tensors, metadata={"format": "featbank-head", "type": htype})
                head_info.update(info)
                head_info["file"] = "head.safetensors"
                if htype == "linear":
                    head_info["chosen_C"] = chosen.get("C")
            else:
                fname, data, trusted = serialize_sklearn(est)
                files[fname] = data
                head_info.update({"file": fname, "params": {k2: repr(v) for k2, v in est[-1].get_params().items()},
                                  "user_params": {k2: repr(v) for k2, v in params.items()},
                                  "pipeline": [n for n, _ in est.steps], "trusted_types": trusted})
            abs_paths = [str(cache_obj.abspath(cache_obj.paths[r])) for r in ev_rows]
            files.update(write_report_files(metrics, cache_obj.classes, abs_paths, cache_obj.labels[ev_rows], ev_proba))
            root = Path(out) if out is not None else Path("models")
            bname = _slug(name) if name else _slug(f"{cache_path.stem}-{head}" + (f"-{shots}shot" if shots else ""))
            headline = {k2: v for k2, v in ev_metrics.items() if not isinstance(v, (dict, list))}
            manifest = {
                "format": "featbank-bundle", "bundle_version": 1, "kind": "head",
                "classes": list(cache_obj.classes), "backbone": _identity(cache_obj),
                "cache_key": cache_obj.cache_key, "head": head_info,
                "metrics": {"eval_split": eval_split, eval_split: headline,
                            **({"shots": metrics["shots"]} if "shots" in metrics else {})},
                "validation": {"root": str(cache_obj.root), "paths": [cache_obj.paths[r] for r in np.sort(va)]},
                "training": {
                    "cache": str(Path(cache_path).resolve()), "val_source": val_source, "seed": seed,
                    "n_train": len(tr), "n_val": len(va), "n_test": len(test), "shots": shots,
                    "fitted_on": "train+val" if refit else "train",
                    "streaming": chunk_rows is not None, "sweep": sweep,
                },
            }
            result.path = save_bundle(root / bname, manifest, files)
        result.seconds = time.perf_counter() - t0
        return result
    finally:
        if cache is None or isinstance(cache, (str, Path)):
            cache_obj.close()


# --------------------------------------------------------------------------------------------
# evaluate / predict
# --------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Metrics of a bundle on (a split of) a cache."""

    model: Path
    cache_path: Path
    split: str
    metrics: dict[str, Any]

    def summary(self) -> str:
        from .report import format_metrics

        return format_metrics(self.metrics, f"{self.model} on {self.cache_path.name} ({self.split}):")

    def to_dict(self) -> dict[str, Any]:
        return {"model": str(self.model), "cache": str(self.cache_path), "split": self.split, "metrics": self.metrics}


def _check_bundle_cache(bundle: Any, cache: Any) -> None:
    if bundle.embed_dim is not None and bundle.embed_dim != cache.embed_dim:
        raise BundleError(
            f"Model {str(bundle.path)!r} expects {bundle.embed_dim}-d embeddings "
            f"({bundle.backbone.get('backbone')!r}) but cache {str(cache.path)!r} holds {cache.embed_dim}-d "
            f"embeddings ({cache.metadata.get('backbone')!r}). Extract the data with the model's backbone."
        )
    if bundle.cache_key and bundle.cache_key != cache.cache_key:
        raise BundleError(
            f"Model {str(bundle.path)!r} was fitted on embeddings with cache key {bundle.cache_key[:12]}... but "
            f"{str(cache.path)!r} has key {cache.cache_key[:12]}... (backbone {cache.metadata.get('backbone')!r}, "
            f"weights {cache.metadata.get('weights')!r}): its embeddings come from other settings. Extract with "
            f"'featbank extract DATA --backbone {bundle.backbone.get('backbone')}' and the same weights/dtype."
        )
    if bundle.cache_key is None and bundle.backbone.get("weights_sha256") not in (None, cache.metadata.get("weights_sha256")):
        raise BundleError(
            f"Model {str(bundle.path)!r} needs embeddings of its own fine-tuned backbone; cache "
            f"{str(cache.path)!r} was made with other weights. Extract with '--backbone {bundle.path}'."
        )


def evaluate(model: str | Path, cache: Any = None, *, split: str = "auto") -> EvalResult:
    """Metrics of a model bundle on a cache extracted with the same backbone settings.

    Args:
        model: a bundle folder written by ``fit`` (or ``finetune``).
        cache: cache path (default: the most recent one).
        split: ``auto`` (``test`` when the cache has one, else every labelled row), ``train``,
            ``val``, ``test`` or ``all``.

    Raises:
        BundleError: bad bundle, or its cache key / embedding dimension does not match the cache.
        CacheError: bad cache, no labels, NaN/inf embeddings.
    """
    from .bundle import load_bundle
    from .report import compute_metrics

    bundle = load_bundle(model)
    cache_obj, cache_path = _open(cache)
    try:
        _check_bundle_cache(bundle, cache_obj)
        labelled = cache_obj.labels >= 0
        if not labelled.any():
            raise CacheError(f"Cache {str(cache_path)!r} has no labels; evaluation needs labelled images. "
                             "Use 'featbank predict' for unlabelled images.")
        if list(cache_obj.classes) != list(bundle.classes):
            raise BundleError(
                f"The cache's classes {cache_obj.classes} differ from the model's {bundle.classes}; "
                "evaluate on a folder with the same class folders."
            )
        if split == "auto":
            split = "test" if cache_obj.has_split("test") else "all"
        if split == "all":
            rows = np.flatnonzero(labelled)
        elif split in ("train", "val", "test"):
            rows = np.flatnonzero(labelled & cache_obj.split_mask(split))
            if not len(rows):
                raise ConfigError(f"Cache {str(cache_path)!r} has no labelled rows in split {split!r}.")
        else:
            raise ConfigError(f"split must be auto, all, train, val or test; got {split!r}.")
        X = cache_obj.load_embeddings(rows)
        if not np.isfinite(X).all():
            raise CacheError(f"Cache {str(cache_path)!r} has NaN or infinite embeddings. Re-extract with --overwrite.")
        proba = bundle.predict_proba(X)
        return EvalResult(Path(model), cache_path, split, compute_metrics(cache_obj.labels[rows], proba, bundle.classes))
    finally:
        if cache is None or isinstance(cache, (str, Path)):
            cache_obj.close()


@dataclass
class Prediction:
    """One image's prediction: ``label`` and its ``probability``, the ``top_k`` list, or ``error``."""

    path: str
    label: str | None
    probability: float | None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "label": self.label, "probability": self.probability,
                "top_k": [{"label": l, "probability": p} for l, p in self.top_k], "error": self.error}


def _list_images(images: Sequence[str | Path]) -> list[Path]:
    from .images import IMAGE_EXTENSIONS

    out: list[Path] = []
    for item in images:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ConfigError(f"Folder {str(p)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{str(p)!r} does not exist. Pass image files or folders.")
    return out


def predict(model: str | Path, images: Sequence[str | Path], *, top_k: int = 1, device: str = "auto",
            batch_size: int = 32) -> list[Prediction]:
    """Classify new images with a bundle (runs its backbone) or an exported ``.onnx`` model.

    Unreadable images get a ``Prediction`` with ``error`` set; the others are still classified.

    Raises:
        BundleError: bad bundle; ConfigError: missing paths, bad ``top_k``.
    """
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1; got {top_k}.")
    paths = _list_images(images)
    if str(model).endswith(".onnx"):
        # The light runtime: numpy + Pillow + onnxruntime, preprocessing from the file's metadata.
        from .errors import DatasetError
        from .runtime import OnnxClassifier

        clf = OnnxClassifier(model)
        out: list[Prediction | None] = [None] * len(paths)
        pending: list[tuple[int, np.ndarray]] = []

        def run_onnx() -> None:
            if not pending:
                return
            probs, _ = clf.run(np.stack([a for _, a in pending]))
            for (i, _), p in zip(pending, probs):
                order = np.argsort(-p)[:top_k]
                tk = [(clf.classes[j], float(p[j])) for j in order]
                out[i] = Prediction(str(paths[i]), tk[0][0], tk[0][1], tk)
            pending.clear()

        for i, p in enumerate(paths):
            try:
                pending.append((i, clf.preprocess(p)))
            except DatasetError as e:
                out[i] = Prediction(str(p), None, None, [], str(e))
            if len(pending) >= batch_size:
                run_onnx()
        run_onnx()
        return [r for r in out if r is not None]

    import torch

    from .backbones import load_backbone
    from .bundle import load_bundle
    from .images import ImageReadError, load_and_preprocess
    from .train import resolve_device

    bundle = load_bundle(model)
    bundle.load_head()
    if bundle.kind == "finetuned":
        bb = load_backbone(str(bundle.path))
    else:
        ident = bundle.backbone
        bb = load_backbone(ident["backbone"], weights=ident.get("weights"))
        if ident.get("weights_sha256") and bb.weights_sha256 != ident["weights_sha256"]:
            raise BundleError(
                f"Model {str(bundle.path)!r} was fitted on embeddings of {ident['backbone']} weights with sha256 "
                f"{ident['weights_sha256'][:12]}..., but the weights on this machine have "
                f"{bb.weights_sha256[:12]}...; the predictions would be meaningless."
            )
    dev = resolve_device(device)
    net = bb.embedder().eval().to(dev)
    results: list[Prediction | None] = [None] * len(paths)
    batch: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        x = torch.from_numpy(np.stack([a for _, a in batch])).to(dev)
        with torch.inference_mode():
            emb = net(x).float().cpu().numpy()
        proba = bundle.predict_proba(emb)
        for (i, _), p in zip(batch, proba):
            order = np.argsort(-p)[:top_k]
            tk = [(bundle.classes[j], float(p[j])) for j in order]
            results[i] = Prediction(str(paths[i]), tk[0][0], tk[0][1], tk)
        batch.clear()

    for i, p in enumerate(paths):
        try:
            batch.append((i, load_and_preprocess(p, bb.preprocess)))
        except ImageReadError as e:
            results[i] = Prediction(str(p), None, None, [], str(e))
        if len(batch) >= batch_size:
            flush()
    flush()
    return [r for r in results if r is not None]
