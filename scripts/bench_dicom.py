"""Benchmark DICOM input against the same pixels as 16-bit PNG, and draw the CT example windowed three ways.

Prints, from one run on one machine, side by side:

  (a) decoding alone: ``load_and_preprocess`` (read, window, resize, crop) over N DICOM files and over
      the same stored pixels as N 16-bit PNG files, images per second and the ratio DICOM / PNG;
  (b) ``featbank.extract`` end to end on each folder (fresh caches), images per second and the ratio;

each over ``--repeats`` rounds in alternating order (the best reported, and every round's ratio),
after one untimed warm-up extraction (engine build), and asserts that both extractions embedded
all N images and that their embeddings agree (the ``auto`` window of a DICOM file without a VOI of
its own is the 0.5-99.5 percentile range of its modality values, the same 8-bit picture as the
percentile window of the stored values in the PNG).

Data: pydicom's real CT slice ``CT_small.dcm`` (128 x 128, 16-bit, rescale intercept -1024),
enlarged to 512 x 512 (a typical CT matrix) with per-file noise, written N times as DICOM
(explicit VR little endian, uncompressed) and as 16-bit greyscale PNG.

``--figure PATH`` writes ``CT_small.dcm`` windowed ``lung``, ``soft-tissue`` and ``bone`` side by
side (384 x 128 px, 8-bit grey PNG).

Examples:
    python scripts/bench_dicom.py --n 200
    python scripts/bench_dicom.py --n 40 --backbone test_tiny          # a quick functional run
    python scripts/bench_dicom.py --n 0 --figure docs/images/ct_small_windows.png
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

WINDOWS = ("lung", "soft-tissue", "bone")


def _ct_small() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


def write_folders(root: Path, n: int, size: int = 512, seed: int = 0) -> tuple[Path, Path]:
    """N DICOM files and N 16-bit PNGs of the same stored pixels, two classes each (for extract's layout)."""
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(_ct_small())
    base = np.kron(ds.pixel_array.astype(np.int32), np.ones((size // 128, size // 128), np.int32))
    rng = np.random.default_rng(seed)
    dcm, png = root / "dicom", root / "png"
    for k in range(n):
        cls = f"c{k % 2}"
        for d in (dcm, png):
            (d / cls).mkdir(parents=True, exist_ok=True)
        stored = np.clip(base + rng.integers(-20, 21, base.shape), 0, 4095).astype(np.int16)
        ds.Rows, ds.Columns = stored.shape
        ds.PixelData = stored.tobytes()
        ds.save_as(dcm / cls / f"slice{k:05d}.dcm")
        Image.fromarray(stored.astype(np.uint16)).save(png / cls / f"slice{k:05d}.png")
    return dcm, png


def time_decode(folder: Path, cfg: object) -> tuple[float, int]:
    from featbank.images import load_and_preprocess

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    for p in files:
        load_and_preprocess(p, cfg)
    return time.perf_counter() - t0, len(files)


def time_extract(folder: Path, out: Path, args: argparse.Namespace) -> tuple[float, object]:
    import featbank

    t0 = time.perf_counter()
    rep = featbank.extract(folder, out, backbone=args.backbone, progress=False, window="auto",
                           batch_size=args.batch_size)
    return time.perf_counter() - t0, rep


def write_figure(path: Path) -> None:
    from PIL import Image

    from featbank.images import load_image

    panels = [load_image(_ct_small(), keep_grey=True, window=w) for w in WINDOWS]
    w, h = panels[0].size
    out = Image.new("L", (w * len(panels), h))
    for i, p in enumerate(panels):
        out.paste(p, (i * w, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, optimize=True)
    print(f"figure: {path} ({path.stat().st_size} bytes): CT_small.dcm windowed {', '.join(WINDOWS)} (left to right)")


def _alternating(repeats: int, measure: object) -> dict[str, list[float]]:
    """Seconds per format over ``repeats`` rounds, the order alternating (DICOM first, then PNG first, ...)."""
    times: dict[str, list[float]] = {"dicom": [], "png": []}
    for r in range(repeats):
        for fmt in ("dicom", "png") if r % 2 == 0 else ("png", "dicom"):
            times[fmt].append(measure(fmt, r))  # type: ignore[operator]
    return times


def _line(label: str, n: int, times: dict[str, list[float]]) -> str:
    d, p = n / min(times["dicom"]), n / min(times["png"])
    each = ", ".join(f"{(n / a) / (n / b):.2f}" for a, b in zip(times["dicom"], times["png"]))
    return (f"{label}: DICOM {d:7.1f} img/s   PNG {p:7.1f} img/s   ratio DICOM/PNG {d / p:.2f} "
            f"(best of {len(times['png'])} alternating runs; per round {each})")


def run(args: argparse.Namespace) -> None:
    import featbank
    from featbank.backbones import load_backbone, with_window

    work = Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    try:
        dirs = dict(zip(("dicom", "png"), write_folders(work, args.n)))
        mb = {k: sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 1e6 for k, d in dirs.items()}
        cfg = with_window(load_backbone(args.backbone), "auto").preprocess
        print(f"N={args.n} slices of 512x512, DICOM {mb['dicom']:.1f} MB, 16-bit PNG {mb['png']:.1f} MB on disk")

        def decode(fmt: str, r: int) -> float:
            seconds, n = time_decode(dirs[fmt], cfg)
            assert n == args.n, (fmt, n)
            return seconds

        from featbank.images import load_and_preprocess

        for d in dirs.values():  # imports (pydicom) and first-call costs are not timed
            load_and_preprocess(next(d.rglob("*.*")), cfg)
        print(_line("(a) decode+window+resize", args.n, _alternating(args.repeats, decode)))
        warm = work / "warm"  # the first extract of a process builds the engine (and its ONNX file): not timed
        for k, src in enumerate(sorted(dirs["dicom"].rglob("*.dcm"))[:2] + sorted(dirs["png"].rglob("*.png"))[:2]):
            (warm / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
            shutil.copy(src, warm / f"c{k % 2}" / src.name)
        time_extract(warm, work / "warm.h5", args)

        def extract(fmt: str, r: int) -> float:
            seconds, rep = time_extract(dirs[fmt], work / f"{fmt}{r}.h5", args)
            assert rep.n_embedded == args.n and not rep.skipped, rep.summary()
            return seconds

        times = _alternating(args.repeats, extract)
        with featbank.open_cache(work / "dicom0.h5") as a, featbank.open_cache(work / "png0.h5") as b:
            diff = float(np.abs(a.load_embeddings() - b.load_embeddings()).max())
        assert diff < 1e-3, f"DICOM and PNG embeddings differ by {diff}"
        print(_line(f"(b) featbank.extract ({args.backbone}, --window auto)", args.n, times))
        print(f"    every run embedded all {args.n} images; max |embedding difference| DICOM vs PNG {diff:.1e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="slices per format (0: only --figure)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds per measurement (best is reported)")
    ap.add_argument("--figure", type=Path, default=None, help="write the three-window CT picture here")
    args = ap.parse_args()
    if args.figure is not None:
        write_figure(args.figure)
    if args.n > 0:
        run(args)


if __name__ == "__main__":
    main()
