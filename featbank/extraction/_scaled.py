"""`extract` itself: a row source -> a schema-v2 cache (parts + index), with a launcher.

Every :func:`featbank.extract` run comes here, a folder of 2,000 images as much as WebDataset
shards under torchrun: one cache format. A schema-v1 cache at ``out`` is checked (key, damage)
and migrated first; a cache with another key or a damaged one is refused, left untouched.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..cache import writer_lock
from ..cache._parts import part_name, parts_dir, rows_digest
from ..cache._schema import FORMAT, compute_cache_key, decode_attr
from ..errors import CacheError, ConfigError, Interrupted, NotACacheError, SkippedImagesError, SkippedImagesWarning
from ._plan import DEFAULT_SHARD_SIZE, check_shard_size
from ._report import ExtractReport, strict_message

__all__ = ["ScaleOptions", "read_source", "extract_sharded", "schema_version_of"]


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


def is_webdataset(data: str) -> bool:
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


def is_manifest(data: str) -> bool:
    return Path(data).suffix.lower() in (".csv", ".tsv", ".parquet")


def schema_version_of(path: Path) -> int | None:
    """The ``schema_version`` of a featbank cache at ``path``: None when there is no featbank cache (or
    it is unreadable), -1 when the attribute is not an integer."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                return None
            v = f.attrs.get("schema_version")
            # Strictly an integer: 1.5 or "one" is a damaged file, not a version (the reader says so).
            ok = isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
            return int(v) if ok else -1
    except (OSError, ValueError, TypeError):
        return None


def read_source(data: str, scale: ScaleOptions) -> Any:
    """DATA as a :class:`RowSource`: a manifest, WebDataset shards, or an image folder."""
    from .._sources import read_manifest, read_webdataset
    from ..data import scan_folder
    from ._sharded import RowSource

    if is_manifest(data):
        return read_manifest(data, path_column=scale.path_column, label_column=scale.label_column,
                             split_column=scale.split_column)
    if is_webdataset(data):
        return read_webdataset(data, label_from=scale.label_from)
    return RowSource.from_index(scan_folder(data))


def _write_target(out_path: Path) -> Path:
    """The file the index is written to: a symlink's target (the link stays), else ``out_path``."""
    return Path(os.path.realpath(out_path)) if out_path.is_symlink() else out_path


def _run_identity(opts: Any) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(backbone identity, cache key, what the key covers) of this run's settings."""
    from .._device import precision_name
    from ..backbones import identity_with_window
    from ._sharded import identity_of

    weights_file = str(opts.weights_file) if opts.weights_file is not None else None
    identity = identity_with_window(identity_of(opts.backbone, opts.weights, weights_file), opts.window)
    precision = precision_name(opts.device.split(":")[0])
    features = opts.features.key_part() if opts.features is not None else None
    decode = getattr(opts, "decode", "pillow")
    wanted = {**identity, "dtype": opts.dtype, "precision": precision, "features": features or {}, "decode": decode}
    return identity, compute_cache_key(identity, opts.dtype, precision, features, decode), wanted


