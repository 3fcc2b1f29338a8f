"""``fit --auto``'s Gram-sharing search with and without per-layer blocks, side by side in one run.

The same candidates (every feature set ``fit --auto`` would try but the greedy ``auto`` one,
every view handling, every preprocessing, the three families that share a Gram matrix: ``svm-rbf``,
``svm-linear``, ``knn``), the same folds, an unbounded budget: so both runs score every candidate
on fold 1 and the best third on the rest of one repeat. Runs alternate (blocks, none, none,
blocks, ...) so the CPU's drift falls on both; each run's work is checked equal (the same
candidates on the same number of folds) before a ratio is printed. No test row is read.

    python scripts/bench_gram_blocks.py --cache elpv4=/work/data/caches/elpv4.h5 --repeat 2

Prints, per cache, each run's seconds, the Gram statistics and ``none / blocks``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from featbank.cache import open_cache
from featbank.fitting import AutoSearch, Candidate, column_blocks, feature_matrices, spans, split_rows
from featbank.fitting._auto import SPAN_NAMES, search_threads
from featbank.heads import PREPROCESSES, get_head_family

FAMILIES = ("svm-rbf", "svm-linear", "knn")


def _setup(path: str, seed: int):
    cache = open_cache(path)
    train, val, _test, _ = split_rows(cache, 0.2, seed)
    pool = np.sort(np.concatenate([train, val]))  # train+val only
    held = tuple(cache.layers)
    sets = {"final": ("final",), **spans(held), "all": held}
    sets = {k: v for i, (k, v) in enumerate(sets.items()) if v not in list(sets.values())[:i]}
    views = ["plain", "pooled"] if cache.n_views else ["plain"]
    cands = [Candidate(name, ls, v, p, h, tier=int(name in SPAN_NAMES)) for name, ls in sets.items()
             for v in views for p in PREPROCESSES for h in FAMILIES]
    keys = [c.key for c in cands]
    return cands, feature_matrices(cache, keys, pool), column_blocks(cache, keys), cache.labels[pool]


def _run(cands, data, blocks, y, cv: int, seed: int) -> tuple[float, AutoSearch]:
    fams = {n: get_head_family(n) for n in FAMILIES}
    t0 = time.perf_counter()
    search = AutoSearch(cands, fams, cv=cv, repeats=1, budget_s=1e9, seed=seed).fit(data, y, blocks)
    return time.perf_counter() - t0, search


def _work(search: AutoSearch) -> list[tuple[str, int]]:
    return sorted((f"{r['features']}/{r['views']}/{r['preprocessing']}/{r['head']}", r["n_folds"])
                  for r in search.leaderboard())


def bench(name: str, path: str, repeat: int, cv: int, seed: int) -> dict:
    cands, data, blocks, y = _setup(path, seed)
    times: dict[str, list[float]] = {"blocks": [], "none": []}
    stats, works, boards = {}, {}, {}
    order = [m for i in range(repeat) for m in (("blocks", "none") if i % 2 == 0 else ("none", "blocks"))]
    with search_threads():
        for mode in order:
            seconds, search = _run(cands, data, blocks if mode == "blocks" else None, y, cv, seed)
            work = _work(search)
            assert len(work) == len(cands), f"{name} {mode}: {len(work)} of {len(cands)} candidates scored"
            assert works.setdefault(mode, work) == work, f"{name} {mode}: the runs of one mode did different work"
            times[mode].append(seconds)
            stats[mode] = search.kernels_
            boards[mode] = [(r["cv_mean"], r["features"], r["views"], r["preprocessing"], r["head"])
                            for r in search.leaderboard()]
            print(f"{name} {mode:6} {seconds:6.1f} s  {len(work)} candidates, "
                  f"{sum(n for _, n in work)} candidate-folds; Gram {search.kernels_}", flush=True)
    assert works["blocks"] == works["none"], f"{name}: blocks and none scored different candidates or folds"
    gap = max(abs(a[0] - b[0]) for a, b in zip(boards["blocks"], boards["none"], strict=True))
    same = [b[1:] for b in boards["blocks"]] == [b[1:] for b in boards["none"]]
    ratio = float(np.median(times["none"]) / np.median(times["blocks"]))
    print(f"{name}: none / blocks = {ratio:.2f} (medians {np.median(times['none']):.1f} s / "
          f"{np.median(times['blocks']):.1f} s over {repeat} runs each); leaderboards "
          f"{'identical in order' if same else 'reordered'}, largest CV mean difference {gap:.2g}", flush=True)
    return {"cache": name, "seconds": times, "ratio_none_over_blocks": ratio, "kernels": stats,
            "n_candidates": len(cands), "same_order": same, "max_cv_gap": gap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", action="append", default=[], metavar="NAME=PATH", required=True)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each mode (alternating)")
    ap.add_argument("--cv", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for spec in args.cache:
        if "=" not in spec:
            ap.error(f"--cache takes NAME=PATH; got {spec!r}")
        name, path = spec.split("=", 1)
        rows.append(bench(name, path, args.repeat, args.cv, args.seed))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
