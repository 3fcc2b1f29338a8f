"""`extract` itself: validate, take the writer lock, plan what to embed, resume, embed, commit."""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .._device import precision_name, resolve_device
from ..cache import CacheState, StagingFile, check_key, compute_cache_key, read_state, writer_lock
from ..data import ImageIndex, scan_folder
from ..errors import (
    CacheError,
    CacheKeyMismatch,
    ConfigError,
    Interrupted,
    NotACacheError,
    SkippedImagesError,
    SkippedImagesWarning,
)
from ..images import PreprocessConfig
from ._cachefile import _commit, _remove_stale_temporaries, default_cache_path, refuse_foreign_file
from ._embedding import _run
from ._engines import _make_engine, _onnx_cache_path, _OrtEngine
from ._options import ENGINES, _validate
from ._report import ExtractReport, _strict_message
from ._scaled import ScaleOptions, extract_sharded, wants_sharded

__all__ = ["extract", "ExtractOptions"]


def _plan_digest(paths: list[str], fps: np.ndarray) -> str:
    h = hashlib.sha256()
    for p, fp in zip(paths, fps):
        h.update(p.encode("utf-8", "surrogateescape") + b"\0" + f"{fp[0]}:{fp[1]}".encode() + b"\n")
    return h.hexdigest()


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
) -> ExtractReport:
    """Embed every image of a folder with a frozen backbone into an HDF5 cache.

    Reruns are incremental (only new or changed files are embedded, deleted ones dropped) and
    resume after a crash or Ctrl-C. A cache made with other settings is refused unless
    ``overwrite``.

    At scale (README "At scale"): with ``procs > 1``, a ``launcher``, a ``shard_size``,
    ``finalize``, under torchrun (``WORLD_SIZE`` > 1), for a manifest or WebDataset ``data``, or
    when ``out`` is already a schema-v2 cache, the rows are cut into shards and written as a
    schema-v2 cache (part files + an index); a schema-v1 cache at ``out`` is migrated first. A
    plain image folder into a new or v1 cache writes schema v1 as before.

    Args:
        data: an ImageFolder (``data/<class>/<image>``), a folder with ``train``/``val``/``test``
            split folders, or a flat folder of unlabelled images.
        out: the cache file; default :func:`default_cache_path`.
        backbone: a name from ``featbank backbones``, or a fine-tuned bundle folder.
        weights: weight name (``IMAGENET1K_V2``), ``random``, or ``None`` for the default.
        weights_file: a local state_dict to use instead.
        batch_size: images per forward pass.
        num_workers: image-decoding processes; default from the CPU count.
        device: ``auto``, ``cpu`` or ``cuda``.
        engine: ``auto`` (onnxruntime on CPU, torch on CUDA), ``torch`` or ``onnxruntime``.
        dtype: stored dtype, ``float32`` or ``float16``.
        overwrite: replace a cache made with other settings.
        strict: raise :class:`SkippedImagesError` (after writing the cache) if any file was skipped.
        progress: show a progress bar on stderr (schema-v1 route only).
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

    Returns:
        An :class:`ExtractReport`.

    Raises:
        DatasetError: missing or empty folder, a single class.
        CacheKeyMismatch: the existing cache was made with other settings (file untouched).
        CacheError: another process is writing the same cache (``<out>.lock`` is held).
        Interrupted: Ctrl-C; finished rows are kept and a rerun resumes.

    Example:
        >>> report = featbank.extract("data/elpv", backbone="efficientnet_lite0")
        >>> print(report.summary())
    """
    t0 = time.perf_counter()
    _validate(batch_size, num_workers, dtype)
    dev = resolve_device(device).type
    if engine not in ENGINES:
        raise ConfigError(f"The 'engine' parameter must be one of {ENGINES}. Got {engine!r} instead.")
    from ._views import resolve_features

    features = resolve_features(backbone, weights, weights_file, layers=layers, pooling=pooling, views=views,
                                augment=augment, view_seed=view_seed)
    opts = ExtractOptions(backbone, weights, weights_file, batch_size, num_workers, dev, engine, dtype, overwrite,
                          strict, progress, on_progress, None if features.is_default else features)
    out_path = (Path(out).expanduser() if out is not None
                else default_cache_path(data, backbone, weights, dtype, weights_file))
    if out_path.exists() and out_path.is_dir():
        raise ConfigError(f"--out {str(out_path)!r} is a directory; give a file path such as {out_path / 'cache.h5'}.")
    refuse_foreign_file(out_path)
    scale = ScaleOptions(procs, launcher, shard_size, finalize, num_gpus, max_retries, path_column, label_column,
                         split_column, label_from)
    if opts.features is not None or wants_sharded(str(data), out_path, scale):
        return extract_sharded(str(data), out_path, opts, scale, t0)
    index = scan_folder(data)
    with writer_lock(out_path):
        while True:
            report, folded = _extract_once(index, out_path, opts, t0)
            if report is not None:
                return report
            # An interrupted run of another plan was folded into the cache: plan again from there.
            # After a fold the cache carries this run's key; without one, an --overwrite run must
            # still overwrite (the old cache may have another key).
            opts = replace(opts, overwrite=opts.overwrite and not folded)
            index = scan_folder(data)


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
    features: Any = None  # FeatureOptions when the run stores layers or views (they take the sharded route)


