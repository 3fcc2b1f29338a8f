"""``evaluate`` (metrics on a cache) and ``predict`` (new images) with model bundles or an exported ``.onnx`` model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError, CacheError, ConfigError
from ..runtime import Prediction
from ._rows import opened_cache

__all__ = ["EvalResult", "evaluate", "predict"]


@dataclass
class EvalResult:
    """Metrics of a bundle on (a split of) a cache."""

    model: Path
    cache_path: Path
    split: str
    metrics: dict[str, Any]
    tta: dict[str, Any] | None = None

    def summary(self) -> str:
        from ..report import format_metrics

        text = format_metrics(self.metrics, f"{self.model} on {self.cache_path.name} ({self.split}):")
        if self.tta:
            p, t = self.tta["plain"], self.tta["tta"]
            text += (f"\nWithout TTA: top-1 {p['top1']:.4f}, balanced acc {p['balanced_accuracy']:.4f}; with TTA over "
                     f"{self.tta['n_views']} view(s): top-1 {t['top1']:.4f}, balanced acc {t['balanced_accuracy']:.4f} "
                     f"(the model {'uses' if self.tta['used'] else 'does not use'} TTA; the table above is what it "
                     "predicts)")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"model": str(self.model), "cache": str(self.cache_path), "split": self.split, "metrics": self.metrics,
                "tta": self.tta}


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
    from ..bundle import load_bundle
    from ..report import compute_metrics

    bundle = load_bundle(model)
    bundle.load_head()  # a bundle that lies about its head is refused before the cache is read
    with opened_cache(cache) as (cache_obj, cache_path):
        bundle.check_cache(cache_obj)
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
        plain, views = _bundle_probas(bundle, cache_obj, cache_path, rows)
        y = cache_obj.labels[rows]
        feats = bundle.features
        proba = np.mean([plain, *views], axis=0) if feats.tta and views else plain
        tta = None
        if views:
            both = {"plain": plain, "tta": np.mean([plain, *views], axis=0)}
            tta = {"used": bool(feats.tta), "n_views": len(views),
                   **{k: {m: v for m, v in compute_metrics(y, p, bundle.classes).items() if not isinstance(v, (dict, list))}
                      for k, p in both.items()}}
        return EvalResult(Path(model), cache_path, split, compute_metrics(y, proba, bundle.classes), tta)


def _bundle_probas(bundle: Any, cache: Any, cache_path: Path, rows: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Probabilities of the plain view and of each augmented view the bundle averages over (TTA).

    A bundle with pooled views gets its pooled rows: (their probabilities, [])."""
    feats = bundle.features
    if bundle.info.features is None:
        X = cache.load_embeddings(rows)
        if not np.isfinite(X).all():
            raise CacheError(f"Cache {str(cache_path)!r} has NaN or infinite embeddings. Re-extract with --overwrite.")
        return bundle.predict_proba(X), []
    n = min(feats.n_views, cache.n_views) if cache.augment == feats.augment else 0
    if (feats.tta or feats.view_pool) and n < feats.n_views:
        how = "pools" if feats.view_pool else "averages over"
        raise BundleError(
            f"Model {str(bundle.path)!r} {how} {feats.n_views} {feats.augment} view(s) but cache "
            f"{str(cache_path)!r} holds {cache.n_views} {cache.augment or 'augmented'} view(s). Extract with "
            f"'--views {feats.n_views} --augment {feats.augment}' as for the model's cache."
        )
    if feats.view_pool:
        from ._layers import pool_views

        views = (cache.load_features(rows, feats.layers, view=v) for v in [None, *range(feats.n_views)])
        return bundle.predict_proba(pool_views(views)), []
    plain = bundle.predict_proba(cache.load_features(rows, feats.layers))
    return plain, [bundle.predict_proba(cache.load_features(rows, feats.layers, view=k)) for k in range(n)]


def _list_images(images: Sequence[str | Path]) -> list[Path]:
    from ..data import is_image_file
    from ..images import IMAGE_EXTENSIONS

    out: list[Path] = []
    for item in images:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if is_image_file(f))
            if not found:
                raise ConfigError(f"Folder {str(p)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
            out += found
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise ConfigError(f"{str(p)!r} is not a regular file (a FIFO, a device or a socket). Pass image files or folders.")
        else:
            raise ConfigError(f"{str(p)!r} does not exist. Pass image files or folders.")
    return out


def predict(model: str | Path, images: Sequence[str | Path], *, top_k: int = 1, device: str = "auto",
            batch_size: int = 32, weights_file: str | Path | None = None) -> list[Prediction]:
    """Classify new images with a bundle (runs its backbone) or an exported ``.onnx`` model.

    Unreadable images get a ``Prediction`` with ``error`` set; the others are still classified.
    ``weights_file``: the backbone weights file, for bundles fitted with ``--weights-file``.

    Raises:
        BundleError: bad bundle; ConfigError: missing paths, bad ``top_k``.
    """
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1; got {top_k}.")
    paths = _list_images(images)
    if str(model).endswith(".onnx"):
        # The light runtime: numpy + Pillow + onnxruntime, preprocessing from the file's metadata
        # (or inside the graph, for an export with --input raw).
        from ..runtime import OnnxClassifier

        clf = OnnxClassifier(model)
        return [_top_k(p, clf.classes, top_k, path) if not isinstance(p, str)
                else Prediction(None, None, None, path=str(path), error=p)
                for path, p in zip(paths, clf.proba_or_error(paths, batch_size), strict=True)]

    import torch

    from .._device import resolve_device
    from ..bundle import load_bundle
    from ..images import ImageReadError, load_and_preprocess

    bundle = load_bundle(model)
    bundle.load_head()
    bb = bundle.load_backbone(weights_file)
    from ..export._layers import feature_module, view_transforms

    dev = resolve_device(device)
    net = feature_module(bundle, bb).to(dev)  # the embedder, or the bundle's layers concatenated
    views = view_transforms(bundle, bb)  # TTA (hflip / dihedral), as evaluate and the exported graph do

    def proba_of(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(x).to(dev)
            probs = [bundle.predict_proba(net(v(t).contiguous() if v else t).float().cpu().numpy())
                     for v in [None, *views]]
        return np.mean(probs, axis=0)

    return _predict_in_batches(paths, lambda p: load_and_preprocess(p, bb.preprocess), proba_of, bundle.classes,
                               ImageReadError, batch_size, top_k)


def _top_k(p: np.ndarray, classes: list[str], top_k: int, path: Path) -> Prediction:
    order = np.argsort(-p)[:top_k]
    tk = [(classes[j], float(p[j])) for j in order]
    return Prediction(tk[0][0], int(order[0]), tk[0][1], path=str(path), top_k=tk)


def _predict_in_batches(paths: list[Path], preprocess: Any, proba_of: Any, classes: list[str], read_errors: Any,
                        batch_size: int, top_k: int) -> list[Prediction]:
    """Preprocess each path, run ``proba_of`` on full batches, keep the top-k; unreadable files
    become a Prediction with ``error`` set, in their place."""
    out: list[Prediction | None] = [None] * len(paths)
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        for (i, _), p in zip(pending, proba_of(np.stack([a for _, a in pending]))):
            out[i] = _top_k(p, classes, top_k, paths[i])
        pending.clear()

    for i, p in enumerate(paths):
        try:
            pending.append((i, preprocess(p)))
        except read_errors as e:
            out[i] = Prediction(None, None, None, path=str(p), error=str(e))
        if len(pending) >= batch_size:
            flush()
    flush()
    return [r for r in out if r is not None]
