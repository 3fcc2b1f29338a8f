"""The one inference path: ``predict`` (image files) and ``evaluate`` (a labelled cache) for bundles and ``.onnx`` files.

- :func:`predict_proba`: class probabilities of image files under a bundle (head bundles run their
  backbone and the layers, views and TTA their head reads; fine-tuned bundles run their network) or
  an exported ``.onnx`` model (:class:`featbank.runtime.OnnxClassifier`: numpy, Pillow,
  onnxruntime). An unusable image gets a NaN row and its reason; the others are still classified.
- :func:`predict`: the top-k classes of each image, from :func:`predict_proba`.
- :func:`evaluate`: metrics of a bundle on (a split of) a cache extracted with its backbone settings
  (the cached embeddings, with the bundle's views), or of an ``.onnx`` model on the cache's images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BundleError, CacheError, ConfigError
from .runtime import Prediction

if TYPE_CHECKING:
    from .bundles import Bundle
    from .cache import FeatureCache

__all__ = ["EvalResult", "Probabilities", "evaluate", "predict", "predict_proba"]


@dataclass
class EvalResult:
    """Metrics of a bundle on (a split of) a cache."""

    model: Path
    cache_path: Path
    split: str
    metrics: dict[str, Any]
    tta: dict[str, Any] | None = None

    def summary(self) -> str:
        from .report import format_metrics

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


def evaluate(model: str | Path, cache: str | Path | FeatureCache | None = None, *, split: str = "auto") -> EvalResult:
    """Metrics of a model bundle, or an exported ``.onnx`` model, on (a split of) a labelled cache.

    A bundle reads the cache's embeddings (with the views its head pools or averages over), so the
    cache must come from the same backbone settings. An ``.onnx`` model reads the cache's images
    from disk (the cache gives their paths, labels and splits), as ``predict`` would.

    Args:
        model: a bundle folder written by ``fit`` (or ``finetune``), or an ``.onnx`` file.
        cache: cache path (default: the most recent one).
        split: ``auto`` (``test`` when the cache has one, else every labelled row), ``train``,
            ``val``, ``test`` or ``all``.

    Raises:
        BundleError: bad bundle, its cache key / embedding dimension does not match the cache,
            other classes than the cache's.
        CacheError: bad cache, no labels, NaN/inf embeddings, an image an ``.onnx`` model cannot read.
    """
    from .report import compute_metrics

    if str(model).endswith(".onnx"):
        return _evaluate_onnx(Path(model), cache, split)
    from .bundles import load_bundle
    from .fitting import opened_cache

    bundle = load_bundle(model)
    bundle.load_head()  # a bundle that lies about its head is refused before the cache is read
    with opened_cache(cache) as (cache_obj, cache_path):
        bundle.check_cache(cache_obj)
        split, rows = _eval_rows(cache_obj, cache_path, bundle.classes, split)
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


def _eval_rows(cache: FeatureCache, cache_path: Path, classes: list[str], split: str) -> tuple[str, np.ndarray]:
    """The split's name (``auto`` resolved) and its labelled rows, refusing a cache of other classes."""
    labelled = cache.labels >= 0
    if not labelled.any():
        raise CacheError(f"Cache {str(cache_path)!r} has no labels; evaluation needs labelled images. "
                         "Use 'featbank predict' for unlabelled images.")
    if list(cache.classes) != list(classes):
        raise BundleError(
            f"The cache's classes {cache.classes} differ from the model's {classes}; "
            "evaluate on a folder with the same class folders."
        )
    if split == "auto":
        split = "test" if cache.has_split("test") else "all"
    if split == "all":
        return split, np.flatnonzero(labelled)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be auto, all, train, val or test; got {split!r}.")
    rows = np.flatnonzero(labelled & cache.split_mask(split))
    if not len(rows):
        raise ConfigError(f"Cache {str(cache_path)!r} has no labelled rows in split {split!r}.")
    return split, rows