@dataclass
class _Target:
    """What this run writes and with which identity: the cache, its staging file, the key."""

    out_path: Path
    staging_path: Path
    identity: dict[str, Any]
    key: str
    precision: str
    backbone: Any = None  # the loaded backbone, when peeking at its identity was not enough


@dataclass
class _Plan:
    """Where each current file's embedding comes from: the old cache, the staging file, or nowhere yet."""

    old_row: np.ndarray
    stage_row: np.ndarray
    kept_skipped: dict[int, str]
    need: np.ndarray
    digest: str


def _extract_once(index: ImageIndex, out_path: Path, opts: ExtractOptions,
                  t0: float) -> tuple[ExtractReport | None, bool]:
    """One pass of :func:`extract` under the writer lock: ``(report, False)``, or ``(None, folded)``
    when an interrupted run of another plan was found (and folded when it had rows): plan again."""
    _remove_stale_temporaries(out_path)
    target = _resolve_target(out_path, opts)
    state = _read_existing(target, opts)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = _open_staging(target, opts)
    plan = _make_plan(index, state)
    if staging is not None and staging.plan != plan.digest:
        return None, _fold(index, state, staging, plan, target, opts)
    report = ExtractReport(path=out_path, n_images=len(index), cache_key=target.key)
    report.n_reused = int((plan.old_row >= 0).sum())
    report.n_removed = (len(state.paths) - report.n_reused) if state is not None else 0
    if staging is None and _is_up_to_date(index, state, plan, report):
        report.up_to_date = True
        report.skipped = [(index.paths[i], r) for i, r in sorted(plan.kept_skipped.items())]
        report.seconds = time.perf_counter() - t0
        if opts.strict and report.skipped:
            raise SkippedImagesError(_strict_message(report))
        return report, False
    skipped_now = _embed(index, target, opts, staging, plan, report) if len(plan.need) else {}
    if not len(plan.need) and staging is not None:
        staging.close()
    return _finish(index, target, opts, state, plan, {**plan.kept_skipped, **skipped_now}, report, t0), False


def _resolve_target(out_path: Path, opts: ExtractOptions) -> _Target:
    from ..backbones import load_backbone, peek_identity

    precision = precision_name(opts.device)
    bb = None
    identity = peek_identity(opts.backbone, opts.weights, opts.weights_file)
    if identity is None:
        bb = load_backbone(opts.backbone, opts.weights, opts.weights_file)
        identity = bb.identity()
    key = compute_cache_key(identity, opts.dtype, precision)
    return _Target(out_path, out_path.with_name(out_path.name + ".partial"), identity, key, precision, bb)


def _read_existing(target: _Target, opts: ExtractOptions) -> CacheState | None:
    """The cache already at ``out_path`` (None with --overwrite or when there is none), key checked."""
    if opts.overwrite:
        return None
    try:
        state = read_state(target.out_path)
    except NotACacheError:
        raise
    except CacheError as e:
        raise CacheError(f"{e} The file was left untouched; pass --overwrite to replace it.") from None
    if state is not None:
        wanted = {**target.identity, "dtype": opts.dtype, "precision": target.precision}
        check_key(target.out_path, state, target.key, wanted)
    return state


def _open_staging(target: _Target, opts: ExtractOptions) -> StagingFile | None:
    staging = StagingFile.open_if_valid(target.staging_path)
    if staging is not None and staging.key != target.key:
        staging.close()
        if not opts.overwrite:
            raise CacheKeyMismatch(
                f"An interrupted run with other settings left {str(target.staging_path)!r}. Rerun it with "
                "its original settings to finish it, or pass --overwrite to discard it."
            )
        target.staging_path.unlink()
        staging = None
    return staging


def _make_plan(index: ImageIndex, state: CacheState | None) -> _Plan:
    cur = {p: i for i, p in enumerate(index.paths)}
    fps = index.fingerprints
    old_row = np.full(len(index), -1, np.int64)
    kept_skipped: dict[int, str] = {}
    if state is not None:
        for j, p in enumerate(state.paths):
            i = cur.get(p)
            if i is not None and tuple(fps[i]) == tuple(state.fingerprints[j]):
                old_row[i] = j
        for j, p in enumerate(state.skipped_paths):
            i = cur.get(p)
            if i is not None and tuple(fps[i]) == tuple(state.skipped_fingerprints[j]):
                kept_skipped[i] = state.skipped_reasons[j]
    kept_mask = np.zeros(len(index), bool)
    kept_mask[list(kept_skipped)] = True
    need = np.flatnonzero((old_row < 0) & ~kept_mask)
    digest = _plan_digest([index.paths[i] for i in need], fps[need])
    return _Plan(old_row, np.full(len(index), -1, np.int64), kept_skipped, need, digest)


