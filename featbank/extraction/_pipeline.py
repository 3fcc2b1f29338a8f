"""`extract` itself: validate the options, then hand the run to the sharded writer (one cache format, v2)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._device import resolve_device
from ..errors import ConfigError
from ..windowing import parse_window
from ._cachefile import default_cache_path, refuse_foreign_file
from ._report import ExtractReport
from .config import ENGINES, validate_options, validate_procs
from .job import ScaleOptions, extract_sharded

__all__ = ["extract", "ExtractOptions"]


def extract(
    data: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    weights_file: str | os.PathLike | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    engine: str = "auto",
    dtype: str = "float32",
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    procs: int = 1,
    launcher: str | None = None,
    shard_size: int | None = None,
    finalize: bool = False,
    num_gpus: float = 0.0,
    max_retries: int = 3,
    path_column: str = "path",
    label_column: str | None = "label",
    split_column: str | None = "split",
    label_from: str = "cls",
    layers: str | list[str] | None = None,
    pooling: str = "gap+2x2",
    views: int = 0,
    augment: str | None = None,
    view_seed: int = 0,
    window: str = "none",
    decode: str = "pillow",
) -> ExtractReport:
    """Embed every image of a folder with a frozen backbone into an HDF5 cache.

    Reruns are incremental (only new or changed files are embedded, deleted ones dropped) and
    resume after a crash or Ctrl-C. A cache made with other settings is refused unless
    ``overwrite``.

    The cache is schema v2 (README "Cache format"): the rows are cut into shards of about
    ``shard_size`` rows, each written to a part file, and ``out`` is a small index over them, so a
    rerun rewrites only the parts whose files changed. A schema-v1 cache at ``out`` is migrated
    first. At scale (README "At scale"): ``procs`` local processes, torchrun (``WORLD_SIZE`` > 1)
    or Ray run the shards; a manifest or WebDataset ``data`` is read as rows.

    Args:
        data: an ImageFolder (``data/<class>/<image>``), a folder with ``train``/``val``/``test``
            split folders, a flat folder of unlabelled images, a manifest (CSV, TSV, parquet) or
            WebDataset tar shards.
        out: the cache file; default :func:`default_cache_path`.
        backbone: a name from ``featbank backbones``, or a fine-tuned bundle folder; ``NAME@SIZE``
            feeds it whole SIZE x SIZE images (:func:`featbank.backbones.load_backbone`).
        weights: weight name (``IMAGENET1K_V2``), ``random``, or ``None`` for the default.
        weights_file: a local state_dict to use instead.
        batch_size: images per forward pass.
        num_workers: image-decoding processes; default from the CPU count.
        device: ``auto``, ``cpu`` or ``cuda``.
        engine: ``auto`` (onnxruntime on CPU, torch on CUDA), ``torch`` or ``onnxruntime``.
        dtype: stored dtype, ``float32`` or ``float16``.
        overwrite: replace a cache made with other settings.
        strict: raise :class:`SkippedImagesError` (after writing the cache) if any file was skipped.
        progress: show a progress bar on stderr (over the rows of the shards this run writes).
        on_progress: called as ``on_progress(done, total)`` after every batch (``--procs 1``) or
            finished part (more processes, Ray); raising ``KeyboardInterrupt`` there stops the run.
        procs: local worker processes (one per GPU when GPUs are used).
        launcher: ``auto`` (torchrun when ``WORLD_SIZE`` > 1, else local), ``local``, ``torchrun``
            or ``ray``; None means ``auto``.
        shard_size: rows per shard (default 10,000); only a new plan uses it.
        finalize: run no shard; check the parts separate jobs wrote and publish the index.
        num_gpus, max_retries: per Ray task.
        path_column, label_column, split_column: a manifest's column names.
        label_from: WebDataset label member: ``cls``, ``txt``, ``json`` or ``none``.
        layers: intermediate layers to store besides the embedding (``"stage3,stage5,final"``,
            ``"all"``; see :func:`featbank.backbones.parse_layers`); default ``final`` alone.
        pooling: how a layer's feature map is pooled: ``gap+2x2`` (default) or ``gap``.
        views, augment, view_seed: K augmented views per image (``hflip``, ``dihedral`` or
            ``crops``), stored beside the plain view; ``crops`` are seeded by path, view and
            ``view_seed``. Layers and views write a sharded (schema-v2) cache, with torch.
        window: how single-channel high-bit-depth images (DICOM, 16-bit PNG/TIFF) become 8 bits:
            ``none`` (default), ``auto`` (the DICOM file's VOI, else the 0.5-99.5 percentile
            range), ``lung``, ``soft-tissue``, ``bone``, ``brain`` or ``C,W``
            (:mod:`featbank.windowing`). Part of the transform: keyed in the cache, recorded in
            bundles fitted on it, applied by predict, evaluate and export.
        decode: ``pillow`` (default), ``gpu`` (JPEGs decoded in batches by torchvision on ``device``,
            nvJPEG on CUDA, and resized there; other files through Pillow; part of the cache key) or
            ``auto`` (``gpu`` on CUDA, else ``pillow``). ``gpu`` refuses layers, views and WebDataset input.

    Returns:
        An :class:`ExtractReport`.

    Raises:
        ConfigError: an unknown ``window``; an option past its bound (``shard_size`` over 1,000,000,
            ``views`` over 64, ...) or a backbone name with more than one ``@SIZE``, before any work; a
            brace pattern naming more than 1,000,000 tars.
        DatasetError: missing or empty folder, a single class, one file named by rows (or links) that
            disagree on its label or split.
        CacheKeyMismatch: the existing cache was made with other settings (file untouched).
        CacheError: another process is writing the same cache (``<out>.lock`` is held).
        CacheError: a damaged cache at ``out`` (untouched), not enough space (checked first).
        Interrupted: Ctrl-C; finished rows are kept and a rerun resumes.

    Example:
        >>> report = featbank.extract("data/elpv", backbone="efficientnet_lite0")
        >>> print(report.summary())
    """
    t0 = time.perf_counter()
    from ..backbones import check_backbone_name
    from ._plan import check_shard_size

    validate_options(batch_size, num_workers, dtype)
    window = parse_window(window).spec
    validate_procs(procs)
    if shard_size is not None:
        check_shard_size(shard_size)
    check_backbone_name(os.fspath(backbone))  # the one parser of NAME@SIZE (compare uses it too), before any work
    dev = resolve_device(device).type
    if engine not in ENGINES:
        raise ConfigError(f"The 'engine' parameter must be one of {ENGINES}. Got {engine!r} instead.")
    from ._views import resolve_features

    features = resolve_features(backbone, weights, weights_file, layers=layers, pooling=pooling, views=views,
                                augment=augment, view_seed=view_seed)
    from ._decode import resolve_decode
    from .job import is_webdataset

    decode = resolve_decode(decode, dev, features=None if features.is_default else features,
                            webdataset=is_webdataset(str(data)))
    opts = ExtractOptions(backbone, weights, weights_file, batch_size, num_workers, dev, engine, dtype, overwrite,
                          strict, progress, on_progress, None if features.is_default else features, window,
                          decode)
    out_path = (Path(out).expanduser() if out is not None
                else default_cache_path(data, backbone, weights, dtype, weights_file))
    if out_path.exists() and out_path.is_dir():
        raise ConfigError(f"--out {str(out_path)!r} is a directory; give a file path such as {out_path / 'cache.h5'}.")
    refuse_foreign_file(out_path)
    scale = ScaleOptions(procs, launcher, shard_size, finalize, num_gpus, max_retries, path_column, label_column,
                         split_column, label_from)
    return extract_sharded(str(data), out_path, opts, scale, t0)


@dataclass(frozen=True)
class ExtractOptions:
    """The settings of one :func:`extract` run, as given (``device`` resolved)."""

    backbone: str
    weights: str | None
    weights_file: str | os.PathLike | None
    batch_size: int
    num_workers: int | None
    device: str
    engine: str
    dtype: str
    overwrite: bool
    strict: bool
    progress: bool
    on_progress: Callable[[int, int], None] | None
    features: Any = None  # FeatureOptions when the run stores layers or views
    window: str = "none"  # the window rule (featbank.windowing), part of the transform
    decode: str = "pillow"  # pillow or gpu (resolved from auto)