def _evaluate_onnx(model: Path, cache: str | Path | FeatureCache | None, split: str) -> EvalResult:
    """An exported model on the cache's images, read from disk as ``predict`` reads them."""
    from .fitting import opened_cache
    from .report import compute_metrics
    from .runtime import OnnxClassifier

    clf = OnnxClassifier(model)
    with opened_cache(cache) as (cache_obj, cache_path):
        split, rows = _eval_rows(cache_obj, cache_path, clf.classes, split)
        paths = [Path(cache_obj.abspath(cache_obj.paths[r])) for r in rows]
        probs = _collect(paths, clf.proba_or_error(paths, 32), clf.classes)
        bad = [(p, e) for p, e in zip(paths, probs.errors, strict=True) if e is not None]
        if bad:
            raise CacheError(
                f"{len(bad)} of the {len(paths)} images of split {split!r} of cache {str(cache_path)!r} could not be "
                f"read for the ONNX model (first: {str(bad[0][0])!r}: {bad[0][1]}); evaluation needs every image. "
                "Restore them, or evaluate the bundle on the cache's embeddings."
            )
        metrics = compute_metrics(cache_obj.labels[rows], probs.proba, clf.classes)
        return EvalResult(model, cache_path, split, metrics)


def _bundle_probas(bundle: Bundle, cache: FeatureCache, cache_path: Path,
                   rows: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
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
        from .fitting import pool_views

        views = (cache.load_features(rows, feats.layers, view=v) for v in [None, *range(feats.n_views)])
        return bundle.predict_proba(pool_views(views)), []
    plain = bundle.predict_proba(cache.load_features(rows, feats.layers))
    return plain, [bundle.predict_proba(cache.load_features(rows, feats.layers, view=k)) for k in range(n)]


def _list_images(images: Sequence[str | Path]) -> list[Path]:
    from .images import IMAGE_EXTENSIONS
    from .sources import is_image_file

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


@dataclass
class Probabilities:
    """Class probabilities of image files under one model (output of :func:`predict_proba`).

    Attributes:
        paths: the image files, folders expanded, in order.
        proba: ``(n_images, n_classes)`` float64; the row of an image that could not be used is NaN.
        errors: per image, ``None`` or why it could not be used (unreadable, corrupt, too many pixels ...).
        classes: the column names of ``proba``.
    """

    paths: list[Path]
    proba: np.ndarray
    errors: list[str | None]
    classes: list[str]

    @property
    def ok(self) -> np.ndarray:
        """``(n_images,)`` bool: False where the image could not be used."""
        return np.array([e is None for e in self.errors], bool)

    def top_k(self, k: int = 1) -> list[Prediction]:
        """One :class:`~featbank.runtime.Prediction` per image: its ``k`` most probable classes, or its error."""
        return [Prediction(None, None, None, path=str(path), error=err) if err is not None
                else _top_k(p, self.classes, k, path) for path, p, err in zip(self.paths, self.proba, self.errors,
                                                                                strict=True)]


def predict_proba(model: str | Path, images: Sequence[str | Path], *, device: str = "auto", batch_size: int = 32,
                  weights_file: str | Path | None = None, engine: str = "auto") -> Probabilities:
    """Class probabilities of images under a bundle (runs its backbone) or an exported ``.onnx`` model.

    Folders are searched recursively for images. An image that cannot be used gets a NaN row and
    its reason in ``errors``; the others are still classified.

    Args:
        model: a bundle folder (``fit`` or ``finetune``) or an ``.onnx`` file written by ``export``.
        images: image files and folders.
        device: ``auto``, ``cpu`` or ``cuda`` (bundles; ONNX models run on onnxruntime's CPU provider).
        batch_size: images per forward pass.
        weights_file: the backbone weights file, for bundles fitted with ``--weights-file``.
        engine: what runs a bundle's network, as for ``extract``: ``auto`` (onnxruntime over the cached ONNX
            graph on CPU, torch on CUDA), ``torch`` or ``onnxruntime``.

    Raises:
        BundleError: a bad bundle; ExportError: a bad ``.onnx`` file; ConfigError: missing paths.

    Example:
        >>> probs = predict_proba("models/elpv-linear", ["new_cells/"])
        >>> probs.proba.shape, probs.classes
    """
    paths = _list_images(images)
    if str(model).endswith(".onnx"):
        # The light runtime: numpy + Pillow + onnxruntime, preprocessing from the file's metadata
        # (or inside the graph, for an export with --input raw).
        from .runtime import OnnxClassifier

        clf = OnnxClassifier(model)
        return _collect(paths, clf.proba_or_error(paths, batch_size), clf.classes)
    return _bundle_image_probas(model, paths, device, batch_size, weights_file, engine)


def predict(model: str | Path, images: Sequence[str | Path], *, top_k: int = 1, device: str = "auto",
            batch_size: int = 32, weights_file: str | Path | None = None, engine: str = "auto") -> list[Prediction]:
    """Classify new images with a bundle (runs its backbone) or an exported ``.onnx`` model.

    The top ``top_k`` classes of :func:`predict_proba`. Unreadable images get a ``Prediction``
    with ``error`` set; the others are still classified.

    Raises:
        BundleError: bad bundle; ConfigError: missing paths, bad ``top_k``.
    """
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1; got {top_k}.")
    return predict_proba(model, images, device=device, batch_size=batch_size, weights_file=weights_file,
                         engine=engine).top_k(top_k)


def _collect(paths: list[Path], results: Sequence[np.ndarray | str], classes: list[str]) -> Probabilities:
    """Probabilities from one result per image: a probability row, or the reason it could not be used."""
    proba = np.full((len(paths), len(classes)), np.nan)
    errors: list[str | None] = []
    for i, r in enumerate(results):
        if isinstance(r, str):
            errors.append(r)
        else:
            proba[i] = r
            errors.append(None)
    return Probabilities(paths, proba, errors, list(classes))


def _bundle_image_probas(model: str | Path, paths: list[Path], device: str, batch_size: int,
                         weights_file: str | Path | None, engine: str = "auto") -> Probabilities:
    """A bundle on image files: its backbone, the layers and views its head reads, TTA as it was fitted.

    The network runs on extract's engine (:func:`featbank.extraction.build_engine`; ``auto``: onnxruntime
    over the cached ONNX graph on CPU, torch on CUDA), so an image's features are computed as its cache
    row was; views are pooled by :func:`featbank.fitting.pool_views`, as ``fit`` and ``evaluate`` pool them.
    """
    from ._device import resolve_device
    from .bundles import load_bundle
    from .images import ImageReadError, load_and_preprocess

    bundle = load_bundle(model)
    bundle.load_head()
    bb = bundle.load_backbone(weights_file)
    features_of = _bundle_features(bundle, bb, str(resolve_device(device)), engine)

    def proba_of(x: np.ndarray) -> np.ndarray:
        return np.mean([bundle.predict_proba(f) for f in features_of(x)], axis=0)

    results = _in_batches(paths, lambda p: load_and_preprocess(p, bb.preprocess), proba_of, ImageReadError,
                          batch_size)
    return _collect(paths, results, bundle.classes)


def _bundle_features(bundle: Bundle, bb: Any, device: str, engine: str) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``uint8 NHWC -> [features]`` as the bundle's head reads them: one array, or one per TTA view
    (the plain image first). Pooled views give one array, ``[mean | max]`` over the plain image and its views."""
    import torch

    from .bundles.network import bundle_views, check_layer_order
    from .extraction import build_tap_engine
    from .fitting import pool_views

    feats = bundle.features  # no section: the embedding alone
    eng = build_tap_engine(engine, bb, device, "float32", feats.layers, feats.pooling)
    check_layer_order(bundle, bb.name, tuple(eng.layers))
    pooled = bool(feats.view_pool)
    views = bundle_views(bundle, bb) if pooled or feats.tta else []

    def run(x: np.ndarray) -> np.ndarray:
        return np.concatenate(eng(np.ascontiguousarray(x)), axis=1).astype(np.float32, copy=False)

    def each_view(x: np.ndarray) -> Iterator[np.ndarray]:
        t = torch.from_numpy(x)
        yield run(x)
        for v in views:
            yield run(v(t).contiguous().numpy())

    def features_of(x: np.ndarray) -> list[np.ndarray]:
        return [pool_views(each_view(x))] if pooled else list(each_view(x))

    return features_of


def _top_k(p: np.ndarray, classes: list[str], top_k: int, path: Path) -> Prediction:
    order = np.argsort(-p)[:top_k]
    tk = [(classes[j], float(p[j])) for j in order]
    return Prediction(tk[0][0], int(order[0]), tk[0][1], path=str(path), top_k=tk)


def _in_batches(paths: list[Path], preprocess: Callable[[Path], np.ndarray],
                proba_of: Callable[[np.ndarray], np.ndarray], read_errors: type[Exception] | tuple[type[Exception], ...],
                batch_size: int) -> list[np.ndarray | str]:
    """Preprocess each path, run ``proba_of`` on full batches: a probability row per image, or why it
    could not be read, in its place."""
    out: list[np.ndarray | str | None] = [None] * len(paths)
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        for (i, _), p in zip(pending, proba_of(np.stack([a for _, a in pending]))):
            out[i] = p
        pending.clear()

    for i, p in enumerate(paths):
        try:
            pending.append((i, preprocess(p)))
        except read_errors as e:
            out[i] = str(e)
        if len(pending) >= batch_size:
            flush()
    flush()
    return [r for r in out if r is not None]
