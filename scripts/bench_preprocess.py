"""Cross-validated top-1 of each ``--auto`` preprocessing, on train+val only (no test row is read).

The study behind the ``sqrt`` preprocessing (docs/commands/fit.md, "Why sqrt"): for every
preprocessing of :data:`featbank.heads.PREPROCESSES` and the feature sets ``final``, ``last4`` and
``all``, the RBF SVM family's best grid mean over K folds x R repeats of the cache's train+val
images (the folds of ``fit --auto``), with the paired difference against ``standardize``.

    python scripts/bench_preprocess.py --cache elpv4=/work/data/caches/elpv4.h5 --views pooled

Prints one line per (feature set, preprocessing) and, with ``--json``, writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from featbank.cache import open_cache
from featbank.fitting import feature_matrices, make_folds, spans, split_rows
from featbank.heads import PREPROCESSES, FoldKernels, get_head_family


def study(path: str, views: str, cv: int, repeats: int, seed: int) -> list[dict]:
    cache = open_cache(path)
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
                         "folds_worse": int((diff < 0).sum()), "seconds": round(time.perf_counter() - t0, 1)})
            r = rows[-1]
            print(f"{name:6} {pre:12} cv {r['cv_mean']:.4f} +- {r['cv_std']:.4f} ({len(folds)} folds) "
                  f"vs standardize {100 * r['vs_standardize']:+.2f} pt (folds better/worse "
                  f"{r['folds_better']}/{r['folds_worse']})  {r['params']}  {r['seconds']} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="NAME=PATH of a cache with a train/test split")
    ap.add_argument("--views", choices=("plain", "pooled"), default="plain")
    ap.add_argument("--cv", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    if "=" not in a.cache:
        ap.error(f"--cache must be NAME=PATH (a name for the report, then the cache file); got {a.cache!r}")
    name, path = a.cache.split("=", 1)
    rows = study(path, a.views, a.cv, a.repeats, a.seed)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"dataset": name, "views": a.views, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
