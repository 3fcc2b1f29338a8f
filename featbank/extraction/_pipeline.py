"""`extract` itself: validate, take the writer lock, plan what to embed, resume, embed, commit."""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..cache import StagingFile, check_key, compute_cache_key, read_state, writer_lock
from ..data import ImageIndex, scan_folder
from ..errors import ConfigError, Interrupted, SkippedImagesError, SkippedImagesWarning
from ..images import PreprocessConfig
from ._cachefile import _commit, _remove_stale_temporaries, default_cache_path
from ._embedding import _run
from ._engines import _make_engine, _onnx_cache_path, _OrtEngine
from .._device import precision_name, resolve_device
from ._options import ENGINES, _validate
from ._report import ExtractReport, _strict_message

__all__ = ["extract", "_plan_digest", "_extract_locked"]


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
) -> ExtractReport:
    """Embed every image of a folder with a frozen backbone into an HDF5 cache.

    Reruns are incremental (only new or changed files are embedded, deleted ones dropped) and
    resume after a crash or Ctrl-C. A cache made with other settings is refused unless
    ``overwrite``.

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
        progress: show a progress bar on stderr.

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
    index = scan_folder(data)
    out_path = Path(out).expanduser() if out is not None else default_cache_path(data, backbone, weights, dtype, weights_file)
    if out_path.exists() and out_path.is_dir():
        raise ConfigError(f"--out {str(out_path)!r} is a directory; give a file path such as {out_path / 'cache.h5'}.")
    with writer_lock(out_path):
        return _extract_locked(
            index, out_path, t0, data=data, out=out, backbone=backbone, weights=weights, weights_file=weights_file,
            batch_size=batch_size, num_workers=num_workers, dev=dev, engine=engine, dtype=dtype,
            overwrite=overwrite, strict=strict, progress=progress, on_progress=on_progress,
        )


def _extract_locked(
    index: ImageIndex, out_path: Path, t0: float, *, data: str | os.PathLike, out: str | os.PathLike | None,
    backbone: str, weights: str | None, weights_file: str | os.PathLike | None, batch_size: int,
    num_workers: int | None, dev: str, engine: str, dtype: str, overwrite: bool, strict: bool, progress: bool,
    on_progress: Callable[[int, int], None] | None,
) -> ExtractReport:
    """The body of :func:`extract`, run while this process holds the cache's writer lock."""
    _remove_stale_temporaries(out_path)
    precision = precision_name(dev)

    from ..backbones import load_backbone, peek_identity

    bb = None
    identity = peek_identity(backbone, weights, weights_file)
    if identity is None:
        bb = load_backbone(backbone, weights, weights_file)
        identity = bb.identity()
    key = compute_cache_key(identity, dtype, precision)
    wanted = {**identity, "dtype": dtype, "precision": precision}

    state = None
    if not overwrite:
        try:
            state = read_state(out_path)
        except Exception as e:  # noqa: BLE001
            from ..errors import CacheError

            if isinstance(e, CacheError):
                raise CacheError(f"{e} The file was left untouched; pass --overwrite to replace it.") from None
            raise
        if state is not None:
            check_key(out_path, state, key, wanted)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging_path = out_path.with_name(out_path.name + ".partial")
    staging = StagingFile.open_if_valid(staging_path)
    if staging is not None and staging.key != key:
        staging.close()
        if not overwrite:
            from ..errors import CacheKeyMismatch

            raise CacheKeyMismatch(
                f"An interrupted run with other settings left {str(staging_path)!r}. Rerun it with "
                "its original settings to finish it, or pass --overwrite to discard it."
            )
        staging_path.unlink()
        staging = None

    report = ExtractReport(path=out_path, n_images=len(index), cache_key=key)
    cur = {p: i for i, p in enumerate(index.paths)}
    fps = index.fingerprints

    # Where each current file's embedding can come from.
    old_row = np.full(len(index), -1, np.int64)
    stage_row = np.full(len(index), -1, np.int64)
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
    need_paths = [index.paths[i] for i in need]
    plan = _plan_digest(need_paths, fps[need])
    if staging is not None and staging.plan != plan:
        # The folder changed since the interrupted run: fold its finished rows that are still
        # current into the cache first, then plan again from there.
        done = staging.done_mask()
        for j, p in enumerate(staging.paths):
            i = cur.get(p)
            if done[j] and i is not None and old_row[i] < 0 and tuple(fps[i]) == tuple(staging.fingerprints[j]):
                stage_row[i] = j
        staging.close()
        folded = bool((stage_row >= 0).any())
        if folded:
            _commit(out_path, index, old_row, stage_row, staging_path, kept_skipped, identity, key,
                    dtype, precision, "", "", state, partial=True)
        staging_path.unlink()
        # After a fold the cache carries this run's key; without one, an --overwrite run must
        # still overwrite (the old cache may have another key).
        return extract(
            data, out, backbone=backbone, weights=weights, weights_file=weights_file,
            batch_size=batch_size, num_workers=num_workers, device=dev, engine=engine,
            dtype=dtype, overwrite=overwrite and not folded, strict=strict, progress=progress,
            on_progress=on_progress,
        )
    report.n_reused = int((old_row >= 0).sum())
    report.n_removed = (len(state.paths) - report.n_reused) if state is not None else 0

    # Nothing to embed and nothing to drop: the cache is current, leave it byte for byte.
    if (
        state is not None
        and staging is None
        and len(need) == 0
        and report.n_removed == 0
        and state.metadata.get("classes_json") == json.dumps(index.classes)
        and state.metadata.get("root") == str(index.root)
        and state.metadata.get("layout") == index.layout
        and len(kept_skipped) == len(state.skipped_paths)
    ):
        report.up_to_date = True
        report.skipped = [(index.paths[i], r) for i, r in sorted(kept_skipped.items())]
        report.seconds = time.perf_counter() - t0
        if strict and report.skipped:
            raise SkippedImagesError(_strict_message(report))
        return report

    skipped_now: dict[int, str] = {}
    if len(need):
        eng = None
        if bb is None and engine in ("auto", "onnxruntime") and dev == "cpu":
            # An exported graph of this identity is all onnxruntime needs: building the torch
            # model too would cost seconds of fixed overhead per run.
            onnx_path = _onnx_cache_path(identity)
            if onnx_path.exists():
                try:
                    eng = _OrtEngine(path=onnx_path)
                except Exception:  # noqa: BLE001 - the normal route below reports real problems
                    eng = None
        if eng is None and bb is None:
            bb = load_backbone(backbone, weights, weights_file)
            if bb.identity() != identity:  # pragma: no cover - peek_identity must agree with load
                raise ConfigError("internal error: backbone identity changed between peek and load")
        report.model_loaded = True
        if staging is not None:
            report.n_resumed = int(staging.done_mask().sum())
        else:
            staging = StagingFile.create(
                staging_path, key, plan, need_paths, fps[need], index.labels[need], index.splits[need],
                int(identity["embed_dim"]), dtype,
            )
        new_skipped: dict[int, str] = {}
        try:
            ready = eng

            def make_engine() -> Any:
                return ready if ready is not None else _make_engine(engine, bb, dev, precision)

            report.n_embedded, eng = _run(
                staging, index.root, PreprocessConfig.from_dict(identity["transform"]), make_engine, dev,
                batch_size, num_workers, progress, on_progress, new_skipped,
            )
            if eng is not None:
                report.engine, report.device, report.precision = eng.name, dev, precision
        except KeyboardInterrupt:
            done_n = int(staging.done_mask().sum())
            staging.close()
            raise Interrupted(
                f"Interrupted: {done_n} of {len(need)} images are embedded and kept in "
                f"{staging_path}. Run the same command again to resume."
            ) from None
        done = staging.done_mask()
        for j, i in enumerate(need):
            if done[j]:
                stage_row[i] = j
        staging.close()
        skipped_now = {int(need[j]): r for j, r in new_skipped.items()}
    elif staging is not None:
        staging.close()

    all_skipped = {**kept_skipped, **skipped_now}
    _commit(out_path, index, old_row, stage_row, staging_path, all_skipped, identity, key, dtype,
            precision, report.engine, dev, state, partial=False)
    if staging_path.exists():
        staging_path.unlink()
    report.skipped = [(index.paths[i], r) for i, r in sorted(all_skipped.items())]
    report.seconds = time.perf_counter() - t0
    if report.skipped:
        warnings.warn(
            f"{report.n_skipped} image(s) could not be read and were skipped; they are listed in "
            f"{out_path} under skipped/.",
            SkippedImagesWarning,
            stacklevel=2,
        )
        if strict:
            raise SkippedImagesError(_strict_message(report))
    return report
