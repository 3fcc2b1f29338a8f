"""``featbank doctor``: what each stage of an extraction costs on this machine, and what to change.

Measured on a sample of the data, each stage alone: reading the files, decoding them, resizing and
cropping, making the augmented views (with ``--views``), the model (the very engine ``extract``
would build, on ready uint8 batches) and writing the cache. From these it predicts ``extract``'s
throughput and names the bottleneck:

- decoding runs in ``num_workers`` processes: at most ``num_workers / (read + decode + resize + views)``
  images per second;
- the model runs at its measured rate;
- on the CPU the decoders and the model share the cores: at most
  ``cores / (read + decode + resize + views + cores / model rate)`` (all cores busy, perfect overlap);
- the write runs at its measured rate.

The smallest of these names the bottleneck. The stages alone are optimistic (measured on ELPV on
this 2-core machine: 25-31% above a real run, as they leave out the work of the main process and
assume perfect sharing of the cores), so the doctor then runs the sample through a real
``extract`` (copied, repeated to at least :data:`PIPELINE_BATCHES` batches, into a temporary
folder) and times its steady state, the batches between the decoders' prefetch queue at either
end, and its start-up (the
run's seconds less its rows at the steady rate: model loading, workers, listing, the index). The
prediction for DATA's N images is ``N / (start-up + N / steady rate)``, the figure ``extract``
reports (its rows over its seconds, start-up included); the suggestions are scaled by the ratio of
the measured steady rate to the modelled one.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, DatasetError

if TYPE_CHECKING:
    from ..features import FeatureSpec
    from ._engines import Engine

__all__ = ["Diagnosis", "diagnose"]

#: Seconds the model is timed for in each window (after a warm-up batch), at least 3 batches a window.
MODEL_SECONDS = 2.0
#: Windows the model is timed in; the median window counts (one quiet or busy moment of a shared
#: machine swung a single 2 s window by 45% between two runs a minute apart on ELPV).
MODEL_WINDOWS = 3
#: Batches the sample is run through a real ``extract`` for, at least: the batches in the decoders'
#: prefetch queue at either end are not timed (at the start the queue drains; at the end the model
#: runs alone on cores the decoders no longer share, which made the tail of a short run on ELPV
#: read 20-25% fast), so a run is 4 queues long and more.
PIPELINE_BATCHES = 16
#: Bytes of images the pipeline run may copy: a sample of large images is repeated fewer times (and a
#: sample larger than this is not run at all: the prediction then comes from the stages alone).
PIPELINE_BYTES = 1 << 30


@dataclass
class Diagnosis:
    """What ``featbank doctor`` measured and what it suggests.

    Attributes:
        stages: seconds per image of ``read``, ``decode``, ``resize``, ``views`` (with ``views``: making them
            in the decoding workers), ``model`` (every view's pass), ``write``.
        rates: images per second each limit allows (``decoders``, ``model``, ``cpu``, ``write``).
        predicted: the images per second ``extract`` should reach with ``settings``: ``measured``
            when the pipeline run gave a rate, else the smallest of ``rates``.
        bottleneck: the smallest of ``rates``.
        measured: images per second of the sample through a real ``extract`` (steady state), or
            None when it gave no rate (fewer than two batches).
        startup: seconds that real ``extract`` spent besides its rows at the steady rate.
        n_images: the images of DATA the prediction is for.
        settings: what the prediction assumes (device, engine, batch_size, num_workers, cores).
        suggestions: options to try, each with the images per second it should reach.
    """

    n_sampled: int
    n_unreadable: int
    stages: dict[str, float]
    rates: dict[str, float]
    predicted: float
    bottleneck: str
    settings: dict[str, Any]
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    measured: float | None = None
    startup: float | None = None
    n_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"sampled {self.n_sampled} image(s)" + (f" ({self.n_unreadable} unreadable)" if self.n_unreadable else ""),
                 f"{'stage':<8} {'ms/image':>9} {'img/s':>9}"]
        for name, sec in self.stages.items():
            lines.append(f"{name:<8} {sec * 1e3:9.2f} {1 / sec if sec > 0 else float('inf'):9.1f}")
        s = self.settings
        modelled = self.rates[self.bottleneck]
        how = (f"for its {self.n_images} images: {self.measured:.1f} img/s after {self.startup:.1f} s of start-up, "
               f"measured through a real extract of the sample; the stages alone say {modelled:.1f}"
               if self.measured is not None and self.startup is not None else "from the stages alone")
        feats = f" {s['features']}" if s.get("features") else ""
        passes = f"; the model runs {s['passes']} times per image" if s.get("passes", 1) > 1 else ""
        lines.append(f"extract with --device {s['device']} --engine {s['engine']} --batch-size {s['batch_size']} "
                     f"--num-workers {s['num_workers']}{feats} ({s['cores']} cores{passes}): about {self.predicted:.1f} img/s "
                     f"({how}); bottleneck: {self.bottleneck}")
        for sug in self.suggestions:
            lines.append(f"try: {sug['options']}  -> about {sug['predicted']:.1f} img/s ({sug['why']})")
        return "\n".join(lines)


def _sample_paths(data: str, n: int) -> tuple[list[Path], int]:
    from .config import ExtractConfig
    from .job import read_source

    source = read_source(ExtractConfig(data))
    if source.layout == "webdataset":
        raise ConfigError("featbank doctor reads image files (a folder or a manifest); WebDataset tars are not sampled yet.")
    if not source.keys:
        raise DatasetError(f"No images found in {data!r}: nothing to measure.")
    pick = np.unique(np.linspace(0, len(source.keys) - 1, min(n, len(source.keys))).astype(int))
    return [Path(source.root) / source.keys[i] for i in pick], len(source.keys)


def _time_images(paths: list[Path], cfg: Any, features: FeatureSpec | None = None) -> tuple[dict[str, float], int, float]:
    """Seconds per image of reading the bytes, decoding them, resizing and (when ``features`` has views) making
    its augmented views, as the decoding workers of extract do (readable images only), the unreadable count,
    and the share of JPEGs among the readable ones."""
    import io

    from ..features import make_views
    from ..images import ImageReadError, decode_image, preprocess_image

    t = {"read": 0.0, "decode": 0.0, "resize": 0.0, **({"views": 0.0} if features is not None and features.n_views else {})}
    ok = bad = jpeg = 0
    for p in paths:
        t0 = time.perf_counter()
        try:
            raw = p.read_bytes()
        except OSError:
            bad += 1
            continue
        t1 = time.perf_counter()
        try:
            img = decode_image(io.BytesIO(raw), 178_956_970, keep_grey=True)
            t2 = time.perf_counter()
            arr = preprocess_image(img, cfg)
        except (ImageReadError, OSError, ValueError, SyntaxError):
            bad += 1
            continue
        t3 = time.perf_counter()
        if "views" in t:
            make_views(arr, p.name, features, cfg.interpolation)
            t["views"] += time.perf_counter() - t3
        jpeg += raw[:3] == b"\xff\xd8\xff"
        t["read"] += t1 - t0
        t["decode"] += t2 - t1
        t["resize"] += t3 - t2
        ok += 1
    if ok == 0:
        raise DatasetError(f"None of the {len(paths)} sampled images could be read: nothing to measure.")
    return {k: v / ok for k, v in t.items()}, bad, jpeg / ok


def _time_model(engine: Engine, input_size: tuple[int, int], batch_size: int) -> tuple[float, int]:
    """Seconds per image of the engine on ready uint8 batches, and the width it stores (the taps' summed)."""
    import torch

    h, w = input_size
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8))
    out = engine(batch)  # warm-up: graph optimisation, allocations
    dim = sum(int(a.shape[1]) for a in out) if isinstance(out, list) else int(np.asarray(out).shape[1])  # taps: a list
    windows = []
    for _ in range(MODEL_WINDOWS):
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < MODEL_SECONDS:
            engine(batch)
            n += 1
        windows.append((time.perf_counter() - t0) / (n * batch_size))
    return float(np.median(windows)), dim


