"""What ``fit`` reads from a cache with layers and views: the feature table, ``--layers auto``, TTA.

A :class:`FeatureTable` presents a cache's features of some layers (columns concatenated in
network order) as rows, the plain view first and then each augmented view: virtual row
``slot * N + r`` is image ``r`` seen through slot ``slot`` (0 = plain, ``k + 1`` = augmented view
``k``). Training rows are expanded to all their slots; validation and test rows stay plain. Views
of one image therefore always fall on the side of the split the image is on (the split is made
on images, before any expansion).

View pooling (``fit --pool-views``) instead describes each image by one row: the mean and the
max over its plain and augmented views of every feature (``[mean | max]``, twice the width). The
row is invariant to the augmentation (a dihedral cache: to flips and quarter turns), so nothing
is expanded and there is no TTA; ``predict`` and the exported graph compute the same views of a
new image and pool them the same way.

``--layers auto`` is a greedy forward selection of whole layers (Head2Toe's finding is that the
choice of layers matters more than the features within them): starting from ``final``, each round
adds the layer whose addition most improves the validation score of a ridge classifier on
standardised features (every regularisation strength from one eigendecomposition, so a candidate
costs one factorisation, not a C sweep), and stops when no layer improves it. The head is then
fitted on the chosen layers with the usual protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..cache import FeatureCache

__all__ = ["FeatureTable", "LayerChoice", "resolve_layers", "select_layers", "sample_rows", "mean_proba", "pool_views",
           "TTA_CHOICES"]

TTA_CHOICES = ("auto", "on", "off")
_RIDGE_ALPHAS = np.logspace(-3, 2, 11)  # times the mean eigenvalue of the Gram matrix
_MIN_GAIN = 1e-9  # a layer must improve the validation score strictly


class FeatureTable:
    """A cache's features of ``layers`` as rows, plain view then the augmented views.

    Quacks like the cache where ``fit`` needs one (``labels``, ``classes``, ``paths``,
    ``embed_dim``, ``n_samples``, ``load_embeddings``, ``_read_sorted``), so the heads and their
    streaming path read it unchanged.

    Args:
        cache: an open :class:`~featbank.cache.FeatureCache`.
        layers: layer names the cache holds, in network order.
        train_views: whether :meth:`expand` adds the augmented views of training rows.
        pooled: one row per image, ``[mean | max]`` over its views (needs a cache with views;
            ``train_views`` is then ignored).
    """

    def __init__(self, cache: FeatureCache, layers: Sequence[str], train_views: bool = True, pooled: bool = False):
        self.cache = cache
        self.layers = tuple(layers)
        self.n_images = int(cache.n_samples)
        self.n_views = int(getattr(cache, "n_views", 0) or 0)
        if pooled and not self.n_views:
            raise ConfigError("View pooling needs a cache with augmented views (extract with --views K --augment ...).")
        self.pooled = bool(pooled)
        self.train_views = bool(train_views) and self.n_views > 0 and not self.pooled
        dims = getattr(cache, "layer_dims", None) or {"final": int(cache.embed_dim)}
        self.layer_dims = {t: int(dims[t]) for t in self.layers}
        self.embed_dim = sum(self.layer_dims.values()) * (2 if self.pooled else 1)
        self.n_slots = 1 if self.pooled else 1 + self.n_views  # virtual rows per image
        self.n_samples = self.n_images * self.n_slots
        self.classes = cache.classes
        self.labels = np.tile(np.asarray(cache.labels), self.n_slots)
        self.extreme = getattr(cache, "extreme", "raise")

    @property
    def plain_final(self) -> bool:
        return self.layers == ("final",) and not self.n_views

    @property
    def n_tta_views(self) -> int:
        """Augmented views a prediction may average over (none for pooled rows: they hold every view)."""
        return 0 if self.pooled else self.n_views

    @property
    def paths(self) -> Any:
        return _Paths(self.cache.paths, self.n_images)

    def expand(self, rows: np.ndarray) -> np.ndarray:
        """Training rows with their augmented views (when used), sorted."""
        rows = np.asarray(rows, np.int64)
        if not self.train_views:
            return np.sort(rows)
        return np.sort(np.concatenate([rows + s * self.n_images for s in range(1 + self.n_views)]))

    def view_rows(self, rows: np.ndarray, view: int) -> np.ndarray:
        """The virtual rows of augmented view ``view`` (0-based) of ``rows``."""
        return np.sort(np.asarray(rows, np.int64)) + (view + 1) * self.n_images

    def images_of(self, rows: np.ndarray) -> np.ndarray:
        """The image (cache row) behind each virtual row."""
        return np.asarray(rows, np.int64) % self.n_images

    def _read_sorted(self, rows: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if self.pooled:  # one view in memory at a time besides the result
            views = (self.cache.load_features(rows, self.layers, v, np.float32) for v in [None, *range(self.n_views)])
            return pool_views(views).astype(dtype, copy=False)
        out = np.empty((len(rows), self.embed_dim), dtype)
        slots = rows // self.n_images
        for s in np.unique(slots):
            sel = slots == s
            view = None if s == 0 else int(s) - 1
            out[sel] = self.cache.load_features(rows[sel] - s * self.n_images, self.layers, view, dtype)
        return out

    def load_embeddings(self, rows: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        return self._read_sorted(np.sort(np.asarray(rows, np.int64)), dtype)


class _Paths:
    """``paths[virtual row]`` -> the image's relative path (for messages)."""

    def __init__(self, paths: Any, n: int):
        self._paths, self._n = paths, n

    def __getitem__(self, r: int) -> str:
        return self._paths[int(r) % self._n]


