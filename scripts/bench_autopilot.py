"""``fit --auto`` against the default probe and the single routes of bench_probes.py, side by side, in one run.

For each data set (a cache extracted beforehand, see below), on the same cache:

- ``default``: the default probe (bench_probes' ``final``: ``--layers final --no-train-views --tta off``);
- the single routes of ``scripts/bench_probes.py`` named by ``--routes`` (each one fit, C chosen on
  one validation split; ``pooled-svm`` is bench_probes' ``pooled-svc`` by the ``svm-rbf`` family, C
  and the RBF width chosen by 5-fold CV with no time limit); "best route" is the one with the best *test* top-1 (an oracle: the
  ceiling a user who tried every route and peeked at test would report);
- ``auto``: ``featbank fit CACHE --auto`` (default budget, 5-fold CV, seed 0), bundle written.

Reports test top-1, balanced accuracy, the 95% bootstrap interval of test top-1 (1000 resamples,
seeded; the same for every row) and fit seconds, then checks the targets of issue #21: ELPV
4-class ``--auto`` top-1 >= 0.80 with the whole fit <= 120 s; everywhere ``--auto`` >= default - 0.5
pt and within 1 pt of the best route.

ELPV 2-class is the ELPV 4-class cache relabelled in memory (probability >= 0.5 -> defective), the
labels of ``/work``-style ``elpv2`` folders made by ``prepare_data.py elpv --classes 2``.

Examples:
    python scripts/bench_autopilot.py --cache elpv4=runs/elpv4-lite0@300-all-dihedral7.h5 \\
        --cache elpv2=runs/elpv4-lite0@300-all-dihedral7.h5 --cache digits=runs/digits.h5 --json out.json
    python scripts/bench_autopilot.py --cache lfw=runs/lfw.h5 --routes final,layers,views,pooled
    python scripts/bench_autopilot.py --cache elpv4=runs/elpv4-lite0@300-all-max-dihedral7.h5 \\
        --routes final,pooled,pooled-svm   # extracted with --pooling gap+2x2+max
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import featbank
from featbank.fitting import bootstrap_interval

ROUTES = {  # scripts/bench_probes.py PROBES
    "final": dict(layers="final", train_views=False, tta="off"),
    "layers": dict(layers="auto", train_views=False, tta="off"),
    "views": dict(layers="final", train_views=True, tta="auto"),
    "both": dict(layers="auto", train_views=True, tta="auto"),
    "layers-svc": dict(head="SVC", layers="stage3-final", train_views=False, tta="off"),
    "pooled": dict(layers="final", pool_views=True),
    "pooled-svc": dict(head="SVC", layers="stage3-final", pool_views=True),
    # pooled-svc by the svm-rbf family (one kernel per fold for every C and width), its grid by 5-fold CV:
    # the same route in seconds instead of the 726-2,412 s C sweep of scikit-learn's SVC
    "pooled-svm": dict(head="svm-rbf", layers="stage3-final", pool_views=True, cv=5, budget="30m"),
}
ELPV2_CLASSES = ["defective", "functional"]  # prepare_data.py elpv --classes 2: p >= 0.5 is defective


def open_dataset(name: str, path: Path) -> Any:
    """The open cache; ``elpv2`` is an ELPV 4-class cache whose labels are set to defective (p >= 0.5) or not."""
    cache = featbank.open_cache(path)
    if name == "elpv2" and len(cache.classes) == 4:
        prob = np.array([int(c.lstrip("p")) for c in cache.classes])  # p000, p033, p067, p100
        cache.labels = np.where(cache.labels < 0, -1, np.where(prob[cache.labels] >= 50, 0, 1)).astype(np.int64)
        cache.classes = list(ELPV2_CLASSES)
    return cache


def check_did_the_work(name: str, probe: str, res: Any, cache: Any) -> None:
    """No figure from a fit that did not fit: every test image scored, and ``--auto`` scored folds."""
    n_test = int(cache.split_mask("test").sum())
    if res.eval_split != "test" or res.headline.get("n_samples") != n_test or res.n_test != n_test:
        raise SystemExit(f"{name} {probe}: scored {res.headline.get('n_samples')} of {n_test} test images on split "
                         f"{res.eval_split!r}; no figure printed.")
    if probe == "auto" and not (res.search and res.search["n_scored"] >= 1 and res.search["n_fold_fits"] >= 1):
        raise SystemExit(f"{name} --auto: the search scored no candidate on any fold; no figure printed.")


def row_of(name: str, probe: str, res: Any, seconds: float, cache: Any) -> dict[str, Any]:
    check_did_the_work(name, probe, res, cache)
    test = res.headline
    y = cache.labels[cache.split_mask("test")]
    correct = np.zeros(len(y))
    correct[: int(round(test["top1"] * len(y)))] = 1  # the interval needs only how many were right
    lo, hi = test.get("top1_ci95") or bootstrap_interval(correct, seed=0)
    feats = res.metrics.get("features", {})
    what = (f"{res.head} {','.join(feats.get('layers', []))}" + (" pooled" if feats.get("view_pool") else "")
            + (" tta" if feats.get("tta") else ""))
    return {"dataset": name, "probe": probe, "what": what, "chosen": res.chosen, "test_top1": test["top1"],
            "test_balanced_acc": test["balanced_accuracy"], "ci95": [lo, hi], "fit_s": round(seconds, 1),
            "cv_mean": res.search["leaderboard"][0]["cv_mean"] if res.search else None,
            "search": {k: res.search.get(k) for k in ("n_scored", "n_candidates", "n_fold_fits", "seconds", "budget_s",
                                                      "prep_s", "load_s", "refit_s", "skipped", "rounds",
                                                      "calibration", "kernels", "leaderboard")} if res.search else None}


def run_dataset(name: str, path: Path, args: argparse.Namespace, out_dir: Path) -> list[dict[str, Any]]:
    rows = []
    cache = open_dataset(name, path)
    try:
        for probe in ["default", *[r for r in args.routes.split(",") if r and r != "final"], "auto"]:
            if probe in ("pooled", "pooled-svc", "pooled-svm") and not cache.n_views:
                continue
            t0 = time.perf_counter()
            if probe == "auto":
                res = featbank.fit(cache, auto=True, budget=args.budget, out=out_dir / f"{name}-auto", overwrite=True)
            else:
                res = featbank.fit(cache, **{"head": "linear", **ROUTES["final" if probe == "default" else probe]},
                                   save=False)
            rows.append(row_of(name, probe, res, time.perf_counter() - t0, cache))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "search"}), flush=True)
    finally:
        cache.close()
    return rows


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    notes = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        of = {r["probe"]: r for r in rows if r["dataset"] == name}
        auto, base = of["auto"], of["default"]
        best = max((r for p, r in of.items() if p != "auto"), key=lambda r: r["test_top1"])
        d_base = 100 * (auto["test_top1"] - base["test_top1"])
        d_best = 100 * (auto["test_top1"] - best["test_top1"])
        notes.append(f"{name}: auto {auto['test_top1']:.4f} vs default {base['test_top1']:.4f} ({d_base:+.1f} pt, "
                     f"target >= -0.5: {'MET' if d_base >= -0.5 else 'NOT met'}); vs best route {best['probe']} "
                     f"{best['test_top1']:.4f} ({d_best:+.1f} pt, target >= -1: {'MET' if d_best >= -1 else 'NOT met'})")
        if name == "elpv4":
            ok = auto["test_top1"] >= 0.80 and auto["fit_s"] <= 120
            notes.append(f"elpv4: auto top-1 {auto['test_top1']:.4f} in {auto['fit_s']} s (target >= 0.80 in <= 120 s: "
                         f"{'MET' if ok else 'NOT met'})")
    return notes



def _round_words(rnd: dict[str, Any]) -> str:
    """``6x5 folds``; a round whose folds were not all done, ``(cut short)``; round 1 on a sample, its rows."""
    words = f"{rnd['n_candidates']}x{rnd['n_folds']} folds"
    sample = rnd.get("sample")
    if sample:
        words += f" (sample of {sample['fit_rows']}/{sample['of_fit_rows']} fit rows)"
    return words + ("" if rnd.get("complete", True) else " (cut short)")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", action="append", default=[], metavar="NAME=PATH", required=True,
                    type=lambda t: (t.split("=", 1)[0], Path(t.split("=", 1)[1])),
                    help="a data set's cache (elpv2=<the elpv4 cache> relabels it); repeatable, run in order")
    ap.add_argument("--routes", default="final,layers,views,pooled,pooled-svm", help=f"bench_probes routes: {','.join(ROUTES)}")
    ap.add_argument("--budget", default=None, help="--budget of --auto (default: fit's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in args.cache:
            rows += run_dataset(name, path, args, Path(tmp))
    print("\n| data | probe | what | chosen | test top-1 | 95% interval | test bal. acc | CV | fit s |\n|" + "---|" * 9)
    for r in rows:
        chosen = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["chosen"].items())
        cv = f"{r['cv_mean']:.4f}" if r["cv_mean"] is not None else "—"
        print(f"| {r['dataset']} | {r['probe']} | {r['what']} | {chosen or '—'} | {r['test_top1']:.4f} | "
              f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}] | {r['test_balanced_acc']:.4f} | {cv} | {r['fit_s']} |")
    for r in rows:
        if r["search"] and r["probe"] == "auto":
            s = r["search"]
            print(f"{r['dataset']} --auto: {s['n_scored']}/{s['n_candidates']} candidates scored, {s['n_fold_fits']} "
                  f"candidate-folds, search {s['seconds']:.1f} s of {s['budget_s']:.1f} s left after layer selection + "
                  f"load {s['prep_s']:.1f} s (load alone {s['load_s']:.1f} s), refit {s['refit_s']:.1f} s, "
                  f"{len(s['skipped'])} skipped for budget; rounds " + ", ".join(
                      _round_words(x) for x in s["rounds"])
                  + "; measured/estimated speed " + ", ".join(f"{f} {v:.2g}" for f, v in s["calibration"].items())
                  + "; Gram matrices {computed} computed, {reused} reused".format(**(s.get("kernels") or
                                                                                    {"computed": 0, "reused": 0})))
    notes = check_targets(rows)
    for note in notes:
        print(note)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "targets": notes}, indent=2, default=str))


if __name__ == "__main__":
    main()
