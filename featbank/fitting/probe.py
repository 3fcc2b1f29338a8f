"""``fit``: the linear-probe protocol over a cache, K-shot runs, and the head bundle it writes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._files import check_bundle_dir, slugify
from ..errors import ConfigError
from ..splits import sample_shots, stratified_holdout
from ._rows import _open, _RowSource, _split_rows, parse_memory
from ._select import _fit_once, _make_head, _proba_of

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


def _identity(cache: Any) -> dict[str, Any]:
    md = cache.metadata
    transform = md.get("transform")
    return {"backbone": md.get("backbone"), "weights": md.get("weights"), "weights_sha256": md.get("weights_sha256"),
            "transform": transform, "embed_dim": int(cache.embed_dim)}


def _slug(text: str) -> str:
    return slugify(text, "model").lower()


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
        out: the bundle folder, e.g. ``models/elpv-linear`` (an earlier bundle there is replaced).
        name: instead of ``out``, the bundle ``models/<name>``; neither: ``models/<cache>-<head>``.
        seed: seed of the validation split and the heads.
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
            sklearn heads with ``max_memory`` below the data size, both ``out`` and ``name``, an
            ``out`` that is a file or a folder of other files, an output folder that cannot be written.

    Example:
        >>> result = fit("runs/elpv.h5", head="linear", class_weight="balanced")
        >>> result.chosen, result.headline["top1"], result.path
    """
    from ..bundle import save_bundle, serialize_sklearn
    from ..report import compute_metrics, write_report_files

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
    if save:
        bundle_dir(out, name, "model")  # --out with --name: refused before the cache is opened
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

        # Validate the head, its parameters and the output folder before any work is done.
        _make_head(head, params, standardize=standardize, l2_normalize=l2_normalize, class_weight=class_weight,
                   device=device, seed=seed)
        bundle_path = None
        if save:
            default = f"{cache_path.stem}-{head}" + (f"-{shots}shot" if shots else "")
            bundle_path = check_bundle_dir(bundle_dir(out, name, default))
        source = _RowSource(cache_obj, used, chunk_rows)  # one read of every row fit needs
        source.check_finite()
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
                pool = np.concatenate([train, val]) if val_source.startswith("strat") else train
                sample = sample_shots(pool, cache_obj.labels[pool], shots, s, list(cache_obj.classes))
                if val_source.startswith("strat") and shots >= 2:
                    # n_v of each class's K shots validate (the same count per class: K per class in, stratified).
                    n_v = min(shots - 1, max(1, int(round(shots * val_split))))
                    n_cls = len(np.unique(cache_obj.labels[sample]))
                    tr, va = stratified_holdout(sample, cache_obj.labels[sample], n_v * n_cls, s)
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

                from ..heads import head_state

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
            result.path = save_bundle(bundle_path, manifest, files)
        result.seconds = time.perf_counter() - t0
        return result
    finally:
        if cache is None or isinstance(cache, (str, Path)):
            cache_obj.close()
