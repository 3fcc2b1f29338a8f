"""Benchmark: featbank's linear head (full C sweep + refit) vs scikit-learn LogisticRegression.

Same features, same split, same C grid (the 9-point coarse grid plus the 4 refinement points
featbank tried), same selection rule (validation top-1), refit on train+val, accuracy on test.
Features: a 10-class Gaussian mixture of shape (N, 1280) written to a real featbank cache
(real embeddings of that size would need hours of extraction on this CPU).

    python scripts/bench_fit.py                 # 50,000 x 1280
    python scripts/bench_fit.py --n 10000       # quicker
    # real embeddings: Fashion-MNIST (apt-get install dataset-fashion-mnist), 40k train + 10k test
    python scripts/prepare_data.py fashion-mnist data/fmnist50k --n-train 40000 --n-test 10000
    featbank extract data/fmnist50k --out runs/fmnist50k.h5
    python scripts/bench_fit.py --cache runs/fmnist50k.h5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

import featbank
from featbank.cache import PartRows, write_cache
from featbank.fitting import COARSE_GRID


def make_cache(path: Path, n: int, d: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 0.1, (k, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    scales = rng.uniform(0.2, 3.0, d).astype(np.float32)  # unequal feature scales: standardising matters
    X = (centers[y] + rng.normal(0, 1, (n, d)).astype(np.float32)) * scales
    splits = np.where(rng.random(n) < 0.2, 2, 0).astype(np.int8)  # 80% train, 20% test
    src = path.with_suffix(".src.h5")
    with h5py.File(src, "w") as f:
        f.create_dataset("embeddings", data=X)
    write_cache(path, sources=[("s", src, np.arange(n))],
                rows=PartRows([f"{i:06d}.png" for i in range(n)], np.zeros((n, 2), np.int64), y, splits),
                classes=[f"class{i}" for i in range(k)], skipped=[], embed_dim=d, dtype="float32",
                attrs={"cache_key": "bench", "backbone": "gaussian-mixture", "weights": "none",
                       "weights_sha256": "0" * 64, "transform": {}, "root": str(path.parent)})
    src.unlink()
    return y


def sklearn_sweep(cache_path: Path, grid: list[float], seed: int, val_split: float,
                  warm_start: bool = False) -> tuple[float, float, float]:
    """The usual scikit-learn probe (CLIP's protocol): a LogisticRegression(max_iter=1000) per C.

    ``warm_start=True`` reuses one estimator along the ascending grid, as an expert would.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    with featbank.open_cache(cache_path) as c:
        X, y, s = c.load_embeddings(), c.labels, c.splits
    pool, test = np.flatnonzero(s == 0), np.flatnonzero(s == 2)
    tr, va = train_test_split(pool, test_size=int(round(val_split * len(pool))), random_state=seed, stratify=y[pool])
    sc = StandardScaler().fit(X[tr])
    Xtr, Xva = sc.transform(X[tr]), sc.transform(X[va])
    best, best_acc = None, -1.0
    clf = LogisticRegression(max_iter=1000, warm_start=True)
    for C in sorted(grid):
        if not warm_start:
            clf = LogisticRegression(C=C, max_iter=1000)
        clf.set_params(C=C).fit(Xtr, y[tr])
        acc = clf.score(Xva, y[va])
        if acc > best_acc:
            best, best_acc = C, acc
    sc = StandardScaler().fit(X[pool])
    final = LogisticRegression(C=best, max_iter=1000).fit(sc.transform(X[pool]), y[pool])
    acc = final.score(sc.transform(X[test]), y[test])
    return time.perf_counter() - t0, acc, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None,
                    help="a real featbank cache with train/test splits instead of the Gaussian mixture, e.g. "
                    "Fashion-MNIST embedded with efficientnet_lite0 (see the module docstring)")
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--sklearn-warm-start", action="store_true",
                    help="also time scikit-learn with one warm-started estimator along the grid")
    args = ap.parse_args()
    # Import everything both sides use before any clock starts: the comparison is of fitting.
    import sklearn.linear_model  # noqa: F401
    import torch  # noqa: F401

    import featbank.fitting  # noqa: F401
    import featbank.heads  # noqa: F401
    import featbank.report  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp:
        path = args.cache or Path(tmp) / "bench.h5"
        if args.cache is None:
            make_cache(path, args.n, args.dim, args.classes, args.seed)
        else:
            with featbank.open_cache(path) as c:
                args.n, args.dim, args.classes = c.n_samples, c.embed_dim, c.n_classes
            print(f"real embeddings: {path}")
        t0 = time.perf_counter()
        r = featbank.fit(path, "linear", device=args.device, seed=args.seed, save=False)
        t_fb = time.perf_counter() - t0
        tried = [row["C"] for row in r.sweep]
        # featbank's grid: the coarse grid plus the refinement points around the best; featbank
        # itself stops the coarse sweep early once the validation curve has turned.
        refine = [c for c in tried if not any(np.isclose(c, g, rtol=1e-6) for g in COARSE_GRID)]
        grid = sorted(set(COARSE_GRID) | set(refine))
        print(f"data: {args.n} x {args.dim}, {args.classes} classes; featbank's grid: {len(grid)} C values "
              f"{min(grid):.0e}..{max(grid):.0e}, of which featbank fitted {len(tried)}")
        print(f"featbank linear (sweep + refit): {t_fb:.2f} s, test top-1 {r.headline['top1']:.4f}, "
              f"chosen C {r.chosen['C']:.3g}")
        if args.skip_sklearn:
            return
        t_sk, acc_sk, c_sk = sklearn_sweep(path, grid, args.seed, 0.2)
        print(f"sklearn LogisticRegression(lbfgs, max_iter=1000), one per C of the same grid: {t_sk:.2f} s, "
              f"test top-1 {acc_sk:.4f}, chosen C {c_sk:.3g}")
        print(f"speed-up {t_sk / t_fb:.1f}x; accuracy difference {100 * (r.headline['top1'] - acc_sk):+.2f} pt "
              f"(targets: >= 10x, within 0.5 pt, featbank < 20 s)")
        if args.sklearn_warm_start:
            t_w, acc_w, c_w = sklearn_sweep(path, tried, args.seed, 0.2, warm_start=True)
            print(f"sklearn warm-started along only the {len(tried)} C values featbank fitted: {t_w:.2f} s, "
                  f"test top-1 {acc_w:.4f}, chosen C {c_w:.3g} (featbank {t_w / t_fb:.1f}x faster)")


if __name__ == "__main__":
    main()
