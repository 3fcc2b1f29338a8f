"""The RBF SVM's C sweep from one kernel matrix vs today's route (one libsvm SVC fit per C), side by side.

Rows as ``featbank fit CACHE --head SVC --layers stage3-final --pool-views`` makes them: the cache's
layers pooled as [mean | max] over the views, the stratified 20% validation split of train (seed 0),
each side standardising on the training rows. Today's route (``fit``'s scikit-learn sweep) fits
``StandardScaler + SVC(C, gamma="scale")`` per C on the coarse grid (0.01 .. 100), then half a decade
either side of the best, scoring on validation; the kernel sweep (the ``svm-rbf`` head family)
computes one Gram matrix with BLAS and fits ``SVC(kernel="precomputed")`` for every half decade
10^-2.5 .. 10^2.5 (a superset), then applies the same rule. Both choose C, then the chosen C is
refitted on train+val (``KernelSVC``; with ``--refit-svc`` also a real ``SVC``) and scored on test.

``--max-c-fits N`` caps the slow side at its first N fits (minutes each on 12,560 features); its
full time is then extrapolated from the mean per fit, and the chosen C cannot be compared (the
validation scores of the C values both sides ran must be equal).

    python scripts/bench_svm_sweep.py --cache /path/elpv4-lite0@300-all-dihedral7.h5 --max-c-fits 2
    python scripts/bench_svm_sweep.py --synthetic --max-c-fits 1     # no cache: a random 2,624 x 12,560 X
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from featbank.heads import SKLEARN_C_GRID, KernelSVC, estimator_proba, get_head_family

COARSE = tuple(float(c) for c in SKLEARN_C_GRID)
REFINE = (-0.5, 0.5)


def load_rows(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, train, val, test) as fit builds them."""
    if args.synthetic:
        rng = np.random.default_rng(0)
        (n, d), k = args.shape, 4
        y = rng.integers(0, k, n)
        X = (rng.normal(size=(n, d)) + 0.05 * rng.normal(size=(k, d))[y]).astype(np.float32)
        idx = rng.permutation(n)
        a, b = int(0.56 * n), int(0.7 * n)  # ELPV's 1,469 / 367 / 788 of 2,624
        return X, y, idx[:a], idx[a:b], idx[b:]
    import featbank
    from featbank.fitting._layers import FeatureTable, resolve_layers
    from featbank.fitting._rows import split_rows

    with featbank.open_cache(args.cache) as c:
        table = FeatureTable(c, resolve_layers(args.layers, c), train_views=False, pooled=not args.no_pool_views)
        train, val, test, _ = split_rows(c, args.val_split, args.seed)
        return table.load_embeddings(np.arange(c.n_samples)), np.asarray(c.labels), train, val, test


def choose(scores: dict[float, float]) -> float:
    """fit's rule: the best coarse C (ties to the smaller C), then the best of it and its refinements."""
    def best(cs: list[float]) -> float:
        return max(cs, key=lambda c: (round(scores[c], 12), -c))

    top = best([c for c in scores if any(np.isclose(c, g) for g in COARSE)])
    near = [c for c in scores if any(np.isclose(c, top * 10**d) for d in (0.0, *REFINE))]
    return best(near)