def resolve_layers(spec: str | Sequence[str] | None, cache: FeatureCache) -> tuple[str, ...] | None:
    """The layers a ``--layers`` value names, in the cache's (network) order; ``None`` for ``auto``.

    Accepts ``final`` (default), ``auto``, ``all``, comma-separated names and inclusive ranges
    (``stage5-final``) of the layers the cache holds.

    Raises:
        ConfigError: an empty value or a layer the cache does not hold (the message lists them).
    """
    held = list(getattr(cache, "layers", ("final",)) or ("final",))
    if spec is None:
        return ("final",)
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    if items == ["auto"]:
        return None
    hint = (f"This cache holds the layers {', '.join(held)}; --layers takes 'auto', 'all', names or ranges of them "
            "(e.g. 'stage5,final' or 'stage5-final'). Other layers: 'featbank extract DATA --layers ...'.")
    if not items or any(not s for s in items):
        raise ConfigError(f"The 'layers' parameter must name layers; got {spec!r}. {hint}")
    chosen: set[str] = set()
    for item in items:
        if item == "all":
            chosen.update(held)
        elif item in held:
            chosen.add(item)
        elif "-" in item and all(p.strip() in held for p in item.split("-", 1)):
            a, b = (held.index(p.strip()) for p in item.split("-", 1))
            if a > b:
                raise ConfigError(f"The layer range {item!r} runs backwards. {hint}")
            chosen.update(held[a:b + 1])
        else:
            raise ConfigError(f"Unknown layer {item!r} in --layers {spec!r}. {hint}")
    return tuple(t for t in held if t in chosen)


# --------------------------------------------------------------------------------------------
# --layers auto: greedy forward selection on the validation split
# --------------------------------------------------------------------------------------------


@dataclass
class LayerChoice:
    """What ``--layers auto`` chose and why: the per-round validation scores of every candidate."""

    layers: tuple[str, ...]
    score: float
    rounds: list[dict[str, Any]] = field(default_factory=list)
    scorer: str = "ridge classifier on standardised features, best of 11 strengths, validation split"
    n_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "val_score": self.score, "rounds": self.rounds, "scorer": self.scorer,
                "n_train_rows": self.n_rows}

    def summary(self) -> str:
        lines = [f"--layers auto chose {','.join(self.layers)} (validation score {self.score:.4f}; {self.scorer}):"]
        for r in self.rounds:
            cands = ", ".join(f"+{t} {s:.4f}" for t, s in sorted(r["candidates"].items(), key=lambda kv: -kv[1]))
            lines.append(f"  round {r['round']}: from {r['base_score']:.4f}: {cands or '(none)'} -> "
                         f"{'added ' + r['added'] if r['added'] else 'stop'}")
        return "\n".join(lines)


def _ridge_score(Xtr: np.ndarray, ytr: np.ndarray, Xv: np.ndarray, yv: np.ndarray, k: int, balanced: bool) -> float:
    """Best validation score of a ridge classifier over :data:`_RIDGE_ALPHAS` (dual form when rows < columns)."""
    mean = Xtr.mean(0)
    scale = Xtr.std(0)
    scale[scale < 1e-8] = 1.0
    Z = ((Xtr - mean) / scale).astype(np.float64)
    Zv = ((Xv - mean) / scale).astype(np.float64)
    Y = np.eye(k)[ytr]
    Y -= Y.mean(0)
    n, d = Z.shape
    if n <= d:
        e, V = np.linalg.eigh(Z @ Z.T)
        proj, cross = V.T @ Y, Zv @ Z.T @ V
    else:
        e, V = np.linalg.eigh(Z.T @ Z)
        proj, cross = V.T @ (Z.T @ Y), Zv @ V
    e = np.clip(e, 0.0, None)
    base = max(float(e.mean()), 1e-12)
    best = 0.0
    for a in _RIDGE_ALPHAS:
        pred = (cross @ (proj / (e + a * base)[:, None])).argmax(1)
        best = max(best, selection_score(yv, pred, balanced))
    return best


