"""Benchmark: an exported featbank model in onnxruntime vs the same model in torch eager, on CPU.

Both run in this one process, interleaved repeat by repeat (so load from other processes hits
both alike), with the same number of threads:

- batch 1: latency p50 / p99 (ms);
- batch 32: throughput (images/s).

Target: onnxruntime >= 2x torch eager at batch 32.

With ``--int8`` the bundle is also exported with ``--quantize int8`` (static QDQ, per channel; its
test top-1 change is measured by the export) and run beside the fp32 graph, same threads, same
interleaving. Target: int8 >= 1.7x fp32 at batch 32, <= 1 pt test top-1 drop.

Usage:
    python scripts/bench_onnx.py                       # efficientnet_lite0 + a linear head on 8 photos
    python scripts/bench_onnx.py models/elpv-linear    # any bundle with a linear/MLP head, or fine-tuned
    python scripts/bench_onnx.py --threads 4 --repeats 100
    python scripts/bench_onnx.py models/elpv-linear --int8   # + int8 vs fp32 (needs the bundle's cache and images)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _demo_bundle(work: Path) -> Path:
    """efficientnet_lite0 + a linear head fitted on 4 classes x 2 real photos (skimage.data)."""
    from PIL import Image
    from skimage import data as skdata

    import featbank
    from featbank.fitting import fit

    photos = {"cat": skdata.chelsea(), "coffee": skdata.coffee(), "person": skdata.astronaut(),
              "rocket": skdata.rocket()}
    root = work / "photos"
    for name, arr in photos.items():
        (root / name).mkdir(parents=True)
        Image.fromarray(arr).save(root / name / "full.png")
        h, w = arr.shape[:2]
        Image.fromarray(arr[h // 8: h - h // 6, w // 6: w - w // 8]).save(root / name / "crop.jpg")
    cache = featbank.extract(root, work / "photos.h5", backbone="efficientnet_lite0", progress=False)
    return fit(cache.path, "linear", params={"C": 1.0}, val_split=0.5, out=work / "models" / "bench").path


def _percentile_ms(times: list[float], q: float) -> float:
    return float(np.percentile(np.array(times) * 1e3, q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", help="model bundle (default: a demo efficientnet_lite0 linear head)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both engines")
    ap.add_argument("--repeats", type=int, default=50, help="batch-1 runs per engine")
    ap.add_argument("--batches", type=int, default=10, help="batch-32 runs per engine")
    ap.add_argument("--int8", action="store_true", help="also export and time the int8 (QDQ) graph")
    args = ap.parse_args(argv)
    if args.int8 and not args.bundle:
        ap.error("--int8 needs a bundle fitted on a cache with a test split (its accuracy change is measured)")

    os.environ.setdefault("FEATBANK_CACHE_DIR", str(Path(tempfile.gettempdir()) / "featbank-bench-cache"))
    import onnxruntime as ort
    import torch

    import featbank
    from featbank.export import build_torch_classifier

    work = Path(tempfile.mkdtemp(prefix="featbank-bench-"))
    bundle = Path(args.bundle) if args.bundle else _demo_bundle(work)
    report = featbank.export_model(bundle, work / "model.onnx")
    module, cfg = build_torch_classifier(bundle)

    torch.set_num_threads(args.threads)
    module = module.to(memory_format=torch.channels_last)  # what featbank's torch engine does on CPU
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    # Idle ORT threads spin by default and would steal the cores from the torch runs in between.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    clf = featbank.OnnxClassifier(report.path, session_options=opts)
    h, w = cfg.input_size
    rng = np.random.default_rng(0)
    x1 = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    x32 = rng.integers(0, 256, (32, h, w, 3), dtype=np.uint8)

    def run_torch(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x))[0].numpy()

    def run_ort(x: np.ndarray) -> np.ndarray:
        return clf.run(x)[0]

    diff = float(np.abs(run_torch(x32) - run_ort(x32)).max())
    engines = {"torch eager": run_torch, "onnxruntime": run_ort}
    quant = None
    if args.int8:
        q_report = featbank.export_model(bundle, work / "model-int8.onnx", quantize="int8", max_drop=100)
        quant = q_report.quantization
        q_clf = featbank.OnnxClassifier(q_report.path, session_options=opts)
        engines["ort int8"] = lambda x: q_clf.run(x)[0]
    for name, fn in engines.items():  # every engine must produce probabilities before anything is timed
        out = fn(x32)
        assert out.shape == (32, clf.n_classes) and np.isfinite(out).all(), f"{name} produced {out.shape}"
        assert np.allclose(out.sum(axis=1), 1, atol=1e-3), f"{name}: rows do not sum to 1"
    for _ in range(3):  # warm-up
        for fn in engines.values():
            fn(x1)
            fn(x32)
    # Blocks of runs per engine, alternating, so a burst of outside load hits both alike.
    lat: dict[str, list[float]] = {k: [] for k in engines}
    thr: dict[str, list[float]] = {k: [] for k in engines}
    rounds = 5
    for _ in range(rounds):
        for name, fn in engines.items():
            for _ in range(max(1, args.repeats // rounds)):
                t = time.perf_counter()
                fn(x1)
                lat[name].append(time.perf_counter() - t)
            for _ in range(max(1, args.batches // rounds)):
                t = time.perf_counter()
                fn(x32)
                thr[name].append(time.perf_counter() - t)

    meta = report.metadata
    print(f"model: {meta['backbone']} + {meta['head']} ({bundle}), input {h}x{w}, {args.threads} threads, "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}, CPU")
    print(f"export: {report.route}, opset {report.opset}; parity {report.parity['max_abs_diff']:.2e} on "
          f"{report.parity['n_images']} images; random-input batch-32 |dprob| {diff:.2e}")
    print(f"{'engine':<12} {'b1 p50 ms':>10} {'b1 p99 ms':>10} {'b32 img/s':>10}")
    ips = {}
    for name in engines:
        ips[name] = 32 / float(np.median(thr[name]))
        print(f"{name:<12} {_percentile_ms(lat[name], 50):>10.2f} {_percentile_ms(lat[name], 99):>10.2f} "
              f"{ips[name]:>10.1f}")
    p50 = _percentile_ms(lat["torch eager"], 50) / _percentile_ms(lat["onnxruntime"], 50)
    ratio = ips["onnxruntime"] / ips["torch eager"]
    print(f"ratio onnxruntime / torch eager: batch 1 p50 latency {p50:.2f}x faster, batch 32 throughput "
          f"{ratio:.2f}x (target >= 2x: {'MET' if ratio >= 2 else 'NOT MET'})")
    if quant is not None:
        q50 = _percentile_ms(lat["onnxruntime"], 50) / _percentile_ms(lat["ort int8"], 50)
        q32 = ips["ort int8"] / ips["onnxruntime"]
        print(f"ratio int8 / fp32 (onnxruntime): batch 1 p50 latency {q50:.2f}x faster, batch 32 throughput "
              f"{q32:.2f}x (target >= 1.7x: {'MET' if q32 >= 1.7 else 'NOT MET'})")
        print(f"int8 accuracy: test top-1 {100 * quant['fp32_top1']:.2f}% fp32 -> {100 * quant['int8_top1']:.2f}% int8 "
              f"= {quant['drop_points']:+.2f} pt drop on {quant['n_test']} test images, {quant['n_calibration']} "
              f"calibration images (target <= 1 pt: {'MET' if quant['drop_points'] <= 1 else 'NOT MET'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
