"""Benchmark of ``featbank audit``: label errors, near-duplicates across splits, and scale.

Three parts, each in one run with its comparison side by side:

* **Label errors** (``labels``): a labelled cache (Fashion-MNIST 10k, efficientnet_lite0, final
  layer) with 5% of its labels flipped at random (seeded). Precision, recall and F1 of the flagged
  set against the flips, for featbank (out-of-fold LinearHead probabilities + its own confident
  learning) and for cleanlab's ``find_label_issues`` fed by scikit-learn ``cross_val_predict``
  probabilities of a ``LogisticRegression`` on the same features (cleanlab's documented workflow;
  ``pip install cleanlab``); seconds of each.
* **Near-duplicates** (``dups``): 200 training images of an ImageFolder with train/test splits
  copied into test with realistic changes (JPEG quality 30, 0.8x resize, 90% centre crop, a small
  brightness shift). ``prepare-dups`` writes that folder; extract it with ``featbank extract``.
  Recall and precision of the planted cross-split pairs found, at the default threshold and over a
  sweep; the threshold that would be chosen on half the planted pairs, checked on the other half.
* **Scale** (``scale``): a synthetic N x 1280 float16 cache written part by part with planted
  near-duplicate pairs; all pairs found?, seconds, peak RSS (run it for several N: RSS flat in N).

    python scripts/bench_audit.py prepare-dups /work/data/elpv4 data/elpv-dups
    featbank extract data/elpv-dups --out runs/elpv-dups.h5
    python scripts/bench_audit.py dups runs/elpv-dups.h5
    python scripts/bench_audit.py labels runs/fmnist10k.h5
    python scripts/bench_audit.py scale --n 100000 --dir runs/scale
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np

N_PLANTED = 200


# ------------------------------------------------------------------------------------------------
# Near-duplicate folder
# ------------------------------------------------------------------------------------------------


def _degrade(path: Path, rng: np.random.Generator) -> bytes:
    """JPEG q=30 bytes of the image after a 90% centre crop, a 0.8x resize and a brightness shift."""
    from PIL import Image, ImageEnhance

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        cw, ch = int(w * 0.9), int(h * 0.9)
        left, top = (w - cw) // 2, (h - ch) // 2
        im = im.crop((left, top, left + cw, top + ch))
        im = im.resize((max(1, int(cw * 0.8)), max(1, int(ch * 0.8))), Image.BILINEAR)
        im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.9, 1.1)))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=30)
        return buf.getvalue()


def prepare_dups(src: Path, dst: Path, n: int = N_PLANTED, seed: int = 0) -> Path:
    """Copy ``src`` (train/ and test/ ImageFolders) to ``dst`` and plant ``n`` degraded copies of
    training images in test/ (same class). Writes ``dst/../<name>-planted.json``: [[train, test], ...]."""
    if dst.exists():
        raise SystemExit(f"{dst} exists; remove it first.")
    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    train = sorted(p for p in (dst / "train").rglob("*") if p.is_file())
    pairs = []
    for i in sorted(rng.choice(len(train), n, replace=False)):
        p = train[int(i)]
        rel = p.relative_to(dst / "train")
        out = dst / "test" / rel.parent / f"planted_{p.stem}.jpg"
        out.write_bytes(_degrade(p, rng))
        pairs.append([str(p.relative_to(dst)), str(out.relative_to(dst))])
    planted = dst.with_name(dst.name + "-planted.json")
    planted.write_text(json.dumps(pairs, indent=1))
    return planted


def _main_prepare(args: argparse.Namespace) -> None:
    planted = prepare_dups(Path(args.src), Path(args.dst), args.n, args.seed)
    print(f"wrote {args.dst} and {planted}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-dups")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--n", type=int, default=N_PLANTED)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_main_prepare)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