def selection_score(y: np.ndarray, pred: np.ndarray, balanced: bool) -> float:
    if balanced:
        from sklearn.metrics import balanced_accuracy_score

        return float(balanced_accuracy_score(y, pred))
    return float(np.mean(pred == y))


def sample_rows(cache: FeatureCache, rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``rows``, or a stratified sample of ``n`` of them where there are many more and every class present
    has two or more."""
    counts = np.bincount(cache.labels[rows])
    if len(rows) <= n + 2 * len(cache.classes) or counts[counts > 0].min() < 2:
        return rows
    from ..splits import stratified_holdout

    return np.sort(stratified_holdout(rows, cache.labels[rows], n, seed)[1])


def select_layers(cache: FeatureCache, train: np.ndarray, val: np.ndarray, *, balanced: bool = False,
                  max_rows: int | None = None, max_val_rows: int | None = None, seed: int = 0) -> LayerChoice:
    """Greedy forward selection of whole layers on the plain view, scored on ``val``.

    Args:
        cache: an open cache with layers.
        train, val: cache rows (plain view).
        balanced: score with balanced accuracy (``--class-weight balanced``) instead of top-1.
        max_rows: at most this many training rows (a stratified sample) enter the scoring, so
            the selection stays within ``--max-memory``.
        max_val_rows: score on a stratified sample of about this many validation rows where there are
            many more (and every class has two or more): every layer of them is read.
        seed: of the samples.

    Returns:
        The chosen layers (network order, always with ``final``) and the per-round scores.
    """
    held = list(cache.layers)
    train = np.sort(np.asarray(train, np.int64))
    if max_rows is not None and len(train) > max_rows:
        from ..splits import stratified_holdout

        _, train = stratified_holdout(train, cache.labels[train], max(int(max_rows), len(cache.classes)), seed)
        train = np.sort(train)
    val = np.sort(np.asarray(val, np.int64))
    if max_val_rows is not None:
        val = sample_rows(cache, val, max_val_rows, seed)
    k = len(cache.classes)
    ytr, yv = cache.labels[train], cache.labels[val]
    blocks = {t: (cache.load_features(train, (t,)), cache.load_features(val, (t,))) for t in held}

    def score(layers: Sequence[str]) -> float:
        Xtr = np.concatenate([blocks[t][0] for t in layers], 1)
        Xv = np.concatenate([blocks[t][1] for t in layers], 1)
        return _ridge_score(Xtr, ytr, Xv, yv, k, balanced)

    chosen = ["final"]
    current = score(chosen)
    rounds: list[dict[str, Any]] = []
    while True:
        cands = {t: score([c for c in held if c in chosen or c == t]) for t in held if t not in chosen}
        best = max(cands, key=lambda t: (cands[t], -held.index(t)), default=None)
        added = best if best is not None and cands[best] > current + _MIN_GAIN else None
        rounds.append({"round": len(rounds) + 1, "base": list(chosen), "base_score": current, "candidates": cands,
                       "added": added})
        if added is None:
            break
        chosen.append(added)
        current = cands[added]
    return LayerChoice(tuple(t for t in held if t in chosen), current, rounds, n_rows=len(train))


def pool_views(views: Iterable[np.ndarray]) -> np.ndarray:
    """``[mean | max]`` over the views of each row: ``views`` yields one ``(n, d)`` float32 array per view.

    Accumulates in the result, so a generator of views holds one of them in memory at a time.
    """
    it = iter(views)
    first = next(it, None)
    if first is None:
        raise ValueError("pool_views needs at least one view")
    d = first.shape[1]
    out = np.empty((first.shape[0], 2 * d), np.float32)
    out[:, :d] = first
    out[:, d:] = first
    n = 1
    for v in it:
        out[:, :d] += v
        np.maximum(out[:, d:], v, out=out[:, d:])
        n += 1
    out[:, :d] /= n
    return out


def mean_proba(probas: Sequence[np.ndarray]) -> np.ndarray:
    """Test-time augmentation: the mean of the class probabilities over the views."""
    return np.mean(np.stack(list(probas)), axis=0)