def slow_sweep(X: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, cap: int | None
               ) -> tuple[dict[float, float], list[float], list[float], bool]:
    """Today's route: one StandardScaler + SVC fit per C on train, scored on val; (scores, wall and CPU
    seconds per fit, complete)."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    scores: dict[float, float] = {}
    secs: list[float] = []
    cpu: list[float] = []

    def run(C: float) -> bool:
        if any(np.isclose(C, c) for c in scores):
            return True
        if cap is not None and len(secs) >= cap:
            return False
        t0, c0 = time.perf_counter(), time.process_time()
        est = Pipeline([("scale", StandardScaler()), ("clf", SVC(C=C))]).fit(X[train], y[train])
        secs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        scores[C] = float(np.mean(estimator_proba(est, X[val]).argmax(1) == y[val]))
        print(f"  SVC C={C:<8.4g} {secs[-1]:8.1f} s ({cpu[-1]:.1f} s of CPU)  val {scores[C]:.4f}", flush=True)
        return True

    # C=10 (chosen on validation in docs/benchmarks.md, probes table) first, so that a capped run
    # still compares the C that matters.
    complete = all([run(C) for C in sorted(COARSE, key=lambda c: (c != 10.0, c))])
    if complete:
        top = max((c for c in scores if any(np.isclose(c, g) for g in COARSE)), key=lambda c: (round(scores[c], 12), -c))
        complete = all([run(float(top * 10**d)) for d in REFINE])
    return scores, secs, cpu, complete


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/work/data/caches/elpv4-lite0@300-all-dihedral7.h5")
    ap.add_argument("--synthetic", action="store_true", help="a random X (--shape) instead of a cache")
    ap.add_argument("--shape", type=int, nargs=2, default=(2624, 12560), metavar=("N", "D"))
    ap.add_argument("--layers", default="stage3-final")
    ap.add_argument("--no-pool-views", action="store_true")
    ap.add_argument("--val-split", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-c-fits", type=int, default=None, help="cap today's route at N SVC fits (0: skip it)")
    ap.add_argument("--refit-svc", action="store_true", help="also refit a real SVC on train+val at the chosen C")
    ap.add_argument("--cv", type=int, default=0, help="also time the svm-rbf family's default grid by K-fold CV")
    args = ap.parse_args()

    X, y, train, val, test = load_rows(args)
    print(f"rows: {len(train)} train / {len(val)} val / {len(test)} test, {X.shape[1]} features")
    fam = get_head_family("svm-rbf")
    Cs = [float(c) for c in 10 ** np.arange(-2.5, 2.51, 0.5)]
    t0, c0 = time.perf_counter(), time.process_time()
    table = fam.cv_scores(X, y, [(train, val)], [{"C": c, "gamma_scale": 1.0} for c in Cs])[:, 0]
    fast_s, fast_cpu = time.perf_counter() - t0, time.process_time() - c0
    fast = dict(zip(Cs, table.tolist(), strict=True))
    assert len(fast) == 11 and np.ptp(table) > 0, "the kernel sweep did not score 11 different settings"
    c_fast = choose(fast)
    print(f"kernel sweep: {len(Cs)} C values in {fast_s:.1f} s ({fast_cpu:.1f} s of CPU), "
          f"chosen C={c_fast:.4g} (val {fast[c_fast]:.4f})")
    for c in Cs:
        print(f"  C={c:<8.4g} val {fast[c]:.4f}")

    if args.max_c_fits != 0:
        compare(X, y, train, val, args, fast, fast_s, fast_cpu, c_fast)
    refit(X, y, train, val, test, args, fam, c_fast)


def compare(X: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, args: argparse.Namespace,
            fast: dict[float, float], fast_s: float, fast_cpu: float, c_fast: float) -> None:
    """Today's route beside the kernel sweep: equal validation scores, the ratio, the same chosen C."""
    Cs = list(fast)
    print("today's route (one SVC fit per C):", flush=True)
    slow, secs, cpu, complete = slow_sweep(X, y, train, val, args.max_c_fits)
    assert secs, "today's route ran no fit"
    for c, v in slow.items():  # the same C on the same rows: the same validation score
        match = next(f for f in Cs if np.isclose(f, c))
        assert abs(fast[match] - v) <= 1.0 / len(val) + 1e-12, (c, fast[match], v)
    n_today = len(COARSE) + len(REFINE)
    slow_total = sum(secs) if complete else float(np.mean(secs)) * n_today
    slow_cpu = sum(cpu) if complete else float(np.mean(cpu)) * n_today
    how = "measured" if complete else f"extrapolated from {len(secs)} fit(s) x {n_today}"
    print(f"today's route: {slow_total:.1f} s, {slow_cpu:.1f} s of CPU ({how}); ratio {slow_total / fast_s:.1f}x "
          f"wall, {slow_cpu / fast_cpu:.1f}x CPU")
    if complete:
        c_slow = choose(slow)
        assert np.isclose(c_slow, c_fast), (c_slow, c_fast)
        print(f"same chosen C: {c_slow:.4g}")


def refit(X: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, test: np.ndarray,
          args: argparse.Namespace, fam: Any, c_fast: float) -> None:
    """The chosen C refitted on train+val and scored on test (and the K-fold CV of the default grid)."""
    pool = np.concatenate([train, val])
    t0, c0 = time.perf_counter(), time.process_time()
    est = fam.build({"C": c_fast, "gamma_scale": 1.0}).fit(X[pool], y[pool])
    refit_s, refit_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    pred = estimator_proba(est, X[test]).argmax(1)
    print(f"refit KernelSVC on train+val: {refit_s:.1f} s ({refit_cpu:.1f} s of CPU), test top-1 "
          f"{np.mean(pred == y[test]):.4f} (scoring {len(test)} rows: {time.perf_counter() - t0:.1f} s)")
    assert isinstance(est[-1], KernelSVC)
    if args.refit_svc:
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        t0 = time.perf_counter()
        ref = Pipeline([("scale", StandardScaler()), ("clf", SVC(C=c_fast))]).fit(X[pool], y[pool])
        ref_s = time.perf_counter() - t0
        ref_pred = estimator_proba(ref, X[test]).argmax(1)
        print(f"refit SVC on train+val: {ref_s:.1f} s, test top-1 {np.mean(ref_pred == y[test]):.4f}; "
              f"predictions equal on {np.mean(ref_pred == pred):.4f} of test; refit ratio {ref_s / refit_s:.1f}x")
    if args.cv:
        from sklearn.model_selection import StratifiedKFold

        folds = [(pool[a], pool[b]) for a, b in StratifiedKFold(args.cv, shuffle=True, random_state=0).split(pool, y[pool])]
        grid = fam.default_grid(len(pool), X.shape[1], len(np.unique(y)))
        t0 = time.perf_counter()
        s = fam.cv_scores(X, y, folds, grid)
        cv_s = time.perf_counter() - t0
        best = int(np.argmax(s.mean(1)))
        print(f"{args.cv}-fold CV of the default grid ({len(grid)} settings): {cv_s:.1f} s "
              f"(relative_cost estimate {args.cv * fam.relative_cost(len(folds[0][0]), X.shape[1], len(grid)):.1f} s); "
              f"best {grid[best]} CV {s[best].mean():.4f} ± {s[best].std():.4f}")


if __name__ == "__main__":
    main()
