"""Benchmark of ``featbank audit``: label errors, near-duplicates across splits, and scale.

Three parts, each in one run with its comparison side by side:

* **Label errors** (``labels``): a labelled cache (Fashion-MNIST 10k, efficientnet_lite0, final
  layer) with 5% of its labels flipped at random (seeded). Precision, recall and F1 of the flagged
  set against the flips, for featbank (out-of-fold LinearHead probabilities + its own confident
  learning) and for cleanlab's ``find_label_issues`` fed by scikit-learn ``cross_val_predict``
  probabilities of a ``LogisticRegression`` on the same features (cleanlab's documented workflow;
  ``pip install cleanlab``); seconds of each.
* **Near-duplicates** (``dups``): 200 training images of an ImageFolder with train/test splits
  copied into test with realistic changes: ``--mode single`` gives each copy one of JPEG quality 30,
  a 0.8x resize, a 90% centre crop or a brightness shift of 5-10% (50 each); ``--mode all`` applies
  the four to every copy. ``prepare-dups`` writes that folder; extract it with ``featbank extract
  --layers all``. Every method's cross-split pairs are scored strictly (any pair that is not a
  planted one is a false positive): featbank's cosine (final layer, stage6) and its pixel
  verification (``--verify pixels``), beside imagededup's PHash, DHash and CNN (the offline
  EfficientNet-Lite0 wrapped as an imagededup ``CustomModel``; its own CNN downloads weights). The
  threshold is chosen on half of the planted pairs (highest recall at precision >= 0.95) and
  checked on the other half; recall per change at that threshold.
* **Scale** (``scale``): a synthetic N x 1280 float16 cache written part by part with 1,000 planted
  near-duplicate pairs (cosine ~0.97), audited with ``--search ivf``; pairs found, seconds, peak
  RSS (run it for N = 10^5 and 10^6: RSS nearly flat in N). The synthetic cache is deleted after.

    python scripts/bench_audit.py prepare-dups data/elpv4 data/elpv-dups --mode single
    featbank extract data/elpv-dups --out runs/elpv-dups.h5 --layers all
    python scripts/bench_audit.py dups runs/elpv-dups.h5 data/elpv-dups-planted.json --root data/elpv-dups
    python scripts/bench_audit.py labels runs/fmnist10k.h5
    python scripts/bench_audit.py scale --n 1000000 --workdir runs/scale
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np

N_PLANTED = 200


# ------------------------------------------------------------------------------------------------
# Near-duplicate folder
# ------------------------------------------------------------------------------------------------


#: The changes of a planted copy: ``all`` applies the four in turn to every copy; ``single`` gives each
#: copy one of them (the n copies split evenly between the four).
PLANT_MODES = ("single", "all")
SINGLE_CHANGES = ("jpeg", "resize", "crop", "bright")


def _degrade(path: Path, rng: np.random.Generator, changes: tuple[str, ...]) -> tuple[bytes, str]:
    """(bytes, suffix) of the image after ``changes`` in the order crop 90% (centre), resize 0.8x,
    brightness x U(0.9, 1.1), JPEG quality 30; PNG when JPEG is not among the changes."""
    from PIL import Image, ImageEnhance

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if "crop" in changes:
            cw, ch = int(w * 0.9), int(h * 0.9)
            left, top = (w - cw) // 2, (h - ch) // 2
            im = im.crop((left, top, left + cw, top + ch))
        if "resize" in changes:
            im = im.resize((max(1, int(im.width * 0.8)), max(1, int(im.height * 0.8))), Image.BILINEAR)
        if "bright" in changes:
            f = float(rng.uniform(0.05, 0.1)) * (1 if rng.random() < 0.5 else -1)
            im = ImageEnhance.Brightness(im).enhance(1.0 + f)
        buf = io.BytesIO()
        if "jpeg" in changes:
            im.save(buf, format="JPEG", quality=30)
            return buf.getvalue(), ".jpg"
        im.save(buf, format="PNG")
        return buf.getvalue(), ".png"


def prepare_dups(src: Path, dst: Path, n: int = N_PLANTED, seed: int = 0, mode: str = "all") -> Path:
    """Copy ``src`` (train/ and test/ ImageFolders) to ``dst`` and plant ``n`` changed copies of
    training images in test/ (same class; ``mode`` in :data:`PLANT_MODES`). Writes
    ``dst/../<name>-planted.json``: [[train, test, change], ...]."""
    if dst.exists():
        raise SystemExit(f"{dst} exists; remove it first.")
    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    train = sorted(p for p in (dst / "train").rglob("*") if p.is_file())
    pairs = []
    for j, i in enumerate(sorted(rng.choice(len(train), n, replace=False))):
        p = train[int(i)]
        changes = SINGLE_CHANGES if mode == "all" else (SINGLE_CHANGES[j * len(SINGLE_CHANGES) // n],)
        data, suffix = _degrade(p, rng, changes)
        rel = p.relative_to(dst / "train")
        out = dst / "test" / rel.parent / f"planted_{p.stem}{suffix}"
        out.write_bytes(data)
        pairs.append([str(p.relative_to(dst)), str(out.relative_to(dst)), "+".join(changes)])
    planted = dst.with_name(dst.name + "-planted.json")
    planted.write_text(json.dumps(pairs, indent=1))
    return planted


def _main_prepare(args: argparse.Namespace) -> None:
    planted = prepare_dups(Path(args.src), Path(args.dst), args.n, args.seed, args.mode)
    print(f"wrote {args.dst} and {planted}")


# ------------------------------------------------------------------------------------------------
# Label errors: featbank vs cleanlab on the same features
# ------------------------------------------------------------------------------------------------


def _write_like(path: Path, X: np.ndarray, y: np.ndarray, classes: list[str], paths: list[str], root: str) -> Path:
    """A featbank cache of ``X`` with labels ``y`` (featbank's own writer; real HDF5)."""
    import h5py

    from featbank.cache import PartRows, write_cache

    src = path.with_name(path.name + ".src.h5")
    with h5py.File(src, "w") as f:
        f.create_dataset("embeddings", data=X)
    n = len(y)
    rows = PartRows(paths, np.zeros((n, 2), np.int64), y, np.zeros(n, np.int8))
    write_cache(path, sources=[("src", src, np.arange(n))], rows=rows, classes=classes, skipped=[], embed_dim=X.shape[1],
                dtype="float32", attrs={"cache_key": "bench-audit", "backbone": "from-cache", "weights": "none",
                                        "weights_sha256": "0" * 64, "transform": {}, "root": root})
    src.unlink()
    return path


def _prf(flagged: set[int], truth: set[int]) -> dict[str, float]:
    tp = len(flagged & truth)
    p = tp / max(1, len(flagged))
    r = tp / max(1, len(truth))
    return {"flagged": len(flagged), "precision": round(p, 4), "recall": round(r, 4),
            "f1": round(2 * p * r / max(1e-12, p + r), 4)}


def bench_labels(cache_path: Path, workdir: Path, frac: float = 0.05, seed: int = 0) -> dict:
    """Flip ``frac`` of the train labels (seeded) and compare featbank's audit with cleanlab."""
    from featbank.audit import AuditSettings, run_labels
    from featbank.cache import open_cache

    with open_cache(cache_path) as c:
        train = np.flatnonzero(c.split_mask("train") & (c.labels >= 0))
        X, y, classes = c.load_embeddings(train), c.labels[train], list(c.classes)
        paths, root = [c.paths[i] for i in train], str(c.root)
    rng = np.random.default_rng(seed)
    flips = rng.choice(len(y), int(round(frac * len(y))), replace=False)
    noisy = y.copy()
    noisy[flips] = (y[flips] + rng.integers(1, len(classes), len(flips))) % len(classes)
    workdir.mkdir(parents=True, exist_ok=True)
    noisy_cache = _write_like(workdir / "noisy.h5", X, noisy, classes, paths, root)
    truth = set(flips.tolist())

    t0 = time.perf_counter()
    with open_cache(noisy_cache) as c:
        rows, _, issues, C = run_labels(c, AuditSettings(device="cpu"), [])
    t_fb = time.perf_counter() - t0
    fb = _prf(set(rows[issues.flagged].tolist()), truth)

    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    t0 = time.perf_counter()
    with open_cache(noisy_cache) as c:
        Xc, yc = c.load_embeddings(), c.labels.copy()
    probs = cross_val_predict(LogisticRegression(max_iter=1000), Xc, yc, cv=5, method="predict_proba")
    mask = find_label_issues(yc, probs)
    t_cl = time.perf_counter() - t0
    cl = _prf(set(np.flatnonzero(mask).tolist()), truth)
    if not (fb["flagged"] and cl["flagged"]):
        raise SystemExit(f"a method flagged nothing: featbank {fb}, cleanlab {cl}")
    return {"n": len(y), "flipped": len(flips), "featbank": {**fb, "seconds": round(t_fb, 1), "C": C},
            "cleanlab": {**cl, "seconds": round(t_cl, 1)}, "f1_ratio": round(fb["f1"] / max(1e-12, cl["f1"]), 3),
            "time_ratio_cleanlab_over_featbank": round(t_cl / t_fb, 2)}


# ------------------------------------------------------------------------------------------------
# Near-duplicates across splits
# ------------------------------------------------------------------------------------------------


def _cross(cache, a: np.ndarray, b: np.ndarray, score: np.ndarray) -> dict[tuple[str, str], float]:  # noqa: ANN001
    """{(path, path) sorted: best score} of the cross-split pairs among (a, b, score)."""
    out: dict[tuple[str, str], float] = {}
    for x, y, s in zip(a.tolist(), b.tolist(), score.tolist()):
        if cache.splits[x] != cache.splits[y] and np.isfinite(s):
            key = tuple(sorted((cache.paths[x], cache.paths[y])))
            out[key] = max(out.get(key, -np.inf), float(s))
    return out


def _score(pairs: dict, planted: set, thr: float, ignore: frozenset | set = frozenset()) -> dict:
    """Recall and precision of the cross-split pairs scoring >= thr; every pair not planted is a false positive."""
    found = {k for k, s in pairs.items() if s >= thr and k not in ignore}
    tp = len(found & planted)
    p = tp / max(1, len(found))
    r = tp / max(1, len(planted))
    return {"threshold": round(float(thr), 4), "cross_pairs": len(found), "planted_found": tp, "precision": round(p, 4),
            "recall": round(r, 4)}


def _best_at_precision(pairs: dict, planted: set, ignore: frozenset | set = frozenset(), target: float = 0.95) -> dict:
    """The lowest threshold whose precision is >= target (the highest recall there); else the best F1.
    One pass over the pairs sorted by score (every distinct score is a candidate threshold)."""
    keys = [k for k in pairs if k not in ignore]
    if not keys:
        return _score(pairs, planted, np.inf, ignore)
    s = np.array([pairs[k] for k in keys])
    hit = np.array([k in planted for k in keys])
    order = np.argsort(-s, kind="stable")
    s, tp = s[order], np.cumsum(hit[order])
    last = np.r_[s[1:] != s[:-1], True]  # the last pair of each tied score
    prec, rec = (tp / np.arange(1, len(s) + 1))[last], (tp / max(1, len(planted)))[last]
    ok = np.flatnonzero(prec >= target)
    i = ok[np.argmax(rec[ok])] if len(ok) else int(np.argmax(2 * prec * rec / np.maximum(prec + rec, 1e-12)))
    return _score(pairs, planted, float(s[last][i]), ignore)


def _evaluate(pairs: dict, planted: set, seed: int, default: float | None = None) -> dict:
    """Threshold chosen on half of the planted pairs, scored on the other half; the best possible on all."""
    order = sorted(planted)
    half = {order[i] for i in np.random.default_rng(seed).permutation(len(order))[: len(order) // 2]}
    other = planted - half
    chosen = _best_at_precision(pairs, half, ignore=other)
    out = {"chosen_on_half": chosen, "held_out_half": _score(pairs, other, chosen["threshold"], ignore=half),
           "best_on_all": _best_at_precision(pairs, planted)}
    if default is not None:
        out["at_default"] = _score(pairs, planted, default)
    return out


def _featbank_pairs(cache_path: Path, layers: str, verify: str, k: int) -> tuple[dict, float]:
    from featbank.audit import AuditSettings, run_neighbors
    from featbank.cache import open_cache

    t0 = time.perf_counter()
    with open_cache(cache_path) as c:
        st = AuditSettings(threshold=-1.0, pixel_threshold=-1.0, verify=verify, dup_layers=layers, k=k, device="cpu",
                           search="exact")
        pairs, _ = run_neighbors(c, st)
        score = pairs.pixel if verify == "pixels" else pairs.similarity
        out = _cross(c, pairs.a, pairs.b, score)
    return out, time.perf_counter() - t0


def _imagededup_pairs(root: Path, method: str) -> tuple[dict, float]:
    """Cross-split pairs of imagededup's PHash/DHash (score: -Hamming distance, up to 24 of 64 bits) or CNN
    (cosine, from 0.9: below that no method reached precision 0.95 here) on the folder."""
    from imagededup import methods

    t0 = time.perf_counter()
    if method == "CNN":

        algo = methods.CNN(verbose=False, model_config=_lite0_for_imagededup())
        enc = algo.encode_images(image_dir=str(root), recursive=True)
        dups = algo.find_duplicates(encoding_map=enc, min_similarity_threshold=0.9, scores=True)
    else:
        algo = getattr(methods, method)(verbose=False)
        enc = algo.encode_images(image_dir=str(root), recursive=True)
        dups = algo.find_duplicates(encoding_map=enc, max_distance_threshold=24, scores=True)
    seconds = time.perf_counter() - t0
    out: dict[tuple[str, str], float] = {}
    for a, lst in dups.items():
        for b, sc in lst:
            if a.split("/")[0] != b.split("/")[0]:
                key = tuple(sorted((a, b)))
                out[key] = float(sc) if method == "CNN" else -float(sc)
    return out, seconds


def _lite0_for_imagededup():  # noqa: ANN202 - an imagededup CustomModel
    """featbank's offline EfficientNet-Lite0 as an imagededup CustomModel (its CNN otherwise downloads weights)."""
    import torch
    from imagededup.utils import CustomModel

    from featbank.backbones import load_backbone

    bb = load_backbone("efficientnet_lite0")
    size = bb.preprocess.input_size
    mean = torch.tensor(bb.preprocess.mean).view(3, 1, 1)
    std = torch.tensor(bb.preprocess.std).view(3, 1, 1)

    def transform(im):  # noqa: ANN001, ANN202 - PIL image to a normalised CHW tensor
        x = np.asarray(im.convert("RGB").resize((size[1], size[0])), np.float32) / 255.0
        return (torch.from_numpy(x).permute(2, 0, 1) - mean) / std

    return CustomModel(name="efficientnet_lite0", model=bb.features.eval(), transform=transform)


def bench_dups(cache_path: Path, planted_path: Path, root: Path | None = None, seed: int = 0, k: int = 10,
               dedup_methods: tuple[str, ...] = ("PHash", "DHash", "CNN")) -> dict:
    """Every method's cross-split pairs scored against the planted ones (strict: any other pair is a false positive)."""
    from featbank.audit import DEFAULT_PIXEL_THRESHOLD, DEFAULT_THRESHOLD
    from featbank.cache import open_cache

    planted_rows = json.loads(planted_path.read_text())
    planted = {tuple(sorted(p[:2])) for p in planted_rows}
    with open_cache(cache_path) as c:
        layers, n = c.layers, c.n_samples
    methods: dict[str, tuple[dict, float, float | None]] = {}
    for layer in [x for x in ("final", "stage6") if x in layers]:
        pairs, sec = _featbank_pairs(cache_path, layer, "none", k)
        methods[f"featbank cosine, {layer}"] = (pairs, sec, DEFAULT_THRESHOLD if layer == "final" else None)
        pairs, sec = _featbank_pairs(cache_path, layer, "pixels", k)
        methods[f"featbank --verify pixels, {layer} {k}-NN"] = (pairs, sec, DEFAULT_PIXEL_THRESHOLD)
    why_not = None
    try:
        import imagededup  # noqa: F401
    except ImportError:
        why_not = "imagededup is not installed (pip install imagededup)"
    for m in dedup_methods if why_not is None and root is not None else ():
        pairs, sec = _imagededup_pairs(root, m)
        methods[f"imagededup {m}"] = (pairs, sec, None)
    out = {"n_images": n, "planted": len(planted), "k": k, "imagededup_skipped": why_not, "methods": {}}
    kinds = sorted({p[2] for p in planted_rows if len(p) > 2})
    for name, (pairs, sec, default) in methods.items():
        row = {"seconds": round(sec, 1), **_evaluate(pairs, planted, seed, default)}
        thr = row["held_out_half"]["threshold"]
        for kind in kinds:  # recall per change at the threshold chosen on half
            mine = {tuple(sorted(p[:2])) for p in planted_rows if p[2] == kind}
            row[f"recall_{kind}"] = round(len({q for q in mine if pairs.get(q, -np.inf) >= thr}) / len(mine), 3)
        out["methods"][name] = row
    return out


# ------------------------------------------------------------------------------------------------
# Scale: a synthetic float16 cache written part by part, audited with a small memory budget
# ------------------------------------------------------------------------------------------------


def write_scale_cache(index: Path, n: int, dim: int, n_pairs: int, shard: int = 20000, seed: int = 0) -> np.ndarray:
    """N x dim float16 rows in parts of ``shard`` rows; rows ``b`` = row ``a`` + noise (cosine ~0.97) for
    ``n_pairs`` planted pairs, ``a`` in train and ``b`` in test. Returns the (n_pairs, 2) planted rows."""
    from featbank.cache._index import IndexContents, PlannedPart, finalize_index
    from featbank.cache._parts import PartRows, ShardRows, parts_dir, rows_digest, write_part

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)[: 2 * n_pairs]
    pairs = np.sort(perm.reshape(n_pairs, 2), axis=1)
    partner = dict(zip(pairs[:, 1].tolist(), pairs[:, 0].tolist()))
    sources = set(pairs[:, 0].tolist())
    planned = []
    for sid, s in enumerate(range(0, n, shard)):
        rows = np.arange(s, min(n, s + shard))
        X = np.random.default_rng([seed, sid]).standard_normal((len(rows), dim), dtype=np.float32)
        for r in rows.tolist():  # a pair's source row and its copy both come from the source's own generator
            if r in sources:
                X[r - s] = np.random.default_rng([seed, 1, r]).standard_normal(dim, dtype=np.float32)
            elif r in partner:
                X[r - s] = (np.random.default_rng([seed, 1, partner[r]]).standard_normal(dim, dtype=np.float32)
                            + 0.25 * np.random.default_rng([seed, 2, r]).standard_normal(dim, dtype=np.float32))
        split = np.where(np.isin(rows, pairs[:, 1]), 2, 0).astype(np.int8)
        part_rows = PartRows([f"{r:09d}.png" for r in rows], np.zeros((len(rows), 2), np.int64),
                             np.zeros(len(rows), np.int64), split)
        write_part(parts_dir(index), ShardRows(sid, "scale" + "0" * 59, part_rows, ["a"]), X.astype(np.float16))
        planned.append(PlannedPart(sid, len(rows), rows_digest(part_rows, ["a"])))
    finalize_index(index, planned, "scale" + "0" * 59, IndexContents(["a"], {"backbone": "synthetic"}))
    return pairs


def bench_scale(n: int, workdir: Path, max_memory: str, dim: int = 1280, n_pairs: int = 1000, search: str = "ivf",
                nprobe: int = 16, keep: bool = False) -> dict:
    from featbank.audit import AuditSettings, audit
    from featbank.cache import open_cache

    workdir.mkdir(parents=True, exist_ok=True)
    index = workdir / f"scale-{n}.h5"
    if index.exists():
        raise SystemExit(f"{index} exists; remove it and {index}.parts first.")
    t0 = time.perf_counter()
    pairs = write_scale_cache(index, n, dim, n_pairs)
    t_write = time.perf_counter() - t0
    rss_write = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t0 = time.perf_counter()
    with open_cache(index) as c:
        res = audit(c, AuditSettings(max_memory=max_memory, device="cpu", search=search, nprobe=nprobe))
        found = set(zip(res.pairs.a.tolist(), res.pairs.b.tolist()))
    seconds = time.perf_counter() - t0
    planted = set(map(tuple, pairs.tolist()))
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if not keep:
        shutil.rmtree(index.with_name(index.name + ".parts"), ignore_errors=True)
        index.unlink()
    return {"n": n, "dim": dim, "max_memory": max_memory, "search": res.summary["duplicates"]["search"],
            "nprobe": nprobe, "planted": len(planted), "found": len(planted & found),
            "recall": round(len(planted & found) / len(planted), 4),
            "other_pairs": len(found - planted), "audit_seconds": round(seconds, 1), "write_seconds": round(t_write, 1),
            "peak_rss_gb_after_write": round(rss_write, 3), "peak_rss_gb": round(rss_gb, 3),
            "disk_gb": round(n * dim * 2 / 1e9, 2)}


# ------------------------------------------------------------------------------------------------
# Which change moves an embedding how far: one change at a time (calibrates the default threshold)
# ------------------------------------------------------------------------------------------------

CHANGES = ("crop", "resize", "bright", "jpeg", "all")


def _change(im, name: str):  # noqa: ANN001, ANN202 - PIL images
    from PIL import Image, ImageEnhance

    if name in ("crop", "all"):
        w, h = im.size
        cw, ch = int(w * 0.9), int(h * 0.9)
        im = im.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    if name in ("resize", "all"):
        im = im.resize((int(im.width * 0.8), int(im.height * 0.8)), Image.BILINEAR)
    if name in ("bright", "all"):
        im = ImageEnhance.Brightness(im).enhance(1.1)
    if name in ("jpeg", "all"):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=30)
        buf.seek(0)
        im = Image.open(buf).convert("RGB")
    return im


def prepare_variants(src: Path, dst: Path, n: int = 30) -> None:
    """``n`` images of ``src`` (evenly spaced), each as orig/ and once per change in CHANGES (PNG)."""
    from PIL import Image

    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    for i, f in enumerate(files[:: max(1, len(files) // n)][:n]):
        im = Image.open(f).convert("RGB")
        for name in ("orig", *CHANGES):
            (dst / name).mkdir(parents=True, exist_ok=True)
            (im if name == "orig" else _change(im, name)).save(dst / name / f"{i:03d}.png")


def bench_variants(cache_path: Path) -> dict:
    """Per change: the cosine of each changed copy to its original, and how often the original is its nearest
    original; beside the most similar pair of different originals."""
    from featbank.cache import open_cache

    with open_cache(cache_path) as c:
        X, paths = c.load_embeddings(), list(c.paths)
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    at = {p: i for i, p in enumerate(paths)}
    n = sum(p.startswith("orig/") for p in paths)
    orig = np.array([at[f"orig/{i:03d}.png"] for i in range(n)])
    S0 = Z[orig] @ Z[orig].T
    np.fill_diagonal(S0, np.nan)
    out = {"n": n, "different_images": {"median": round(float(np.nanmedian(S0)), 4), "max": round(float(np.nanmax(S0)), 4)}}
    for name in CHANGES:
        S = Z[np.array([at[f"{name}/{i:03d}.png"] for i in range(n)])] @ Z[orig].T
        same = np.diag(S)
        out[name] = {"min": round(float(same.min()), 4), "q05": round(float(np.quantile(same, 0.05)), 4),
                     "median": round(float(np.median(same)), 4), "nearest_is_original": round(float(
                         (S.argmax(1) == np.arange(n)).mean()), 3)}
    return out


def _main_prepare_variants(args: argparse.Namespace) -> None:
    prepare_variants(Path(args.src), Path(args.dst), args.n)


def _main_variants(args: argparse.Namespace) -> None:
    print(json.dumps(bench_variants(Path(args.cache)), indent=2))


def _main_labels(args: argparse.Namespace) -> None:
    print(json.dumps(bench_labels(Path(args.cache), Path(args.workdir)), indent=2))


def _main_dups(args: argparse.Namespace) -> None:
    result = bench_dups(Path(args.cache), Path(args.planted), Path(args.root) if args.root else None,
                        k=args.k, dedup_methods=tuple(args.imagededup.split(",")) if args.imagededup else ())
    print(json.dumps(result, indent=2))
    print(f"{'method':40s} {'seconds':>8s} {'thr(half)':>9s} {'P held-out':>10s} {'R held-out':>10s} {'best R@P>=.95':>13s}")
    for name, r in result["methods"].items():
        h, b = r["held_out_half"], r["best_on_all"]
        best = f"{b['recall']:.3f}" if b["precision"] >= 0.95 else "-"
        print(f"{name:40s} {r['seconds']:8.1f} {h['threshold']:9.4f} {h['precision']:10.3f} {h['recall']:10.3f} {best:>13s}")


def _main_scale(args: argparse.Namespace) -> None:
    print(json.dumps(bench_scale(args.n, Path(args.workdir), args.max_memory, search=args.search, nprobe=args.nprobe,
                                 keep=args.keep), indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-dups")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--n", type=int, default=N_PLANTED)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=PLANT_MODES, default="all")
    p.set_defaults(func=_main_prepare)
    p = sub.add_parser("prepare-variants")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--n", type=int, default=30)
    p.set_defaults(func=_main_prepare_variants)
    p = sub.add_parser("variants")
    p.add_argument("cache")
    p.set_defaults(func=_main_variants)
    p = sub.add_parser("labels")
    p.add_argument("cache")
    p.add_argument("--workdir", default="runs/bench-audit")
    p.set_defaults(func=_main_labels)
    p = sub.add_parser("dups")
    p.add_argument("cache")
    p.add_argument("planted", help="the -planted.json file prepare-dups wrote")
    p.add_argument("--root", default=None, help="the image folder, for imagededup (skipped without it)")
    p.add_argument("--k", type=int, default=10, help="neighbours per image whose pairs are scored")
    p.add_argument("--imagededup", default="PHash,DHash,CNN", help="imagededup methods to run beside ('' for none)")
    p.set_defaults(func=_main_dups)
    p = sub.add_parser("scale")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--max-memory", default="256MB")
    p.add_argument("--search", choices=("exact", "ivf"), default="ivf")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--keep", action="store_true", help="keep the synthetic cache (deleted after the run by default)")
    p.add_argument("--workdir", default="runs/bench-audit")
    p.set_defaults(func=_main_scale)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