def _fold(index: ImageIndex, state: CacheState | None, staging: StagingFile, plan: _Plan, target: _Target,
          opts: ExtractOptions) -> bool:
    """The folder changed since the interrupted run: fold its finished rows that are still current
    into the cache (marked incomplete), drop the staging file; True when rows were folded."""
    cur = {p: i for i, p in enumerate(index.paths)}
    fps = index.fingerprints
    done = staging.done_mask()
    for j, p in enumerate(staging.paths):
        i = cur.get(p)
        if done[j] and i is not None and plan.old_row[i] < 0 and tuple(fps[i]) == tuple(staging.fingerprints[j]):
            plan.stage_row[i] = j
    staging.close()
    folded = bool((plan.stage_row >= 0).any())
    if folded:
        _commit(target.out_path, index, plan.old_row, plan.stage_row, target.staging_path, plan.kept_skipped,
                target.identity, target.key, opts.dtype, target.precision, "", "", state, partial=True)
    target.staging_path.unlink()
    return folded


def _is_up_to_date(index: ImageIndex, state: CacheState | None, plan: _Plan, report: ExtractReport) -> bool:
    """Nothing to embed and nothing to drop: the cache is current, left byte for byte."""
    return (
        state is not None
        and len(plan.need) == 0
        and report.n_removed == 0
        and state.metadata.get("classes_json") == json.dumps(index.classes)
        and state.metadata.get("root") == str(index.root)
        and state.metadata.get("layout") == index.layout
        and len(plan.kept_skipped) == len(state.skipped_paths)
        and state.complete
    )


def _load_engine_source(target: _Target, opts: ExtractOptions) -> Any:
    """An onnxruntime engine from extract's own exported graph when that is all the run needs (building
    the torch model costs seconds per run), else None after making sure the backbone is loaded."""
    from ..backbones import load_backbone

    if target.backbone is None and opts.engine in ("auto", "onnxruntime") and opts.device == "cpu":
        onnx_path = _onnx_cache_path(target.identity)
        if onnx_path.exists():
            try:
                return _OrtEngine(path=onnx_path)
            except Exception:  # noqa: BLE001 - the normal route below reports real problems
                pass
    if target.backbone is None:
        target.backbone = load_backbone(opts.backbone, opts.weights, opts.weights_file)
        if target.backbone.identity() != target.identity:  # pragma: no cover - peek_identity must agree with load
            raise ConfigError("internal error: backbone identity changed between peek and load")
    return None


def _embed(index: ImageIndex, target: _Target, opts: ExtractOptions, staging: StagingFile | None, plan: _Plan,
           report: ExtractReport) -> dict[int, str]:
    """Embed the planned rows into the staging file (resuming it); returns ``{index row: skip reason}``."""
    ready = _load_engine_source(target, opts)
    report.model_loaded = True
    need = plan.need
    if staging is not None:
        report.n_resumed = int(staging.done_mask().sum())
    else:
        staging = StagingFile.create(
            target.staging_path, target.key, plan.digest, [index.paths[i] for i in need], index.fingerprints[need],
            index.labels[need], index.splits[need], int(target.identity["embed_dim"]), opts.dtype,
        )
    new_skipped: dict[int, str] = {}
    try:
        def make_engine() -> Any:
            return ready if ready is not None else _make_engine(opts.engine, target.backbone, opts.device,
                                                                 target.precision)

        report.n_embedded, eng = _run(
            staging, index.root, PreprocessConfig.from_dict(target.identity["transform"]), make_engine, opts.device,
            opts.batch_size, opts.num_workers, opts.progress, opts.on_progress, new_skipped,
        )
        if eng is not None:
            report.engine, report.device, report.precision = eng.name, opts.device, target.precision
    except KeyboardInterrupt:
        done_n = int(staging.done_mask().sum())
        staging.close()
        raise Interrupted(
            f"Interrupted: {done_n} of {len(need)} images are embedded and kept in "
            f"{target.staging_path}. Run the same command again to resume."
        ) from None
    done = staging.done_mask()
    for j, i in enumerate(need):
        if done[j]:
            plan.stage_row[i] = j
    staging.close()
    return {int(need[j]): r for j, r in new_skipped.items()}


def _finish(index: ImageIndex, target: _Target, opts: ExtractOptions, state: CacheState | None, plan: _Plan,
            all_skipped: dict[int, str], report: ExtractReport, t0: float) -> ExtractReport:
    """Commit the cache, drop the staging file, fill in the report, warn about skipped files."""
    _commit(target.out_path, index, plan.old_row, plan.stage_row, target.staging_path, all_skipped, target.identity,
            target.key, opts.dtype, target.precision, report.engine, opts.device, state, partial=False)
    if target.staging_path.exists():
        target.staging_path.unlink()
    report.skipped = [(index.paths[i], r) for i, r in sorted(all_skipped.items())]
    report.seconds = time.perf_counter() - t0
    if report.skipped:
        warnings.warn(
            f"{report.n_skipped} image(s) could not be read and were skipped; they are listed in "
            f"{target.out_path} under skipped/.",
            SkippedImagesWarning,
            stacklevel=3,
        )
        if opts.strict:
            raise SkippedImagesError(_strict_message(report))
    return report
