"""Benchmark the transfer strategies on ELPV 4-class: linear probe vs partial vs full vs LP-FT.

ELPV (Deitsch et al. 2019) is split 70/30, stratified, seed 0 (scripts/prepare_data.py elpv OUT
--split 70-30); the probe holds out 20% of train for its C sweep and is refitted on all of train
(the baseline row); fine-tuning holds out a stratified --val-split of train for the best epoch;
LP-FT starts from a second probe fitted with --no-refit and validates on the images that probe held
out, so its best epoch is chosen on images neither the probe nor the fine-tuning has trained on.
Every method is scored on the same 30% test split. The fine-tuning methods get the same epoch budget
(no early stopping: --patience 0, the best validation epoch is kept).
Published reference: fine-tuned VGG-19 88.42% (4 classes, ~75/25).

Printed per method: test accuracy, balanced accuracy, seconds per epoch, total seconds; then
LP-FT minus probe in points (target: >= +5).

Examples:
    python scripts/bench_finetune.py --device cuda                 # the full benchmark on a GPU
    python scripts/bench_finetune.py --limit 60 --epochs 1         # a CPU smoke run
    python scripts/bench_finetune.py --data data/elpv-70-30 --methods probe,lpft --epochs 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
METHODS = ("probe", "frozen", "partial", "full", "lpft")


def _prepare(workdir: Path, limit: int | None) -> Path:
    out = workdir / (f"elpv-70-30-limit{limit}" if limit else "elpv-70-30")
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "elpv", str(out), "--split", "70-30", "--seed", "0"]
    if limit:
        cmd += ["--limit", str(limit)]
    subprocess.run(cmd, check=True)
    return out


def _scores(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    return float(accuracy_score(y, pred)), float(balanced_accuracy_score(y, pred))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Examples:")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="a prepared ELPV folder with train/ and test/ "
                   "(default: build <workdir>/elpv-70-30 with scripts/prepare_data.py)")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench-finetune"))
    p.add_argument("--limit", type=int, default=None, help="use a stratified subset of N images (smoke runs)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr-groups", default="seed", help="per-group rates for partial/full/LP-FT (default: the seed table)")
    p.add_argument("--layer-decay", type=float, default=None,
                   help="geometric per-group rates below the head (instead of --lr-groups)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float, default=None, help="rate of groups --lr-groups does not set (--lr-groups none: all)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.25, 1.0), metavar=("MIN", "MAX"))
    p.add_argument("--vflip", action="store_true", help="random vertical flips too")
    p.add_argument("--rot90", action="store_true", help="random multiples of 90 degrees too")
    p.add_argument("--trainable-from", default=None,
                   help="first trainable group of partial (and of LP-FT with --lpft-strategy partial)")
    p.add_argument("--lpft-strategy", default="full", choices=["full", "partial"], help="what LP-FT trains after the probe")
    p.add_argument("--cache-frozen", action="store_true", help="partial / LP-FT partial: cache the frozen groups' outputs")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--val-split", type=float, default=0.2, help="fraction of train held out by partial/full/frozen")
    p.add_argument("--metric", default="balanced_accuracy", choices=["balanced_accuracy", "accuracy"],
                   help="validation metric that picks the best epoch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--methods", default="probe,partial,full,lpft", help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    import featbank
    import featbank.finetuning as ft
    from featbank.bundles import load_bundle
    from featbank.fitting import fit

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if "lpft" in methods and "probe" not in methods:
        methods.insert(0, "probe")
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.data or _prepare(args.workdir, args.limit)
    index = featbank.scan_folder(data)
    n_train, n_test = int((index.splits == 0).sum()), int((index.splits == 2).sum())
    print(f"data: {data} ({len(index)} images: {n_train} train, {n_test} test; classes {index.classes})")
    print(f"backbone {args.backbone}, {args.epochs} epoch(s), batch {args.batch_size}, lr-groups {args.lr_groups}, "
          f"layer decay {args.layer_decay}, optimizer {args.optimizer}, lr {args.lr}, "
          f"crop scale {tuple(args.crop_scale)}, vflip {args.vflip}, "
          f"rot90 {args.rot90}, trainable from {args.trainable_from}, LP-FT {args.lpft_strategy}, cache frozen "
          f"{args.cache_frozen}, device {args.device}\n", flush=True)

    rows: list[dict] = []
    probe_path = None
    if "probe" in methods:
        t0 = time.perf_counter()
        rep = featbank.extract(data, args.workdir / f"{data.name}-{args.backbone}.h5", backbone=args.backbone,
                               device=args.device, num_workers=args.num_workers, batch_size=64, progress=False)
        t_extract = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = fit(rep.path, "linear", out=args.workdir / "models" / f"probe-{data.name}", device=args.device,
                  class_weight=None)
        t_fit = time.perf_counter() - t0
        probe_path = Path(res.path)
        cache = featbank.open_cache(rep.path)
        test = cache.split_mask("test")

        def test_scores(bundle_path: Path) -> tuple[float, float]:
            proba = load_bundle(bundle_path).predict_proba(cache.load_embeddings(np.flatnonzero(test)))
            return _scores(cache.labels[test], proba.argmax(1))

        acc, bal = test_scores(probe_path)
        rows.append({"method": "probe (fit --head linear)", "accuracy": acc, "balanced_accuracy": bal,
                     "s_per_epoch": None, "seconds": t_extract + t_fit, "note": f"extract {t_extract:.0f}s + fit {t_fit:.1f}s"})
        print(f"probe: acc {acc:.4f} bal {bal:.4f} ({t_extract:.0f}s extract, {t_fit:.1f}s fit)", flush=True)
        if "lpft" in methods:  # LP-FT's start: the same probe, not refitted on its validation images
            t0 = time.perf_counter()
            probe_path = Path(fit(rep.path, "linear", out=args.workdir / "models" / f"probe-norefit-{data.name}",
                                  device=args.device, class_weight=None, refit=False).path)
            t_fit = time.perf_counter() - t0
            acc, bal = test_scores(probe_path)
            rows.append({"method": "probe --no-refit", "accuracy": acc, "balanced_accuracy": bal, "s_per_epoch": None,
                         "seconds": t_fit, "note": "LP-FT's start; 80% of train"})
            print(f"probe --no-refit: acc {acc:.4f} bal {bal:.4f}", flush=True)

    lr_groups = None if args.lr_groups == "none" else args.lr_groups
    common = dict(optimizer=args.optimizer, lr=args.lr, crop_scale=tuple(args.crop_scale), vflip=args.vflip, rot90=args.rot90,
                  weight_decay=args.weight_decay, metric=args.metric, layer_decay=args.layer_decay)
    partial = dict(strategy="partial", trainable_from=args.trainable_from, cache_frozen=args.cache_frozen)
    runs = {
        "frozen": dict(strategy="frozen"),
        "partial": dict(lr_groups=lr_groups, **partial),
        "full": dict(strategy="full", lr_groups=lr_groups),
        "lpft": dict(lr_groups=lr_groups, init_head=str(probe_path) if probe_path else None,
                     **(partial if args.lpft_strategy == "partial" else dict(strategy="full"))),
    }
    for m in methods:
        if m == "probe":
            continue
        t0 = time.perf_counter()
        rep = ft.finetune(data, args.workdir / "models" / f"{m}-{data.name}", overwrite=True, device=args.device,
                          num_workers=args.num_workers, progress=False, backbone=args.backbone, epochs=args.epochs,
                          batch_size=args.batch_size, val_split=args.val_split, patience=0, seed=0, **common, **runs[m])
        total = time.perf_counter() - t0
        trainable = next(g["name"] for g in rep.groups if g["trainable"])
        rows.append({"method": m if m != "lpft" else f"LP-FT ({args.lpft_strategy} from probe)", "accuracy": rep.test["accuracy"],
                     "balanced_accuracy": rep.test["balanced_accuracy"], "s_per_epoch": rep.seconds_per_epoch,
                     "seconds": total, "note": f"best epoch {rep.best_epoch}/{rep.epochs_run}, trains from {trainable}"
                     + (f", frozen groups cached in {rep.cache_seconds:.0f}s" if rep.cache_seconds else "")})
        print(f"{m}: acc {rep.test['accuracy']:.4f} bal {rep.test['balanced_accuracy']:.4f} "
              f"({rep.seconds_per_epoch:.1f} s/epoch, {total:.0f}s)", flush=True)
        for n in rep.notes:
            print(f"  note: {n}", flush=True)

    print(f"\n{'method':<26} {'accuracy':>9} {'bal.acc':>8} {'s/epoch':>8} {'total s':>8}  note")
    for r in rows:
        spe = f"{r['s_per_epoch']:.1f}" if r["s_per_epoch"] is not None else "-"
        print(f"{r['method']:<26} {r['accuracy']:>9.4f} {r['balanced_accuracy']:>8.4f} {spe:>8} "
              f"{r['seconds']:>8.0f}  {r['note']}")
    by = {r["method"].split()[0]: r for r in rows if r["method"] != "probe --no-refit"}
    if "probe" in by and "LP-FT" in by:
        d = 100 * (by["LP-FT"]["accuracy"] - by["probe"]["accuracy"])
        print(f"\nLP-FT - probe: {d:+.1f} accuracy points (target >= +5); published fine-tuned VGG-19: 88.42%")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
