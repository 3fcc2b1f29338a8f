"""Image folder + backbone -> feature cache, incremental, resumable, with a report of skipped files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .cache import (
    StagingFile,
    check_key,
    compute_cache_key,
    default_cache_dir,
    read_state,
    write_cache,
    writer_lock,
)
from .data import ImageIndex, scan_folder
from .errors import ConfigError, Interrupted, SkippedImagesError, SkippedImagesWarning
from .images import ImageReadError, PreprocessConfig, load_and_preprocess

__all__ = ["ExtractReport", "extract", "default_cache_path", "resolve_device", "DEVICES", "ENGINES", "DTYPES"]

DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("auto", "torch", "onnxruntime")
DTYPES = ("float32", "float16")


@dataclass
class ExtractReport:
    """What one ``extract`` run did.

    Attributes:
        path: the cache file.
        n_images: images in the folder (rows in the cache plus skipped files).
        n_embedded: images embedded by this run.
        n_reused: rows kept from the existing cache (unchanged files).
        n_removed: rows dropped because their file was deleted or changed.
        n_resumed: rows embedded by an interrupted earlier run and taken from its staging file.
        skipped: ``[(relative path, reason)]`` for every file that could not be read.
        engine, device, precision: how embeddings were computed (empty when nothing was embedded).
        seconds: wall time; ``images_per_second`` counts embedded images only.
        up_to_date: nothing had changed, the cache was not rewritten.
        model_loaded: whether the backbone was loaded at all.
    """

    path: Path
    n_images: int = 0
    n_embedded: int = 0
    n_reused: int = 0
    n_removed: int = 0
    n_resumed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    engine: str = ""
    device: str = ""
    precision: str = ""
    seconds: float = 0.0
    up_to_date: bool = False
    model_loaded: bool = False
    cache_key: str = ""

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def images_per_second(self) -> float:
        return self.n_embedded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        parts = [f"{self.path}: {self.n_images - self.n_skipped} rows"]
        if self.up_to_date:
            parts.append("up to date, nothing embedded")
        else:
            parts.append(f"{self.n_embedded} embedded, {self.n_reused} reused, {self.n_removed} dropped")
            if self.n_resumed:
                parts.append(f"{self.n_resumed} resumed from an interrupted run")
            if self.n_embedded:
                parts.append(f"{self.images_per_second:.1f} img/s with {self.engine} on {self.device}")
        if self.skipped:
            parts.append(f"{self.n_skipped} skipped")
        return "; ".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "data"


def default_cache_path(
    data: str | os.PathLike, backbone: str, weights: str | None = None, dtype: str = "float32",
    weights_file: str | os.PathLike | None = None,
) -> Path:
    """``<cache dir>/caches/<folder>-<hash>-<backbone>[-<weights>][-file-<name>-<hash>][-<dtype>].h5``.

    The hashes are of absolute paths (the data folder, the weights file), so two weight files for
    one backbone get two caches instead of refusing each other's.
    """
    root = Path(data).expanduser().resolve()
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    bb = Path(backbone).name if os.sep in backbone or Path(backbone).is_dir() else backbone
    name = f"{_slug(root.name)}-{digest}-{_slug(bb)}"
    if weights:
        name += f"-{_slug(weights)}"
    if weights_file is not None:
        wf = Path(weights_file).expanduser().resolve()
        name += f"-file-{_slug(wf.stem)}-{hashlib.sha256(str(wf).encode()).hexdigest()[:8]}"
    if dtype != "float32":
        name += f"-{dtype}"
    return default_cache_dir() / "caches" / f"{name}.h5"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA GPU is visible, else ``cpu``."""
    if device not in DEVICES:
        raise ConfigError(f"The 'device' parameter must be one of {DEVICES}. Got {device!r} instead.")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is visible. Use --device cpu.")
    return device


def _precision(device: str) -> str:
    if device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------


class _TorchEngine:
    name = "torch"

    def __init__(self, backbone: Any, device: str, precision: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        model = backbone.embedder().eval().to(self.device)
        if self.device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)

    def __call__(self, batch: Any) -> np.ndarray:
        torch = self.torch
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True)
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    y = self.model(x)
            else:
                y = self.model(x)
            return y.float().cpu().numpy()


