"""``audit``: duplicates, leakage across splits, likely label errors and outliers of one cache."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import FeatureCache, open_cache
from ..errors import CacheError, ConfigError
from ._findings import (
    EXACT_SIMILARITY,
    Pairs,
    best_match,
    find_pairs,
    flag_high,
    knn_outlier_scores,
    mark_exact,
    rescore_pairs,
    same_file,
)
from ._ivf import IvfSettings, ivf_search
from ._labels import METHODS, FoldFitter, LabelIssues, find_label_issues, out_of_fold_proba
from ._neighbors import BACKENDS, RowReader, knn_search
from ._verify import DEFAULT_PIXEL_THRESHOLD, VERIFY, pixel_scores

__all__ = ["AuditSettings", "AuditResult", "audit", "run_neighbors", "run_labels", "resolve_search", "verify_on_pixels",
           "DEFAULT_THRESHOLD",
           "SEARCHES",
           "IVF_FROM_ROWS", "IVF_CANDIDATE_MARGIN"]

#: Neighbour searches: ``exact`` (blocked, every pair), ``ivf`` (faiss IVF over a PCA projection, pairs
#: re-scored exactly), ``auto`` = ``ivf`` from :data:`IVF_FROM_ROWS` images when faiss is installed.
SEARCHES = ("auto", "exact", "ivf")
IVF_FROM_ROWS = 200_000
#: Neighbours per image by default, and with ``verify="pixels"``.
DEFAULT_NEIGHBORS = 10
PIXEL_VERIFY_NEIGHBORS = 50
#: The approximate search proposes pairs down to ``threshold - IVF_CANDIDATE_MARGIN`` in its PCA space;
#: each is re-scored on the full features and kept at or above ``threshold``.
IVF_CANDIDATE_MARGIN = 0.1

#: Default cosine similarity at or above which two images count as near-duplicates. Measured, not
#: guessed (scripts/bench_audit.py variants, efficientnet_lite0 final layer, 60 images each of ELPV
#: and Fashion-MNIST): a brightness shift or a re-save keeps a copy at a median >= 0.99 of its
#: original and a 0.8x resize of ELPV at >= 0.97, while the most similar pair of *different*
#: images reached 0.963 (ELPV) and 0.889 (Fashion-MNIST). A 90% crop (median 0.93-0.95) is found
#: about half the time; JPEG quality 30 (median 0.79-0.80) is not: see docs/commands/audit.md.
DEFAULT_THRESHOLD = 0.95


@dataclass
class AuditSettings:
    """What ``audit`` looks for and how (one object, stored in the summary).

    Attributes:
        threshold: cosine similarity at or above which a pair is a (near-)duplicate.
        k: neighbours per image (duplicate search and the kNN outlier score); ``None``: :attr:`neighbors`.
        outlier_percentile: images above this percentile of the kNN distance (and below
            100 - this percentile of the top out-of-fold probability) are outliers.
        n_folds: folds of the out-of-fold probabilities (each image in exactly one fold).
        method: confident-learning rule (``prune_by_noise_rate`` or ``confident_joint``).
        layers: the cache layers compared and probed (the plain view; stored views are not used).
        max_memory: bytes (or "1GB") held at once by the neighbour search and, beyond it, the probe streams.
        block_rows: query rows per block of the neighbour search (default: from max_memory).
        backend, device: of the exact neighbour search (faiss / torch; cpu / cuda / auto).
        dup_layers: the cache layers the duplicate search compares (``None``: ``layers``).
        verify: ``none`` (a pair is a duplicate at cosine >= ``threshold``) or ``pixels`` (every
            pair of k-nearest neighbours is scored on its thumbnails, a duplicate at >=
            ``pixel_threshold``; see :mod:`featbank.audit._verify`).
        pixel_threshold: thumbnail correlation of a near-duplicate (``verify="pixels"``).
        search: ``exact``, ``ivf`` or ``auto`` (:data:`SEARCHES`).
        nprobe: cells the ``ivf`` search visits per image.
        seed: of the folds.
    """

    threshold: float = DEFAULT_THRESHOLD
    k: int | None = None
    outlier_percentile: float = 99.0
    n_folds: int = 5
    method: str = "prune_by_noise_rate"
    layers: str = "final"
    max_memory: int | str = "1GB"
    block_rows: int | None = None
    backend: str = "auto"
    device: str = "auto"
    dup_layers: str | None = None
    verify: str = "none"
    pixel_threshold: float = DEFAULT_PIXEL_THRESHOLD
    search: str = "auto"
    nprobe: int = 16
    seed: int = 0

    @property
    def neighbors(self) -> int:
        """``k``, or its default: 10, and 50 with ``verify="pixels"`` (every candidate pair is checked on pixels,
        and on ELPV 10 neighbours held the original of 96% of single-change copies, 50 of all)."""
        if self.k is not None:
            return self.k
        return PIXEL_VERIFY_NEIGHBORS if self.verify == "pixels" else DEFAULT_NEIGHBORS

    def validate(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be a cosine similarity in [-1, 1]; got {self.threshold!r}.")
        if not 0.0 < self.outlier_percentile < 100.0:
            raise ConfigError(f"--outlier-percentile must be between 0 and 100; got {self.outlier_percentile!r}.")
        if self.neighbors < 1 or self.n_folds < 2:
            raise ConfigError(f"--neighbors must be >= 1 and --folds >= 2; got {self.k!r} and {self.n_folds!r}.")
        if self.verify not in VERIFY or not -1.0 <= self.pixel_threshold <= 1.0:
            raise ConfigError(f"--verify must be one of {VERIFY} and --pixel-threshold a correlation in [-1, 1]; "
                              f"got {self.verify!r}, {self.pixel_threshold!r}.")
        if self.search not in SEARCHES or self.nprobe < 1:
            raise ConfigError(f"search must be one of {SEARCHES} and nprobe >= 1; got {self.search!r}, {self.nprobe!r}.")
        if self.method not in METHODS or self.backend not in BACKENDS:
            raise ConfigError(f"method must be one of {METHODS} and backend one of {BACKENDS}; "
                              f"got {self.method!r}, {self.backend!r}.")


@dataclass
class AuditResult:
    """What ``audit`` found. Row indices refer to the cache; ``summary`` is what summary.json holds."""

    cache: FeatureCache
    settings: AuditSettings
    pairs: Pairs
    knn_score: np.ndarray
    knn_outliers: np.ndarray
    label_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    proba: np.ndarray | None = None
    issues: LabelIssues | None = None
    unclaimed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    same_bytes: dict[tuple[int, int], bool | None] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.summary

    def text(self) -> str:
        """A few lines for the terminal, cross-split pairs first."""
        s = self.summary
        d, lab, out = s["duplicates"], s["label_issues"], s["outliers"]
        cross = ", ".join(f"{k} {v}" for k, v in d["cross_split"].items()) or "none"
        lines = [f"Audited {s['n_images']} images of {s['cache']} ({s['features']}).",
                 f"Cross-split duplicate pairs ({_rule(d)}): {d['cross_split_pairs']} ({cross})",
                 f"Within-split duplicate pairs: {d['within_split_pairs']}",
                 f"All duplicate pairs: exact {d['exact_pairs']} (identical files {d['identical_bytes_pairs']}), "
                 f"near {d['near_pairs']}",
                 (f"Likely label errors: {lab['n_flagged']} of {lab['n_labelled']} labelled images "
                  f"({lab['folds']}-fold LinearHead, C={lab['C']:g}, {lab['method']})") if lab["checked"]
                 else "Likely label errors: not checked",
                 f"Outliers: {out['knn']} far from every image, {out['unclaimed']} claimed by no class "
                 f"(beyond the {out['percentile']:g}th percentile)"]
        return "\n".join(lines + [f"Note: {n}" for n in s["notes"]])


def _rule(d: dict[str, Any]) -> str:
    if d.get("verify") == "pixels":
        return f"{d['layers']} {d['k']} nearest, thumbnail correlation >= {d['pixel_threshold']:g}"
    return f"{d['layers']} cosine >= {d['threshold']:g}"


def _device(device: str) -> str:
    from .._device import resolve_device

    return str(resolve_device(device))


def _memory(settings: AuditSettings) -> int:
    from ..fitting import parse_memory

    m = parse_memory(settings.max_memory)
    return int(m if m is not None else 1 << 30)


def _reader(cache: FeatureCache, layers: str) -> RowReader:
    def read(rows: np.ndarray) -> np.ndarray:
        return cache.load_features(rows, layers=layers)

    return read


def _split_name(cache: FeatureCache, code: int) -> str:
    return cache.split_names[code] if 0 <= code < len(cache.split_names) else "none"


def _split_note(cache: FeatureCache, notes: list[str]) -> None:
    """A note when the images do not span two splits (leakage across splits cannot be looked for)."""
    present = np.unique(cache.splits)
    if len(present) < 2:
        where = f"split '{_split_name(cache, int(present[0]))}'" if len(present) and present[0] >= 0 else "no split"
        notes.append(f"Leakage: all {cache.n_samples} images are in {where}, so no pair can cross splits "
                     "(extract a folder with train/ and test/ subfolders, or a manifest with a split column, to check it).")


def _check_cache(cache: FeatureCache) -> None:
    if cache.n_samples < 2:
        raise CacheError(f"Cache '{cache.path}' holds {cache.n_samples} image(s); an audit compares images, so it needs "
                         "at least 2. Extract a folder with more images.")


def resolve_search(settings: AuditSettings, n: int) -> str:
    """``exact`` or ``ivf``: what ``settings.search`` means for ``n`` images."""
    if settings.search != "auto":
        return settings.search
    if n < IVF_FROM_ROWS:
        return "exact"
    try:
        import faiss  # noqa: F401
    except ImportError:
        return "exact"
    return "ivf"


def _search(cache: FeatureCache, settings: AuditSettings, read: RowReader, dim: int, k: int):  # noqa: ANN202
    if resolve_search(settings, cache.n_samples) == "ivf":
        block = settings.block_rows or max(1, min(50_000, _memory(settings) // (8 * dim)))
        return ivf_search(read, cache.n_samples, dim, k, IvfSettings(nprobe=settings.nprobe, block_rows=block))
    return knn_search(read, cache.n_samples, dim, k, max_memory=_memory(settings), block_rows=settings.block_rows,
                      backend=settings.backend, device=_device(settings.device))


def verify_on_pixels(cache: FeatureCache, cand: Pairs, settings: AuditSettings, notes: list[str]) -> Pairs:
    """The candidate pairs whose thumbnails correlate at >= ``pixel_threshold`` and that are the best match
    of one of their two images (:func:`best_match`), or, where an image cannot be read, whose cosine is >=
    ``threshold``; most correlated first."""
    score, skipped = pixel_scores(cand, cache.root, cache.paths, _memory(settings))
    cand.pixel = score
    readable = np.isfinite(score)
    on_pixels = best_match(cand.a, cand.b, score) & (np.nan_to_num(score, nan=-2.0) >= settings.pixel_threshold)
    keep = np.where(readable, on_pixels, cand.similarity >= settings.threshold) | (cand.similarity >= EXACT_SIMILARITY)
    if skipped:
        first = next(iter(skipped.items()))
        notes.append(f"Pixel verification: {len(skipped)} image(s) could not be read ({first[0]}: {first[1]}); "
                     f"their {int((~readable).sum())} pair(s) were judged on cosine >= {settings.threshold:g}.")
    out = cand.take(np.flatnonzero(keep))
    order = np.lexsort((out.b, out.a, -out.similarity, -np.nan_to_num(out.pixel, nan=-2.0)))
    return out.take(order)


def run_neighbors(cache: FeatureCache, settings: AuditSettings, notes: list[str] | None = None
                  ) -> tuple[Pairs, np.ndarray]:
    """(duplicate pairs, kNN outlier score per row) from one neighbour search (exact and blocked, or
    approximate with faiss IVF and its pairs re-scored exactly), verified on pixels when asked."""
    notes = [] if notes is None else notes
    read = _reader(cache, settings.dup_layers or settings.layers)
    dim = read(np.arange(1)).shape[1]
    k = min(settings.neighbors, cache.n_samples - 1)
    nb = _search(cache, settings, read, dim, k)
    approximate = resolve_search(settings, cache.n_samples) == "ivf"
    if settings.verify == "pixels":
        cand = find_pairs(nb, -1.0)
        pairs = verify_on_pixels(cache, rescore_pairs(cand, read, -1.0) if approximate else cand, settings, notes)
    elif approximate:
        pairs = rescore_pairs(find_pairs(nb, settings.threshold - IVF_CANDIDATE_MARGIN), read, settings.threshold)
    else:
        pairs = find_pairs(nb, settings.threshold)
    if settings.verify != "pixels" and len(pairs.a) > cache.n_samples:
        notes.append(f"Duplicates: {len(pairs.a)} pairs at cosine >= {settings.threshold:g} among {cache.n_samples} "
                     "images: on images this alike the rule flags look-alikes, not copies. --verify pixels confirms "
                     "each pair on its pixels (--dup-layers an earlier layer, e.g. stage6, compares finer detail).")
    mark_exact(pairs, read)
    return pairs, knn_outlier_scores(nb)


def _label_problem(cache: FeatureCache, n_folds: int) -> tuple[np.ndarray, str | None]:
    """(labelled rows used, or why label errors cannot be looked for)."""
    rows = np.flatnonzero(cache.labels >= 0)
    if not len(rows):
        return rows, "the cache has no labels (a flat folder of images): label errors need classes"
    counts = np.bincount(cache.labels[rows], minlength=cache.n_classes)
    small = [cache.classes[c] for c in np.flatnonzero((counts > 0) & (counts < n_folds))]
    rows = rows[counts[cache.labels[rows]] >= n_folds]
    if len(np.unique(cache.labels[rows])) < 2:
        return rows[:0], (f"the cache has fewer than 2 classes with at least {n_folds} images each "
                          f"(classes: {list(cache.classes)}): label errors need 2 classes or more")
    return rows, (f"classes with fewer than {n_folds} images were left out: {small[:10]}" if small else None)


def _probe(cache: FeatureCache, rows: np.ndarray, settings: AuditSettings) -> tuple[FoldFitter, np.ndarray]:
    """A fit_predict over the labelled ``rows``: in memory when they fit ``max_memory``, else streamed."""
    from ..heads import Features, LinearHead

    y = cache.labels[rows]
    dim = cache.load_features(rows[:1], layers=settings.layers).shape[1]
    in_memory = len(rows) * dim * 4 <= _memory(settings) or settings.layers != "final"
    X = cache.load_features(rows, layers=settings.layers) if in_memory else None
    chunk = max(1, _memory(settings) // (8 * dim))

    def fit_predict(tr: np.ndarray, te: np.ndarray, C: float) -> np.ndarray:
        feats = Features(X[tr]) if X is not None else Features(cache=cache, rows=rows[tr], chunk_rows=chunk)
        head = LinearHead(C=C, device=_device(settings.device)).fit(feats, y[tr])
        out = np.zeros((len(te), cache.n_classes))
        for s in range(0, len(te), chunk):
            part = te[s : s + chunk]
            x = X[part] if X is not None else cache.load_embeddings(rows[part])
            out[s : s + chunk][:, head.classes_] = head.predict_proba(x)
        return out

    return fit_predict, y


def run_labels(cache: FeatureCache, settings: AuditSettings, notes: list[str]
               ) -> tuple[np.ndarray, np.ndarray | None, LabelIssues | None, float | None]:
    """(labelled rows, out-of-fold probabilities, label issues, C) or empty ones with a note why not."""
    rows, why = _label_problem(cache, settings.n_folds)
    if why:
        notes.append(f"Label errors: {why}.")
    if not len(rows):
        return rows, None, None, None
    fit_predict, y = _probe(cache, rows, settings)
    classes = np.unique(y)
    y_dense = np.searchsorted(classes, y)

    def fit_dense(tr: np.ndarray, te: np.ndarray, C: float) -> np.ndarray:
        return fit_predict(tr, te, C)[:, classes]

    proba, C = out_of_fold_proba(fit_dense, y_dense, len(classes), n_folds=settings.n_folds, seed=settings.seed)
    issues = find_label_issues(y_dense, proba, settings.method)
    issues.suggested = classes[issues.suggested]  # back to the cache's class indices
    full = np.zeros((len(rows), cache.n_classes))
    full[:, classes] = proba
    return rows, full, issues, C


def _check_same_bytes(cache: FeatureCache, pairs: Pairs) -> dict[tuple[int, int], bool | None]:
    out: dict[tuple[int, int], bool | None] = {}
    for a, b in zip(pairs.a[pairs.exact][:1000], pairs.b[pairs.exact][:1000]):
        pa, pb = cache.abspath(cache.paths[a]), cache.abspath(cache.paths[b])
        out[(int(a), int(b))] = same_file(pa, pb, cache.fingerprints[a, 0], cache.fingerprints[b, 0]) \
            if pa.is_file() and pb.is_file() else None
    return out


def _pair_counts(cache: FeatureCache, pairs: Pairs) -> dict[str, Any]:
    sa, sb = cache.splits[pairs.a], cache.splits[pairs.b]
    cross: dict[str, int] = {}
    for x, y in zip(sa[sa != sb], sb[sa != sb]):
        names = sorted((_split_name(cache, int(x)), _split_name(cache, int(y))))
        key = f"{names[0]}<->{names[1]}"
        cross[key] = cross.get(key, 0) + 1
    within = {}
    for x in np.unique(sa[sa == sb]):
        within[_split_name(cache, int(x))] = int(((sa == x) & (sb == x)).sum())
    la, lb = cache.labels[pairs.a], cache.labels[pairs.b]
    return {
        "cross_split_pairs": int((sa != sb).sum()), "cross_split": cross,
        "within_split_pairs": int((sa == sb).sum()), "within_split": within,
        "exact_pairs": int(pairs.exact.sum()), "near_pairs": int((~pairs.exact).sum()),
        "pairs_with_different_labels": int(((la != lb) & (la >= 0) & (lb >= 0)).sum()),
    }


def _summary(cache: FeatureCache, res: AuditResult, C: float | None, cut: float, notes: list[str]) -> dict[str, Any]:
    s = res.settings
    dup = _pair_counts(cache, res.pairs)
    dup["identical_bytes_pairs"] = sum(1 for v in res.same_bytes.values() if v)
    labels: dict[str, Any] = {"checked": res.issues is not None}
    if res.issues is not None:
        labels.update(n_labelled=len(res.label_rows), n_flagged=int(res.issues.flagged.sum()), probe="LinearHead",
                      C=C, folds=s.n_folds, method=s.method,
                      thresholds={cache.classes[c]: float(t) for c, t in zip(np.unique(cache.labels[res.label_rows]),
                                                                             res.issues.thresholds)})
    return {
        "cache": str(cache.path), "n_images": cache.n_samples,
        "features": f"layers {s.layers!r} of the plain view" + (f" ({cache.n_views} augmented views not used)"
                                                                 if cache.n_views else ""),
        "duplicates": {"threshold": s.threshold, "k": s.neighbors, **dup, "search": resolve_search(s, cache.n_samples),
                       "layers": s.dup_layers or s.layers, "verify": s.verify,
                       **({"pixel_threshold": s.pixel_threshold} if s.verify == "pixels" else {})},
        "label_issues": labels,
        "outliers": {"percentile": s.outlier_percentile, "knn_distance_cut": cut, "knn": len(res.knn_outliers),
                     "unclaimed": len(res.unclaimed)},
        "settings": asdict(s), "notes": notes,
    }


def audit(cache: str | os.PathLike | FeatureCache, settings: AuditSettings | None = None) -> AuditResult:
    """Audit a cache: (near-)duplicates within and across splits, likely label errors, outliers.

    Reads the plain view of ``settings.layers`` block by block (memory bounded by
    ``settings.max_memory`` apart from the per-image results). Write the report with
    :func:`featbank.audit.write_report`.

    Raises:
        CacheError: not a readable cache, fewer than 2 images, or NaN/inf embeddings.
        ConfigError: a setting out of range.
    """
    settings = settings or AuditSettings()
    settings.validate()
    cache = cache if isinstance(cache, FeatureCache) else open_cache(Path(cache))
    _check_cache(cache)
    notes: list[str] = []
    _split_note(cache, notes)
    pairs, knn_score = run_neighbors(cache, settings, notes)
    knn_rows, cut = flag_high(knn_score, settings.outlier_percentile)
    rows, proba, issues, C = run_labels(cache, settings, notes)
    res = AuditResult(cache=cache, settings=settings, pairs=pairs, knn_score=knn_score, knn_outliers=knn_rows,
                      label_rows=rows, proba=proba, issues=issues)
    if proba is not None:
        top, _ = flag_high(-proba.max(axis=1), settings.outlier_percentile)
        res.unclaimed = rows[top]
    res.same_bytes = _check_same_bytes(cache, pairs)
    res.summary = _summary(cache, res, C, cut, notes)
    return res
