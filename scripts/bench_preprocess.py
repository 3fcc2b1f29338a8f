"""Cross-validated top-1 of each ``--auto`` preprocessing, on train+val only (no test row is read).

The study behind the ``sqrt`` preprocessing (docs/commands/fit.md, "Why sqrt"): for every
preprocessing of :data:`featbank.heads.PREPROCESSES` and the feature sets ``final``, ``last4`` and
``all``, the RBF SVM family's best grid mean over K folds x R repeats of the cache's train+val
images (the folds of ``fit --auto``), with the paired difference against ``standardize``.

    python scripts/bench_preprocess.py --cache elpv4=/work/data/caches/elpv4.h5 --views pooled

Prints one line per (feature set, preprocessing) and, with ``--json``, writes the rows.

With two or more ``--cache`` of the same images (the same paths, labels and splits, so the same
folds) extracted differently, e.g. ``--pooling gap+2x2`` against ``gap+2x2+max``, each cache is
studied in turn and every row of the later caches is then compared, fold by fold, with the first
cache's row of the same feature set and preprocessing:

    python scripts/bench_preprocess.py --views pooled --cache avg=/work/data/caches/elpv4.h5 \\
        --cache max=/work/data/caches/elpv4-max.h5

A NAME of ``elpv2`` or ``elpv2:<anything>`` (``elpv2:avg``, ``elpv2:max``) reads an ELPV 4-class cache
relabelled defective (p >= 0.5) or not, as ``bench_autopilot.py``'s ``elpv2`` does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from bench_autopilot import open_dataset  # scripts/ is on the path when a script runs; elpv2 relabels elpv4

from featbank.cache import open_cache
from featbank.fitting import feature_matrices, make_folds, spans, split_rows
from featbank.heads import PREPROCESSES, FoldKernels, get_head_family


def same_images(paths: list[str]) -> None:
    """Refuse caches that do not hold the same images in the same rows (their folds would differ)."""
    first = open_cache(paths[0])
    try:
        for other in paths[1:]:
            c = open_cache(other)
            try:
                if (c.paths != first.paths or not np.array_equal(c.labels, first.labels)
                        or not np.array_equal(c.splits, first.splits)):
                    raise SystemExit(f"{other} and {paths[0]} do not hold the same images, labels and splits in the "
                                     "same rows; a fold-by-fold comparison needs them to.")
            finally:
                c.close()
    finally:
        first.close()


def study(dataset: str, path: str, views: str, cv: int, repeats: int, seed: int) -> list[dict]:
    cache = open_dataset(dataset.split(":")[0], Path(path))
    train, val, _test, _ = split_rows(cache, 0.2, seed)
    pool = np.sort(np.concatenate([train, val]))  # train+val only: the test rows are never loaded
    held = tuple(cache.layers)
    sets = {"final": ("final",), **{k: v for k, v in spans(held).items() if k == "last4"}, "all": held}
    y = cache.labels[pool]
    data = feature_matrices(cache, [(ls, views) for ls in sets.values()], pool)
    folds = [f for r in make_folds(y, cv, repeats, seed) for f in r]
    fam = get_head_family("svm-rbf")
    rows = []
    for name, ls in sets.items():
        X = data[(ls, views)]
        grid = fam.default_grid(len(folds[0][0]), X.shape[1], len(cache.classes))
        base = None
        for pre in PREPROCESSES:
            t0 = time.perf_counter()
            scores = fam.cv_scores(X, y, folds, grid, preprocess=pre, kernels=FoldKernels())
            assert scores.shape == (len(grid), len(folds)) and np.isfinite(scores).all(), "every fold must be scored"
            best = int(scores.mean(1).argmax())
            per_fold = scores[best]
            base = per_fold if pre == "standardize" else base
            diff = per_fold - base if base is not None else np.zeros_like(per_fold)
            rows.append({"features": name, "preprocess": pre, "cv_mean": float(per_fold.mean()),
                         "cv_std": float(per_fold.std()), "params": grid[best], "n_folds": len(folds),
                         "vs_standardize": float(diff.mean()), "folds_better": int((diff > 0).sum()),
                         "folds_worse": int((diff < 0).sum()), "seconds": round(time.perf_counter() - t0, 1),
                         "fold_scores": [float(v) for v in per_fold]})
            r = rows[-1]
            print(f"{name:6} {pre:12} cv {r['cv_mean']:.4f} +- {r['cv_std']:.4f} ({len(folds)} folds) "
                  f"vs standardize {100 * r['vs_standardize']:+.2f} pt (folds better/worse "
                  f"{r['folds_better']}/{r['folds_worse']})  {r['params']}  {r['seconds']} s", flush=True)
    return rows


def compare(studies: dict[str, list[dict]]) -> list[dict]:
    """Each later cache's rows against the first cache's, fold by fold (the same folds)."""
    names = list(studies)
    ref = {(r["features"], r["preprocess"]): r for r in studies[names[0]]}
    out = []
    for name in names[1:]:
        for r in studies[name]:
            base = ref[(r["features"], r["preprocess"])]
            d = np.array(r["fold_scores"]) - np.array(base["fold_scores"])
            out.append({"dataset": name, "against": names[0], "features": r["features"], "preprocess": r["preprocess"],
                        "cv_mean": r["cv_mean"], "against_cv_mean": base["cv_mean"], "diff": float(d.mean()),
                        "diff_se": float(d.std(ddof=1) / np.sqrt(len(d))), "folds_better": int((d > 0).sum()),
                        "folds_worse": int((d < 0).sum())})
            c = out[-1]
            print(f"{name} vs {names[0]}: {c['features']:6} {c['preprocess']:12} {c['cv_mean']:.4f} vs "
                  f"{c['against_cv_mean']:.4f}: {100 * c['diff']:+.2f} pt (standard error {100 * c['diff_se']:.2f}; "
                  f"folds better/worse {c['folds_better']}/{c['folds_worse']})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, action="append",
                    help="NAME=PATH of a cache with a train/test split; repeat it to compare caches of the same images")
    ap.add_argument("--views", choices=("plain", "pooled"), default="plain")
    ap.add_argument("--cv", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    for c in a.cache:
        if "=" not in c:
            ap.error(f"--cache must be NAME=PATH (a name for the report, then the cache file); got {c!r}")
    caches = dict(c.split("=", 1) for c in a.cache)
    if len(caches) != len(a.cache):
        ap.error("each --cache needs its own NAME")
    if len(caches) > 1:
        same_images(list(caches.values()))
    studies = {}
    for name, path in caches.items():
        print(f"# {name}: {path}", flush=True)
        studies[name] = study(name, path, a.views, a.cv, a.repeats, a.seed)
    paired = compare(studies) if len(studies) > 1 else []
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"views": a.views, "studies": studies, "paired": paired}, f, indent=1)


if __name__ == "__main__":
    main()
