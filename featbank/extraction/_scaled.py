"""`extract` at scale: a row source -> a schema-v2 cache (parts + index), with a launcher.

:func:`featbank.extract` routes here when the run asks for it (``procs > 1``, a launcher, a shard
size, ``finalize``, torchrun's environment, a manifest or WebDataset input, or an ``out`` that is
already a schema-v2 index); a plain image folder into a new or schema-v1 cache keeps the v1 route.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py

from ..cache import writer_lock
from ..cache._parts import part_name, parts_dir, rows_digest
from ..cache._schema import _FORMAT, _decode, compute_cache_key, describe_feature_difference
from ..errors import CacheError, CacheKeyMismatch, ConfigError, Interrupted, SkippedImagesError, SkippedImagesWarning
from ._plan import DEFAULT_SHARD_SIZE
from ._report import ExtractReport, _strict_message

__all__ = ["ScaleOptions", "wants_sharded", "read_source", "extract_sharded", "schema_version_of"]


@dataclass(frozen=True)
class ScaleOptions:
    """How a sharded run is cut and launched, and how a manifest or WebDataset input is read."""

    procs: int = 1
    launcher: str | None = None
    shard_size: int | None = None
    finalize: bool = False
    num_gpus: float = 0.0
    max_retries: int = 3
    path_column: str = "path"
    label_column: str | None = "label"
    split_column: str | None = "split"
    label_from: str = "cls"


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _is_webdataset(data: str) -> bool:
    if "{" in data and data.endswith(".tar"):
        return True
    p = Path(data).expanduser()
    if p.is_file():
        return p.suffix == ".tar"
    if p.is_dir():
        try:
            return any(c.suffix == ".tar" and c.is_file() for c in p.iterdir())
        except OSError:
            return False
    return False


def _is_manifest(data: str) -> bool:
    return Path(data).suffix.lower() in (".csv", ".tsv", ".parquet")


def schema_version_of(path: Path) -> int | None:
    """The ``schema_version`` of a featbank cache at ``path``; None when there is none (or unreadable)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != _FORMAT:
                return None
            v = f.attrs.get("schema_version")
            return int(v) if v is not None else None
    except (OSError, ValueError, TypeError):
        return None


def wants_sharded(data: str, out_path: Path, scale: ScaleOptions) -> bool:
    """Whether this run takes the sharded (schema-v2) route."""
    return (
        scale.procs != 1 or scale.launcher is not None or scale.shard_size is not None or scale.finalize
        or _world_size() > 1 or _is_manifest(data) or _is_webdataset(data) or schema_version_of(out_path) == 2
    )


def read_source(data: str, scale: ScaleOptions) -> Any:
    """DATA as a :class:`RowSource`: a manifest, WebDataset shards, or an image folder."""
    from .._sources import read_manifest, read_webdataset
    from ..data import scan_folder
    from ._sharded import RowSource

    if _is_manifest(data):
        return read_manifest(data, path_column=scale.path_column, label_column=scale.label_column,
                             split_column=scale.split_column)
    if _is_webdataset(data):
        return read_webdataset(data, label_from=scale.label_from)
    return RowSource.from_index(scan_folder(data))


def _migrate_or_refuse(out_path: Path, key: str, shard_size: int, torchrun: bool, features: Any = None,
                       plain_key: str = "") -> None:
    """A schema-v1 cache at ``out_path`` becomes a v2 index (same key only); under torchrun, refuse."""
    from ._sharded import migrate_v1

    if schema_version_of(out_path) != 1:
        return
    with h5py.File(out_path, "r") as f:
        have = str(f.attrs.get("cache_key", ""))
        diff = describe_feature_difference(f.attrs, features.key_part() if features is not None else {})
    if have != key and diff and have == plain_key:  # a v1 cache holds no layers/views: they are the difference
        raise CacheKeyMismatch(f"Cache {str(out_path)!r} was extracted with other layers or views: {diff}. The file "
                               "was left untouched. Pass --overwrite to replace it, or choose another --out.")
    if have != key:
        raise CacheKeyMismatch(
            f"Cache {str(out_path)!r} was made with other settings (cache key {have[:12]}…, this run's is "
            f"{key[:12]}…). The file was left untouched. Pass --overwrite to replace it, or choose another --out."
        )
    if torchrun:
        raise CacheError(
            f"{str(out_path)!r} is a schema-v1 cache; torchrun ranks do not migrate it. Run "
            f"'featbank extract DATA --out {out_path} --shard-size {shard_size}' once (it migrates the file "
            "to schema v2 without embedding anything new that is unchanged), then start torchrun again."
        )
    migrate_v1(out_path, shard_size=shard_size)


def _run_key(backbone: str, weights: str | None, weights_file: str | None, dtype: str, device: str,
             features: Any = None) -> str:
    from .._device import precision_name
    from ._sharded import _identity

    return compute_cache_key(_identity(backbone, weights, weights_file), dtype, precision_name(device.split(":")[0]),
                             features.key_part() if features is not None else None)


def _up_to_date(prep: Any) -> bool:
    """No job left and the published index already lists exactly the planned parts and attributes."""
    if prep.jobs or not prep.index_path.is_file():
        return False
    try:
        with h5py.File(prep.index_path, "r") as f:
            names = _decode(f["parts/names"][...])
            same_attrs = all(str(f.attrs.get(k, "")) == str(prep.attrs[k]) for k in ("root", "layout", "classes_json"))
            listed = str(f.attrs.get("listing_skipped", "[]"))
    except (OSError, KeyError):
        return False
    want = [part_name(p.shard_id, p.rows_digest) for p in prep.planned]
    return names == want and same_attrs and listed == json.dumps([list(s) for s in prep.skipped])