def _onnx_cache_path(identity: dict[str, Any]) -> Path:
    import torch

    blob = json.dumps({"identity": identity, "torch": torch.__version__, "featbank": __version__}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return default_cache_dir() / "onnx" / f"{_slug(identity['backbone'])}-{digest}.onnx"


def export_embedder_onnx(backbone: Any, path: Path) -> Path:
    """Export uint8 NHWC -> embeddings to ONNX with a dynamic batch axis (atomic write)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = backbone.preprocess.input_size
    model = backbone.embedder().eval()
    x = torch.zeros((2, h, w, 3), dtype=torch.uint8)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                input_names=["images"],
                output_names=["embeddings"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},),
                dynamo=True,
                external_data=False,
            )
    os.replace(tmp, path)
    return path


class _OrtEngine:
    name = "onnxruntime"

    def __init__(self, backbone: Any = None, path: Path | None = None):
        import onnxruntime as ort

        if path is None:
            path = _onnx_cache_path(backbone.identity())
            if not path.exists():
                export_embedder_onnx(backbone, path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads would otherwise spin and take CPU from the image-decoding workers.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: Any) -> np.ndarray:
        arr = batch.numpy() if hasattr(batch, "numpy") else batch
        return self.session.run(None, {self.input_name: np.ascontiguousarray(arr)})[0]


def _make_engine(engine: str, backbone: Any, device: str, precision: str) -> Any:
    if engine not in ENGINES:
        raise ConfigError(f"The 'engine' parameter must be one of {ENGINES}. Got {engine!r} instead.")
    if engine == "onnxruntime" and device != "cpu":
        raise ConfigError("--engine onnxruntime runs on the CPU here; use --device cpu or --engine torch.")
    if engine == "torch" or (engine == "auto" and device != "cpu"):
        return _TorchEngine(backbone, device, precision)
    try:
        return _OrtEngine(backbone)
    except Exception as e:  # noqa: BLE001 - auto falls back, explicit choice reports
        if engine == "onnxruntime":
            raise ConfigError(f"The onnxruntime engine could not be built for {backbone.name!r}: {e}") from None
        warnings.warn(f"onnxruntime engine unavailable ({e}); using torch.", RuntimeWarning, stacklevel=3)
        return _TorchEngine(backbone, device, precision)


# --------------------------------------------------------------------------------------------
# Data loading
# --------------------------------------------------------------------------------------------


class _Images:
    """Map-style dataset over staging rows; a bad image yields a reason instead of pixels."""

    def __init__(self, root: Path, paths: list[str], rows: np.ndarray, cfg: PreprocessConfig):
        self.root, self.paths, self.rows, self.cfg = root, paths, rows, cfg

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        row = int(self.rows[i])
        try:
            return row, load_and_preprocess(self.root / self.paths[row], self.cfg), ""
        except ImageReadError as e:
            return row, None, e.reason
        except Exception as e:  # noqa: BLE001 - never let one file kill a long run
            return row, None, f"unexpected error: {type(e).__name__}: {e}"


class _Collate:
    def __init__(self, cfg: PreprocessConfig):
        self.shape = (*cfg.input_size, 3)

    def __call__(self, items: list[tuple[int, np.ndarray | None, str]]) -> tuple[np.ndarray, Any, np.ndarray, list[str]]:
        import torch

        rows = np.array([it[0] for it in items], np.int64)
        ok = np.array([it[1] is not None for it in items], bool)
        batch = np.zeros((len(items), *self.shape), np.uint8)
        for j, it in enumerate(items):
            if it[1] is not None:
                batch[j] = it[1]
        return rows, torch.from_numpy(batch), ok, [it[2] for it in items]


def _default_workers(device: str) -> int:
    n = os.cpu_count() or 1
    # Two at least: one decoding process cannot keep up with onnxruntime even on 2 cores.
    return min(8, max(2, n - 1)) if device == "cpu" else min(16, n)


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def _plan_digest(paths: list[str], fps: np.ndarray) -> str:
    h = hashlib.sha256()
    for p, fp in zip(paths, fps):
        h.update(p.encode("utf-8", "surrogateescape") + b"\0" + f"{fp[0]}:{fp[1]}".encode() + b"\n")
    return h.hexdigest()


def _validate(batch_size: int, num_workers: int | None, dtype: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"The 'batch_size' parameter must be a positive integer. Got {batch_size!r} instead.")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ConfigError(f"The 'num_workers' parameter must be an integer >= 0. Got {num_workers!r} instead.")
    if dtype not in DTYPES:
        raise ConfigError(f"The 'dtype' parameter must be one of {DTYPES}. Got {dtype!r} instead.")


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
    dev = resolve_device(device)
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


def _remove_stale_temporaries(out_path: Path) -> None:
    """Temporary files of a run killed while it swapped a file into place (we hold the lock now)."""
    pattern = re.compile(rf"^(\.{re.escape(out_path.name)}|{re.escape(out_path.name)}\.partial)\.tmp\d+$")
    if out_path.parent.is_dir():
        for p in out_path.parent.iterdir():
            if pattern.match(p.name):
                try:
                    p.unlink()
                except OSError:
                    pass


def _extract_locked(
    index: ImageIndex, out_path: Path, t0: float, *, data: str | os.PathLike, out: str | os.PathLike | None,
    backbone: str, weights: str | None, weights_file: str | os.PathLike | None, batch_size: int,
    num_workers: int | None, dev: str, engine: str, dtype: str, overwrite: bool, strict: bool, progress: bool,
    on_progress: Callable[[int, int], None] | None,
) -> ExtractReport:
    """The body of :func:`extract`, run while this process holds the cache's writer lock."""
    _remove_stale_temporaries(out_path)
    precision = _precision(dev)

    from .backbones import load_backbone, peek_identity

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
            from .errors import CacheError

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
            from .errors import CacheKeyMismatch

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


def _strict_message(report: ExtractReport) -> str:
    lines = [f"--strict: {report.n_skipped} image(s) were skipped (the cache {report.path} was still written):"]
    lines += [f"  {p}: {r}" for p, r in report.skipped[:20]]
    if report.n_skipped > 20:
        lines.append(f"  ... and {report.n_skipped - 20} more (see skipped/ in the cache)")
    return "\n".join(lines)


def _run(
    staging: StagingFile,
    root: Path,
    cfg: PreprocessConfig,
    make_engine: Callable[[], Any],
    device: str,
    batch_size: int,
    num_workers: int | None,
    progress: bool,
    on_progress: Callable[[int, int], None] | None,
    skipped: dict[int, str],
) -> tuple[int, Any]:
    import torch
    from torch.utils.data import DataLoader

    pending = np.flatnonzero(~staging.done_mask())
    total = len(staging.paths)
    if len(pending) == 0:
        return 0, None
    workers = _default_workers(device) if num_workers is None else num_workers
    loader = DataLoader(
        _Images(root, staging.paths, pending, cfg),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_Collate(cfg),
        pin_memory=device == "cuda",
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, initial=total - len(pending), unit="img", disable=not progress,
        desc="extract", dynamic_ncols=True, smoothing=0.1,
        # In a log file (CI, nohup) one line every 10 s, not one per batch.
        mininterval=0.1 if sys.stderr.isatty() else 10.0,
    )
    n_new = 0
    # Start the decoding workers first (they fork before any inference thread exists) and build
    # and warm up the engine while they fill the prefetch queue: fixed costs overlap.
    batches = iter(loader)
    eng = make_engine()
    eng(np.zeros((min(batch_size, len(pending)), *cfg.input_size, 3), np.uint8))
    try:
        for rows, batch, ok, reasons in batches:
            if ok.any():
                emb = eng(batch if ok.all() else batch[torch.from_numpy(ok)])
                full = np.zeros((len(rows), emb.shape[1]), staging.embeddings.dtype)
                full[ok] = emb
                _write_block(staging, rows, full, ok)
                n_new += int(ok.sum())
            for r, good, why in zip(rows, ok, reasons):
                if not good:
                    skipped[int(r)] = why
            bar.update(len(rows))
            if skipped:
                bar.set_postfix(skipped=len(skipped), refresh=False)
            if on_progress is not None:
                on_progress(int(bar.n), total)
    finally:
        bar.close()
    return n_new, eng


def _write_block(staging: StagingFile, rows: np.ndarray, emb: np.ndarray, ok: np.ndarray) -> None:
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == len(rows):
        staging.embeddings[lo:hi] = emb
        staging.file.flush()
        current = staging.status[lo:hi]
        staging.status[lo:hi] = np.where(ok, 1, current).astype(np.uint8)
        staging.file.flush()
    else:
        staging.write_rows(rows[ok], emb[ok])


def _commit(
    out_path: Path,
    index: ImageIndex,
    old_row: np.ndarray,
    stage_row: np.ndarray,
    staging_path: Path,
    skipped: dict[int, str],
    identity: dict[str, Any],
    key: str,
    dtype: str,
    precision: str,
    engine: str,
    device: str,
    state: Any,
    partial: bool,
) -> None:
    have = (old_row >= 0) | (stage_row >= 0)
    rows = np.flatnonzero(have)
    created = state.metadata.get("created") if state is not None else None
    engines = list(state.metadata.get("engines", [])) if state is not None else []
    if isinstance(engines, str):
        engines = json.loads(engines)
    if engine and engine not in engines:
        engines.append(engine)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    attrs = {
        "cache_key": key,
        "backbone": identity["backbone"],
        "weights": identity["weights"],
        "weights_sha256": identity["weights_sha256"],
        "transform": identity["transform"],
        "precision": precision,
        "engine": engine or (state.metadata.get("engine", "") if state is not None else ""),
        "engines": engines,
        "device": device or (state.metadata.get("device", "") if state is not None else ""),
        "root": str(index.root),
        "layout": index.layout,
        "classes_json": json.dumps(index.classes),
        "created": created or now,
        "updated": now,
        "complete": not partial,
    }
    sources = []
    if state is not None:
        sources.append(("old", out_path, old_row[rows]))
    if staging_path.exists():
        sources.append(("new", staging_path, stage_row[rows]))
    embed_dim = identity["embed_dim"]
    write_cache(
        out_path,
        sources=sources,
        order_paths=[index.paths[i] for i in rows],
        row_fingerprints=index.fingerprints[rows],
        row_labels=index.labels[rows],
        row_splits=index.splits[rows],
        classes=index.classes,
        skipped=[(index.paths[i], r, tuple(int(v) for v in index.fingerprints[i])) for i, r in sorted(skipped.items())],
        embed_dim=embed_dim,
        dtype=dtype,
        attrs=attrs,
    )