def _raw_metadata(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        meta = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    try:
        meta["transform"] = json.loads(meta.get("transform", "null"))
    except (TypeError, ValueError):
        pass
    return meta


def _check_existing(index_path: Path, key: str, wanted: dict[str, Any]) -> None:
    """The cache already at ``index_path`` must be readable and carry this run's key; else refuse, untouched.

    A schema-v2 index whose only problem is a missing or changed part is fine: the run recomputes
    those parts (which is what the reader's message tells the user to do).
    """
    from ..cache import FeatureCache, check_key
    from ..cache._index import check_parts

    version = schema_version_of(index_path)
    if version is None:
        return
    try:
        with FeatureCache(index_path, extreme="ignore", allow_incomplete=True) as c:
            meta = dict(c.metadata)
    except NotACacheError:
        raise
    except CacheError as e:
        try:
            damaged_parts = version == 2 and bool(check_parts(index_path))
        except (OSError, KeyError, ValueError, TypeError, CacheError):
            damaged_parts = False
        if not damaged_parts:
            raise CacheError(f"{e} The file was left untouched; pass --overwrite to replace it.") from None
        meta = _raw_metadata(index_path)
    check_key(index_path, str(meta.get("cache_key", "")), meta, key, wanted)


def _migrate_or_refuse(index_path: Path, shard_size: int, torchrun: bool) -> None:
    """A schema-v1 cache at ``index_path`` (its key already checked) becomes a v2 index; under torchrun, refuse."""
    from ._sharded import migrate_v1

    if schema_version_of(index_path) != 1:
        return
    if torchrun:
        raise CacheError(
            f"{str(index_path)!r} is a schema-v1 cache; torchrun ranks do not migrate it. Run "
            f"'featbank extract DATA --out {index_path} --shard-size {shard_size}' once (it migrates the file "
            "to schema v2 without embedding anything new that is unchanged), then start torchrun again."
        )
    migrate_v1(index_path, shard_size=shard_size)


def _drop_replaced_parts(index_path: Path, key: str) -> None:
    """--overwrite: the parts of the cache being replaced are recomputed, not trusted (a part of the same
    rows and key would otherwise be taken as done); parts of other keys go too. Parts an interrupted
    --overwrite run finished (listed by no index) and its ``.partial`` files are kept: a rerun resumes."""
    from ..cache._index import read_parts_table

    folder = parts_dir(index_path)
    if not folder.is_dir():
        return
    try:
        listed = {p.name for p in read_parts_table(index_path)} if schema_version_of(index_path) is not None else set()
    except (OSError, KeyError, ValueError, TypeError, IndexError, CacheError):
        listed = set()
    for p in folder.glob("part-*.h5"):
        try:
            with h5py.File(p, "r") as f:
                same = str(f.attrs.get("cache_key", "")) == key
        except OSError:
            same = False
        if not same or p.name in listed:
            p.unlink(missing_ok=True)


def _up_to_date(prep: Any) -> bool:
    """No job left and the published index already lists exactly the planned parts and attributes."""
    if prep.jobs or not prep.index_path.is_file():
        return False
    try:
        with h5py.File(prep.index_path, "r") as f:
            names = decode_attr(f["parts/names"][...])
            same_attrs = all(str(f.attrs.get(k, "")) == str(prep.attrs[k]) for k in ("root", "layout", "classes_json"))
            listed = str(f.attrs.get("listing_skipped", "[]"))
            complete = f.attrs.get("complete", True) is not False and bool(f.attrs.get("complete", True))
    except (OSError, KeyError):
        return False
    want = [part_name(p.shard_id, p.rows_digest) for p in prep.planned]
    return names == want and same_attrs and complete and listed == json.dumps([list(s) for s in prep.skipped])


def _run_bytes(prep: Any, dtype: str) -> tuple[list[int], int]:
    """Estimated sizes of the parts this run writes (layers and views included) and of the index."""
    from ..cache._writer import estimate_bytes, feature_values_per_row

    settings = prep.jobs[0].settings
    extra = settings.features.datasets() if settings.features is not None else {}
    values = feature_values_per_row(extra)
    sizes = [estimate_bytes(len(j.rows), int(settings.embed_dim), dtype, j.rows.paths, extra_values=values)
             for j in prep.jobs]
    # the index maps every per-row dataset onto every part (a few hundred bytes per mapping)
    return sizes, (64 << 10) + (1024 + 256 * len(extra)) * len(prep.planned)


def _check_space(prep: Any, index_path: Path, dtype: str) -> None:
    """Refuse before writing when the parts this run writes (and the index) do not fit: disk or ulimit -f."""
    from ..cache._writer import check_space

    if not prep.jobs:
        return
    sizes, index_bytes = _run_bytes(prep, dtype)
    kept = (f"The cache '{index_path}' was left as it was." if index_path.exists() else "No cache was written.")
    if any(parts_dir(index_path).glob(".*.partial")):
        kept += f" Parts finished or begun so far are kept in '{parts_dir(index_path)}'; a rerun resumes from there."
    check_space(index_path, sum(sizes) + index_bytes, kept, largest_file=max(sizes + [index_bytes]))


class _Progress:
    """The progress bar (stderr) and ``on_progress(done, total)`` over the rows of this run's shards."""

    def __init__(self, prep: Any, opts: Any):
        self.total = sum(len(j.rows) for j in prep.jobs)
        self.done = 0
        self.on_progress = opts.on_progress
        self.bar = None
        if opts.progress and self.total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="img", desc="extract", dynamic_ncols=True, smoothing=0.1,
                            mininterval=0.1 if sys.stderr.isatty() else 10.0)  # in a log: a line every 10 s

    def __call__(self, n: int) -> None:
        if not n:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _counts(prep: Any, rank: int = 0, world: int = 1) -> dict[str, int]:
    """Rows of the parts the jobs of ``rank`` (all jobs when ``world`` is 1) wrote: embedded (tried),
    reused from old parts, resumed from an interrupted run."""
    from ._launch import rank_shards

    out = {"embedded": 0, "reused": 0, "resumed": 0, "tried": 0}
    folder = parts_dir(prep.index_path)
    mine = rank_shards(prep, rank, world) if world > 1 else None
    for job in prep.jobs:
        if mine is not None and job.shard_id not in mine:
            continue
        part = folder / part_name(job.shard_id, rows_digest(job.rows, job.classes))
        try:
            with h5py.File(part, "r") as f:
                n_reused = int(f.attrs.get("n_reused", 0))
                n_resumed = int(f.attrs.get("n_resumed", 0))
                n_bad = int(f["skipped/paths"].shape[0]) if "skipped/paths" in f else 0
        except (OSError, KeyError):
            continue  # another torchrun rank's shard, or not written
        tried = max(0, len(job.rows.paths) - n_reused - n_resumed)
        out["reused"] += n_reused
        out["resumed"] += n_resumed
        out["tried"] += tried
        out["embedded"] += max(0, tried - n_bad)
    return out