def _counts(prep: Any, rank: int = 0, world: int = 1) -> tuple[int, int]:
    """(embedded, reused) rows of the parts the jobs of ``rank`` (all jobs when ``world`` is 1) wrote."""
    embedded = reused = 0
    folder = parts_dir(prep.index_path)
    for job in prep.jobs:
        if job.shard_id % world != rank:
            continue
        part = folder / part_name(job.shard_id, rows_digest(job.rows, job.classes))
        try:
            with h5py.File(part, "r") as f:
                n_reused = int(f.attrs.get("n_reused", 0))
                n_bad = int(f["skipped/paths"].shape[0]) if "skipped/paths" in f else 0
        except (OSError, KeyError):
            continue  # another torchrun rank's shard, or not written
        reused += n_reused
        embedded += max(0, len(job.rows.paths) - n_reused - n_bad)
    return embedded, reused


def _skipped(index_path: Path) -> list[tuple[str, str]]:
    """Every skipped row of a published index: the parts' ``skipped/`` and rows refused while listing."""
    with h5py.File(index_path, "r") as f:
        out = list(zip(_decode(f["skipped/paths"][...]), _decode(f["skipped/reasons"][...])))
        listed = json.loads(str(f.attrs.get("listing_skipped", "[]")))
    return sorted(out + [(str(k), str(r)) for k, r, *_ in listed])


def extract_sharded(data: str, out_path: Path, opts: Any, scale: ScaleOptions, t0: float) -> ExtractReport:
    """Run one sharded extraction of ``data`` into the schema-v2 cache ``out_path`` (see :func:`featbank.extract`)."""
    from .._device import default_num_workers
    from ._launch import resolve_launcher, run_prepared
    from ._sharded import prepare

    launcher = resolve_launcher(scale.launcher or "auto")
    torchrun = launcher == "torchrun"
    if scale.shard_size is not None and (not isinstance(scale.shard_size, int) or scale.shard_size < 1):
        raise ConfigError(f"The 'shard_size' parameter must be a positive integer. Got {scale.shard_size!r} instead.")
    shard_size = scale.shard_size or DEFAULT_SHARD_SIZE
    in_worker = launcher == "local" and scale.procs > 1  # local workers are daemonic: no DataLoader children
    if in_worker and opts.num_workers:
        raise ConfigError(
            f"--num-workers {opts.num_workers} with --procs {scale.procs}: each local worker process decodes its own "
            "images, so --num-workers must be 0 there (or use --procs 1, or torchrun / --launcher ray)."
        )
    workers = opts.num_workers if opts.num_workers is not None else 0 if in_worker else default_num_workers(opts.device)
    engine = opts.engine if opts.engine != "auto" else ("onnxruntime" if opts.device == "cpu" else "torch")
    weights_file = str(opts.weights_file) if opts.weights_file is not None else None
    rank = int(os.environ.get("RANK", "0")) if torchrun else 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(out_path) if rank == 0 else nullcontext():
        source = read_source(data, scale)
        if not opts.overwrite:
            key = _run_key(opts.backbone, opts.weights, weights_file, opts.dtype, opts.device, opts.features)
            plain = _run_key(opts.backbone, opts.weights, weights_file, opts.dtype, opts.device) if opts.features else key
            _migrate_or_refuse(out_path, key, shard_size, torchrun, opts.features, plain)
        prep = prepare(source, out_path, backbone=opts.backbone, weights=opts.weights, weights_file=weights_file,
                       engine=engine, device=opts.device, dtype=opts.dtype, batch_size=opts.batch_size,
                       num_workers=workers, shard_size=shard_size, overwrite=opts.overwrite, features=opts.features)
        report = ExtractReport(path=out_path, cache_key=prep.key)
        if not scale.finalize and _up_to_date(prep):
            report.up_to_date = True
        else:
            try:
                sharded = run_prepared(prep, launcher=launcher, procs=scale.procs, num_gpus=scale.num_gpus,
                                       max_retries=scale.max_retries, finalize_only=scale.finalize)
            except KeyboardInterrupt:
                raise Interrupted(
                    f"Interrupted: finished parts are kept in {parts_dir(out_path)}. Run the same command again "
                    "to resume."
                ) from None
            report.model_loaded = bool(prep.jobs) and not scale.finalize
            report.engine, report.device = (engine, opts.device) if report.model_loaded else ("", "")
            if not sharded.published:  # a torchrun rank other than 0: rank 0 publishes
                report.n_embedded, report.n_reused = _counts(prep, rank, _world_size())
                report.n_images = sum(p.n_rows for p in prep.planned)
                report.seconds = time.perf_counter() - t0
                return report
    return _finish_report(report, prep, t0, opts.strict, scale.finalize)


def _finish_report(report: ExtractReport, prep: Any, t0: float, strict: bool, finalize_only: bool) -> ExtractReport:
    with h5py.File(prep.index_path, "r") as f:
        n_rows = int(f["embeddings"].shape[0])
    report.skipped = _skipped(prep.index_path)
    report.n_images = n_rows + len(report.skipped)
    if not report.up_to_date and not finalize_only:
        report.n_embedded, _ = _counts(prep)
        report.n_reused = n_rows - report.n_embedded
    else:
        report.n_reused = n_rows
    report.seconds = time.perf_counter() - t0
    if report.skipped and not report.up_to_date:
        warnings.warn(
            f"{report.n_skipped} image(s) could not be read and were skipped; they are listed in "
            f"{report.path} under skipped/.", SkippedImagesWarning, stacklevel=4,
        )
    if strict and report.skipped:
        raise SkippedImagesError(_strict_message(report))
    return report
