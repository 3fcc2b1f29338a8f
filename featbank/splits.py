"""Validation hold-outs, K-shot and stratified samples: the one home of how fit and finetune pick rows.

Both hold-outs are scikit-learn's ``train_test_split(stratify=...)`` with ``random_state=seed``,
so ``fit`` and ``finetune`` hold out validation rows the same way; K-shot sampling draws K rows
per class with a seeded generator, and so does :func:`stratified_sample` (``fit --auto``'s round 1
on a large fold), each class its share of ``n``.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

__all__ = ["n_holdout", "stratified_holdout", "stratified_sample", "sample_shots"]


def n_holdout(n_rows: int, n_classes: int, fraction: float) -> int:
    """Rows a stratified hold-out of ``fraction`` takes: at least one per class."""
    return max(n_classes, int(round(fraction * n_rows)))


def stratified_holdout(rows: np.ndarray, labels: np.ndarray, n_val: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (train, val), stratified by ``labels`` (the labels of ``rows``).

    Args:
        rows: row indices to split; labels: their class indices (same length).
        n_val: rows to hold out (see :func:`n_holdout`); seed: ``random_state`` of the split.

    Returns:
        ``(train, val)``, each sorted.

    Raises:
        ConfigError: a class has fewer than 2 rows, or ``n_val`` leaves fewer training rows than
            classes (scikit-learn's conditions for a stratified split).
    """
    from sklearn.model_selection import train_test_split

    rows, labels = np.asarray(rows, np.int64), np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(rows) == 0 or counts.min() < 2 or not len(classes) <= n_val <= len(rows) - len(classes):
        raise ConfigError(
            f"Cannot hold out a stratified validation set of {n_val} of {len(rows)} rows over {len(classes)} "
            f"classes (smallest class: {int(counts.min()) if len(counts) else 0} rows); every class needs at "
            "least 2 images and both sides at least one per class."
        )
    train, val = train_test_split(rows, test_size=int(n_val), random_state=seed, stratify=labels)
    return np.sort(train), np.sort(val)


def stratified_sample(rows: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``rows`` if at most ``n``, else ``n`` of them (sorted): each class of ``labels`` (the labels of
    ``rows``) its share by largest remainder, and at least one of each class, even where that makes more
    than ``n``. Unlike :func:`stratified_holdout`, a class of one row is fine (``fit --auto``'s round 1
    samples a fold's held-out rows, where a small class can have a single image)."""
    rows, labels = np.asarray(rows, np.int64), np.asarray(labels)
    if len(rows) <= n:
        return rows
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n / len(rows))
    take = np.minimum(np.maximum(np.floor(exact), 1), counts).astype(int)
    while take.sum() < n:  # the largest remainders first
        room = np.flatnonzero(take < counts)
        take[room[np.argmax((exact - take)[room])]] += 1
    while take.sum() > n and (take > 1).any():  # the ones of small classes pushed it over: from the largest
        over = np.flatnonzero(take > 1)
        take[over[np.argmin((exact - take)[over])]] -= 1
    out = [rng.choice(rows[labels == c], size=k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(out))


def sample_shots(rows: np.ndarray, labels: np.ndarray, shots: int, seed: int,
                 class_names: list[str] | None = None) -> np.ndarray:
    """``shots`` rows of each class present in ``labels`` (the labels of ``rows``), sorted.

    Raises:
        ConfigError: a class has fewer than ``shots`` rows.
    """
    rng = np.random.default_rng(seed)
    rows, labels = np.asarray(rows, np.int64), np.asarray(labels)
    out = []
    for c in np.unique(labels):
        of_c = rows[labels == c]
        if len(of_c) < shots:
            name = class_names[c] if class_names is not None else c
            raise ConfigError(
                f"--shots {shots} asks for {shots} training images per class, but class {name!r} has only "
                f"{len(of_c)}. Use a smaller --shots."
            )
        out.append(rng.choice(of_c, size=shots, replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)