def _skipped(index_path: Path) -> list[tuple[str, str]]:
    """Every skipped row of a published index: the parts' ``skipped/`` and rows refused while listing."""
    with h5py.File(index_path, "r") as f:
        out = list(zip(decode_attr(f["skipped/paths"][...]), decode_attr(f["skipped/reasons"][...])))
        listed = json.loads(str(f.attrs.get("listing_skipped", "[]")))
    return sorted(out + [(str(k), str(r)) for k, r, *_ in listed])


def _old_rows_dropped(index_path: Path, prep: Any) -> int:
    """Rows of the published index that live in parts this run replaces (before subtracting the reused)."""
    from ..cache._index import read_parts_table

    if schema_version_of(index_path) != 2:
        return 0
    try:
        table = read_parts_table(index_path)
    except (OSError, KeyError, ValueError, TypeError, CacheError):
        return 0
    keep = {part_name(p.shard_id, p.rows_digest) for p in prep.planned}
    return sum(p.n_rows for p in table if p.name not in keep)


def extract_sharded(data: str, out_path: Path, opts: Any, scale: ScaleOptions, t0: float) -> ExtractReport:
    """Run one extraction of ``data`` into the schema-v2 cache ``out_path`` (see :func:`featbank.extract`)."""
    from ._cachefile import remove_dead_part_temporaries, remove_stale_temporaries
    from ._launch import resolve_launcher, run_prepared
    from ._sharded import reset_engines

    reset_engines()
    launcher = resolve_launcher(scale.launcher or "auto")
    if launcher == "local" and scale.procs > 1:  # the workers' fork server imports torch while this process plans
        from ._schedule import start_worker_server
        start_worker_server()
    torchrun = launcher == "torchrun"
    if scale.shard_size is not None:
        check_shard_size(scale.shard_size)
    shard_size = scale.shard_size or DEFAULT_SHARD_SIZE
    rank = int(os.environ.get("RANK", "0")) if torchrun else 0
    index_path = _write_target(out_path)
    with writer_lock(index_path) if rank == 0 else nullcontext():  # the lock names a folder it cannot create
        index_path.parent.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            remove_stale_temporaries(index_path)
            if not torchrun:  # torchrun ranks may run on other hosts, whose pids this one cannot see
                remove_dead_part_temporaries(parts_dir(index_path))
        source = read_source(data, scale)
        identity, key, wanted = _run_identity(opts)
        if not opts.overwrite:
            _check_existing(index_path, key, wanted)
            _migrate_or_refuse(index_path, shard_size, torchrun)
        elif rank == 0:
            _drop_replaced_parts(index_path, key)
        prep = _prepare(source, index_path, opts, scale, launcher, shard_size, identity)
        report = ExtractReport(path=out_path, cache_key=prep.key, n_duplicates=len(source.duplicates))
        dropped = _old_rows_dropped(index_path, prep) if not opts.overwrite else 0
        if not scale.finalize and not opts.overwrite and _up_to_date(prep):
            report.up_to_date = True
        else:
            if not scale.finalize and rank == 0:
                _check_space(prep, index_path, opts.dtype)
            progress = _Progress(prep, opts) if rank == 0 and not scale.finalize else None
            try:
                sharded = run_prepared(prep, launcher=launcher, procs=scale.procs, num_gpus=scale.num_gpus,
                                       max_retries=scale.max_retries, finalize_only=scale.finalize, on_rows=progress)
            except KeyboardInterrupt:
                raise Interrupted(
                    f"Interrupted: finished parts and the rows embedded so far are kept in {parts_dir(index_path)}. "
                    "Run the same command again to resume."
                ) from None
            finally:
                if progress is not None:
                    progress.close()
            if not sharded.published:  # a torchrun rank other than 0: rank 0 publishes
                c = _counts(prep, rank, _world_size())
                report.n_embedded, report.n_reused, report.n_resumed = c["embedded"], c["reused"], c["resumed"]
                report.model_loaded = c["tried"] > 0
                report.n_images = sum(p.n_rows for p in prep.planned)
                report.seconds = time.perf_counter() - t0
                return report
    return _finish_report(report, prep, t0, opts, scale.finalize, dropped)