def _time_write(folder: Path, dim: int, rows: int = 4096) -> float:
    """Seconds per row of writing float32 embeddings to an HDF5 file in ``folder`` (fsync included)."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    fd, name = tempfile.mkstemp(prefix=".featbank-doctor-", suffix=".h5", dir=folder)
    os.close(fd)
    try:
        t0 = time.perf_counter()
        with h5py.File(name, "w") as f:
            f.create_dataset("embeddings", data=data)
        with open(name, "rb+") as fh:
            os.fsync(fh.fileno())
        return (time.perf_counter() - t0) / rows
    finally:
        Path(name).unlink(missing_ok=True)


def _time_pipeline(paths: list[Path], options: dict[str, Any], batch_size: int) -> tuple[float, float] | None:
    """A real ``extract`` of the sample (repeated to :data:`PIPELINE_BATCHES` batches) in a temporary
    folder, in a fresh process like ``featbank extract``'s: images per second over the batches between
    the decoders' prefetch queue at either end (2 batches per decoding worker), and the run's other
    seconds (start-up: model, engine, workers, listing, the index); None when it gave no such rate."""
    import contextlib
    import json
    import shutil
    import subprocess
    import sys

    from .config import ExtractConfig

    queue = 2 * max(1, int(options.get("num_workers") or 0))  # torch DataLoader: prefetch_factor 2 per worker
    paths = [p for p in paths if p.is_file()]  # no FIFO or missing file is copied (they are counted above)
    sizes = [p.stat().st_size for p in paths]
    if not paths or sum(sizes) > PIPELINE_BYTES:
        return None
    n = max(len(paths), max(PIPELINE_BATCHES, 4 * queue + 4) * batch_size)
    n = min(n, len(paths) * max(1, PIPELINE_BYTES // max(1, sum(sizes))))  # bounded copies of large images
    with tempfile.TemporaryDirectory(prefix="featbank-doctor-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(n):  # copies, not links: one file, one row
            src = paths[i % len(paths)]
            with contextlib.suppress(OSError):  # a file gone or unreadable since it was sampled: one row fewer
                shutil.copyfile(src, folder / f"{i:06d}{src.suffix.lower()}")
        config = ExtractConfig(str(folder), str(Path(tmp) / "cache.h5"), batch_size=batch_size, progress=False,
                               **options)
        (Path(tmp) / "config.json").write_text(json.dumps(config.to_dict()))
        run = subprocess.run([sys.executable, "-m", __name__, str(Path(tmp) / "config.json")],
                             capture_output=True, text=True)
    if run.returncode != 0:
        return None
    timed = json.loads(run.stdout.strip().splitlines()[-1])
    stamps = timed["stamps"]
    first, last = (queue, len(stamps) - 1 - queue) if len(stamps) > 2 * queue + 2 else (0, len(stamps) - 1)
    if last <= first or stamps[last][1] <= stamps[first][1]:
        return None
    (t0, d0), (t1, d1) = stamps[first], stamps[last]
    rate = (d1 - d0) / (t1 - t0)
    return rate, max(0.0, timed["seconds"] - timed["n_embedded"] / rate)


def _pipeline_main(config_path: str) -> None:
    """The fresh process of :func:`_time_pipeline`: run the extract, print its seconds and progress stamps."""
    import json
    import warnings

    from ..errors import SkippedImagesWarning
    from .config import ExtractConfig
    from .job import run_extract

    config = ExtractConfig(**json.loads(Path(config_path).read_text()))
    stamps: list[tuple[float, int]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImagesWarning)  # the sample's unreadable images, counted apart
        report = run_extract(config, lambda done, _total: stamps.append((time.perf_counter(), done)))
    print(json.dumps({"seconds": report.seconds, "n_embedded": report.n_embedded, "stamps": stamps}))


def _limits(stages: dict[str, float], workers: int, cores: int, on_cpu: bool) -> dict[str, float]:
    cpu_per_image = stages["read"] + stages["decode"] + stages["resize"] + stages.get("views", 0.0)
    rates = {"decoders": max(workers, 1) / cpu_per_image, "model": 1 / stages["model"], "write": 1 / stages["write"]}
    if on_cpu:  # the model's threads and the decoders share the cores
        rates["cpu"] = cores / (cpu_per_image + cores * stages["model"])
    if workers == 0:  # decoding in the main process, one image after another, between batches
        rates["decoders"] = 1 / (cpu_per_image + stages["model"])
    return rates


def _suggest(stages: dict[str, float], settings: dict[str, Any], bottleneck: str) -> list[dict[str, Any]]:
    cores, on_cpu, workers = settings["cores"], settings["device"] == "cpu", settings["num_workers"]
    out = []
    more = min(cores if not on_cpu else max(1, cores - 1), 16)
    if bottleneck == "decoders" and more > workers:
        rates = _limits(stages, more, cores, on_cpu)
        out.append({"options": f"--num-workers {more}", "predicted": min(rates.values()),
                    "why": "decoding is the bottleneck and cores are free"})
    if bottleneck in ("decoders", "cpu") and not on_cpu and settings.get("jpeg_share", 0) > 0:
        share = settings["jpeg_share"]  # only JPEGs move to the GPU; the others stay with the decoders
        rates = _limits({**stages, "decode": stages["decode"] * (1 - share), "resize": stages["resize"] * (1 - share)},
                        workers, cores, on_cpu)
        out.append({"options": "--decode gpu", "predicted": min(rates.values()),
                    "why": f"decoding on the CPU holds the GPU back; nvJPEG decodes the JPEGs ({share:.0%} of the sample) "
                           "on the device"})
    if bottleneck == "model" and not on_cpu:
        n_gpu = settings.get("n_gpu", 1)
        if n_gpu > 1:
            out.append({"options": f"--procs {n_gpu}", "predicted": min(n_gpu / stages["model"], 1 / stages["write"]),
                        "why": f"one worker per GPU ({n_gpu} GPUs)"})
        out.append({"options": f"--batch-size {settings['batch_size'] * 2}", "predicted": 1 / stages["model"],
                    "why": "larger batches often run faster per image on a GPU; measure"})
    if bottleneck == "write":
        out.append({"options": "--out on a local disk", "predicted": None, "why": "writing the cache is the bottleneck"})
    return [s for s in out if s["predicted"] is None or s["predicted"] > 0]


#: The options of ``extract`` a diagnosis is for (:class:`~featbank.extraction.ExtractConfig`'s fields).
DIAGNOSED_OPTIONS = ("backbone", "weights", "weights_file", "device", "engine", "batch_size", "num_workers", "out",
                     "layers", "pooling", "views", "augment", "view_seed")
#: The layer and view options, passed on to the pipeline run as given.
_FEATURE_OPTIONS = ("layers", "pooling", "views", "augment", "view_seed")


def diagnose(data: str | os.PathLike, *, sample: int = 64, **options: Any) -> Diagnosis:
    """Measure each stage of extracting ``data`` on this machine; predict ``extract``'s img/s.

    Args:
        data: an image folder or a manifest (what ``featbank extract`` takes).
        sample: how many images to read and decode (spread over the data set).
        options: the ``extract`` run to predict, as :class:`~featbank.extraction.ExtractConfig`
            takes them (checked by it): ``backbone``, ``weights``, ``weights_file``, ``device``,
            ``engine``, ``batch_size``, ``num_workers``, ``out``, where the cache would be
            written (its folder's disk is timed; default: a temporary folder), and the layers and
            views to store (``layers``, ``pooling``, ``views``, ``augment``, ``view_seed``): the
            model then runs once per view, and its taps are what is written.

    Returns:
        A :class:`Diagnosis`.

    Raises:
        ConfigError: a bad option (the message says which).
        DatasetError: no image, or no readable image in the sample.
    """
    from .._device import default_num_workers, precision_name, resolve_device
    from ..backbones import load_backbone
    from ._engines import build_engine, build_tap_engine
    from ._spec import resolve_features
    from .config import ExtractConfig

    if not isinstance(sample, int) or not 1 <= sample <= 10_000:
        raise ConfigError(f"The 'sample' parameter must be an integer from 1 to 10000. Got {sample!r} instead.")
    unknown = sorted(set(options) - set(DIAGNOSED_OPTIONS))
    if unknown:
        raise ConfigError(f"diagnose() takes extract's options {', '.join(DIAGNOSED_OPTIONS)} and sample; got "
                          f"{', '.join(map(repr, unknown))}.")
    paths_given = {k: os.fspath(v) for k, v in options.items() if k in ("out", "weights_file") and v is not None}
    c = ExtractConfig(os.fspath(data), **{**options, **paths_given})  # the one check of extract's options
    backbone, weights, weights_file, out, batch_size = c.backbone, c.weights, c.weights_file, c.out, c.batch_size
    device, engine, num_workers = c.device, c.engine, c.num_workers
    dev = resolve_device(device).type
    paths, n_images = _sample_paths(str(data), sample)
    feats = resolve_features(backbone, weights, weights_file, **{k: getattr(c, k) for k in _FEATURE_OPTIONS})
    bb = load_backbone(backbone, weights, str(weights_file) if weights_file is not None else None)
    stages, bad, jpeg_share = _time_images(paths, bb.preprocess, feats)
    eng = (build_engine(engine, bb, dev, precision_name(dev)) if feats.is_default
           else build_tap_engine(engine, bb, dev, precision_name(dev), feats.layers, feats.pooling))
    eng_name = eng.name  # what auto chose here (a torch-only backbone: torch), passed on to the pipeline run
    per_view, dim = _time_model(eng, bb.preprocess.input_size, batch_size)
    passes = 1 + feats.n_views  # the plain image and each view go through the model, and are written
    stages["model"] = per_view * passes
    stages["write"] = _time_write(Path(out).parent if out is not None else Path(tempfile.gettempdir()), dim * passes)
    workers = num_workers if num_workers is not None else default_num_workers(dev)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    settings = {"device": dev, "engine": eng_name, "batch_size": batch_size,
                "num_workers": workers, "cores": cores, "n_gpu": _gpu_count(dev), "jpeg_share": jpeg_share,
                "features": _feature_flags(c), "passes": passes}
    rates = _limits(stages, workers, cores, dev == "cpu")
    bottleneck = min(rates, key=rates.get)
    options = {"backbone": backbone, "weights": weights,
               "weights_file": None if weights_file is None else os.fspath(weights_file), "device": dev,
               "engine": eng_name, "num_workers": workers, **{k: getattr(c, k) for k in _FEATURE_OPTIONS}}
    timed = _time_pipeline(paths, options, batch_size)
    suggestions = _suggest(stages, settings, bottleneck)
    if timed is None:
        return Diagnosis(len(paths), bad, stages, rates, rates[bottleneck], bottleneck, settings, suggestions,
                         n_images=n_images)
    measured, startup = timed
    ratio = measured / rates[bottleneck]  # the suggestions are modelled like the bottleneck: scaled the same way
    suggestions = [{**sug, "predicted": sug["predicted"] * ratio if sug["predicted"] is not None else None}
                   for sug in suggestions]
    predicted = n_images / (startup + n_images / measured)
    return Diagnosis(len(paths), bad, stages, rates, predicted, bottleneck, settings, suggestions, measured, startup,
                     n_images)


def _feature_flags(c: Any) -> str:
    """The layer and view options of ``c`` as extract's flags ("" for a plain run), for the summary."""
    layers = c.layers if c.layers is None or isinstance(c.layers, str) else ",".join(c.layers)  # a tuple of names
    flags = [f"--layers {layers}" if layers not in (None, "final") else "",
             f"--pooling {c.pooling}" if layers not in (None, "final") and c.pooling != "gap+2x2" else "",
             f"--views {c.views}" if c.views else "", f"--augment {c.augment}" if c.augment else ""]
    return " ".join(f for f in flags if f)


def _gpu_count(dev: str) -> int:
    if dev != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":  # python -m featbank.extraction._doctor CONFIG.json (see _time_pipeline)
    import sys

    _pipeline_main(sys.argv[1])