def _prepare(source: Any, index_path: Path, opts: Any, scale: ScaleOptions, launcher: str, shard_size: int,
             identity: dict[str, Any]) -> Any:
    from .._device import default_num_workers
    from ._sharded import prepare

    in_worker = launcher == "local" and scale.procs > 1  # local workers are daemonic: no DataLoader children
    if in_worker and opts.num_workers:
        raise ConfigError(
            f"--num-workers {opts.num_workers} with --procs {scale.procs}: each local worker process decodes its own "
            "images, so --num-workers must be 0 there (or use --procs 1, or torchrun / --launcher ray)."
        )
    workers = opts.num_workers if opts.num_workers is not None else 0 if in_worker else default_num_workers(opts.device)
    engine = opts.engine if opts.engine != "auto" else ("onnxruntime" if opts.device == "cpu" else "torch")
    weights_file = str(opts.weights_file) if opts.weights_file is not None else None
    return prepare(source, index_path, backbone=opts.backbone, weights=opts.weights, weights_file=weights_file,
                   engine=engine, device=opts.device, dtype=opts.dtype, batch_size=opts.batch_size,
                   num_workers=workers, shard_size=shard_size, overwrite=opts.overwrite, features=opts.features,
                   identity=identity, decode=getattr(opts, "decode", "pillow"))


def _finish_report(report: ExtractReport, prep: Any, t0: float, opts: Any, finalize_only: bool,
                   dropped: int) -> ExtractReport:
    with h5py.File(prep.index_path, "r") as f:
        n_rows = int(f["embeddings"].shape[0])
    report.skipped = _skipped(prep.index_path)
    report.n_images = n_rows + len(report.skipped)
    if not report.up_to_date and not finalize_only:
        c = _counts(prep)
        report.n_embedded, report.n_resumed = c["embedded"], c["resumed"]
        report.n_reused = n_rows - report.n_embedded - report.n_resumed
        report.n_removed = max(0, dropped - c["reused"])
        report.model_loaded = c["tried"] > 0
        if report.model_loaded:
            report.engine, report.device = prep.attrs["engine"], prep.attrs["device"]
            report.precision = prep.attrs["precision"]
    else:
        report.n_reused = n_rows
    report.seconds = time.perf_counter() - t0
    if report.skipped and not report.up_to_date:
        warnings.warn(
            f"{report.n_skipped} image(s) could not be read and were skipped; they are listed in "
            f"{report.path} under skipped/.", SkippedImagesWarning, stacklevel=4,
        )
    if opts.strict and report.skipped:
        raise SkippedImagesError(strict_message(report))
    return report
