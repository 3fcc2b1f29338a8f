"""One extract run: :func:`resolve_job` (a config resolved into an :class:`~featbank.extraction._jobs.ExtractJob`),
its steps, and :func:`run_extract`.

:func:`featbank.extract` validates nothing itself: it hands its :class:`ExtractConfig` here. A run
reads its rows (a folder, a manifest or WebDataset shards), checks the cache already at ``out``
(key, damage; a schema-v1 cache is migrated first; another key or a damaged one is refused, left
untouched), plans the work units (:mod:`~featbank.extraction.units`), hands them to the launcher its
config names (:mod:`~featbank.extraction.launchers`) and reports. One cache format: schema v2.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import h5py
import numpy as np

from ..cache import FORMAT, compute_cache_key, decode_attr, part_name, parts_dir, read_listed, rows_digest, writer_lock
from ..errors import CacheError, ConfigError, Interrupted, NotACacheError, SkippedImagesError, SkippedImagesWarning
from ._jobs import ExtractJob
from ._report import ExtractReport, strict_message
from .config import ExtractConfig

if TYPE_CHECKING:
    from ..sources import RowSource
    from .launchers import ShardedReport
    from .units import Prepared

__all__ = ["ExtractJob", "resolve_job", "run_extract", "read_source", "schema_version_of"]

T = TypeVar("T")


def resolve_job(config: ExtractConfig, on_progress: Callable[[int, int], None] | None = None) -> ExtractJob:
    """Resolve ``config`` against this machine and the files (no embedding yet).

    Raises:
        ConfigError: bad layers or views, a decode the input refuses, ``out`` a folder.
        CacheError: ``out`` is a file featbank did not write.
    """
    from .._device import resolve_device
    from ..sources import is_webdataset
    from ._cachefile import default_cache_path, refuse_foreign_file
    from ._decode import resolve_decode
    from ._spec import resolve_features
    from .launchers import launcher_name

    c = config
    device = resolve_device(c.device).type
    features = resolve_features(c.backbone, c.weights, c.weights_file, layers=c.layers, pooling=c.pooling,
                                views=c.views, augment=c.augment, view_seed=c.view_seed)
    feats = None if features.is_default else features
    decode = resolve_decode(c.decode, device, features=feats, webdataset=is_webdataset(c.data))
    out_path = (Path(c.out).expanduser() if c.out is not None
                else default_cache_path(c.data, c.backbone, c.weights, c.dtype, c.weights_file))
    if out_path.exists() and out_path.is_dir():
        raise ConfigError(f"--out {str(out_path)!r} is a directory; give a file path such as {out_path / 'cache.h5'}.")
    refuse_foreign_file(out_path)
    engine = c.engine if c.engine != "auto" else ("onnxruntime" if device == "cpu" else "torch")
    launcher = launcher_name(c)
    return ExtractJob(c, out_path, _write_target(out_path), device, engine, decode, feats, launcher,
               _num_workers(c, launcher, device), on_progress)


def _num_workers(c: ExtractConfig, launcher: str, device: str) -> int:
    """Decoding processes per worker: local worker processes are daemonic, so they may have no DataLoader children."""
    from .._device import default_num_workers

    in_worker = launcher == "local" and c.procs > 1
    if in_worker and c.num_workers:
        raise ConfigError(
            f"--num-workers {c.num_workers} with --procs {c.procs}: each local worker process decodes its own "
            "images, so --num-workers must be 0 there (or use --procs 1, or torchrun / --launcher ray)."
        )
    return c.num_workers if c.num_workers is not None else 0 if in_worker else default_num_workers(device)


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


def read_source(config: ExtractConfig) -> RowSource:
    """``config.data`` as a :class:`RowSource`: a manifest, WebDataset shards, or an image folder."""
    from ..sources import create_source, source_kind

    kind = source_kind(config.data)
    options: dict[str, dict[str, Any]] = {
        "manifest": {"path_column": config.path_column, "label_column": config.label_column,
                     "split_column": config.split_column},
        "webdataset": {"label_from": config.label_from},
    }
    return create_source(kind, config.data, **options.get(kind, {}))


def _write_target(out_path: Path) -> Path:
    """The file the index is written to: a symlink's target (the link stays), else ``out_path``."""
    return Path(os.path.realpath(out_path)) if out_path.is_symlink() else out_path


def _run_identity(job: ExtractJob) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(backbone identity, cache key, what the key covers) of this run's settings."""
    from .._device import precision_name
    from ..backbones import identity_with_window
    from .units import identity_of

    c = job.config
    identity = identity_with_window(identity_of(c.backbone, c.weights, c.weights_file), c.window)
    precision = precision_name(job.device.split(":")[0])
    features = job.features.key_part() if job.features is not None else None
    decode, dtype = job.decode, c.dtype
    wanted = {**identity, "dtype": dtype, "precision": precision, "features": features or {}, "decode": decode}
    return identity, compute_cache_key(identity, dtype, precision, features, decode), wanted


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
    from ..cache import FeatureCache, check_key, check_parts

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


def _migrate_or_refuse(index_path: Path, shard_size: int, distributed: bool) -> None:
    """A schema-v1 cache at ``index_path`` (its key already checked) becomes a v2 index; under torchrun or in a
    job array's slice, refuse."""
    from .units import migrate_v1

    if schema_version_of(index_path) != 1:
        return
    if distributed:
        raise CacheError(
            f"{str(index_path)!r} is a schema-v1 cache; torchrun ranks and job-array slices do not migrate it. Run "
            f"'featbank extract DATA --out {index_path} --shard-size {shard_size}' once (it migrates the file "
            "to schema v2 without embedding anything new that is unchanged), then start the ranks again."
        )
    migrate_v1(index_path, shard_size=shard_size)


def _drop_replaced_parts(index_path: Path, key: str) -> None:
    """--overwrite: the parts of the cache being replaced are recomputed, not trusted (a part of the same
    rows and key would otherwise be taken as done); parts of other keys go too. Parts an interrupted
    --overwrite run finished (listed by no index) and its ``.partial`` files are kept: a rerun resumes."""
    from ..cache import read_parts_table

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


def _up_to_date(prep: Prepared) -> bool:
    """No job left and the published index already lists exactly the planned parts and attributes."""
    if prep.jobs or not prep.index_path.is_file():
        return False
    try:
        with h5py.File(prep.index_path, "r") as f:
            names = decode_attr(f["parts/names"][...])
            same_attrs = all(str(f.attrs.get(k, "")) == str(prep.attrs[k]) for k in ("root", "layout", "classes_json"))
            listed = read_listed(f) if "listing_skipped" not in f.attrs else None  # the old home: rewrite the index
            complete = f.attrs.get("complete", True) is not False and bool(f.attrs.get("complete", True))
    except (OSError, KeyError, ValueError, TypeError):
        return False
    want = [part_name(p.shard_id, p.rows_digest) for p in prep.planned]
    return names == want and same_attrs and complete and listed == [(k, r, tuple(fp)) for k, r, fp in prep.skipped]


def _run_bytes(prep: Prepared, dtype: str) -> tuple[list[int], int]:
    """Estimated sizes of the parts this run writes (layers and views included) and of the index."""
    from ..cache import estimate_bytes, feature_values_per_row

    settings = prep.jobs[0].settings
    extra = settings.features.datasets() if settings.features is not None else {}
    values = feature_values_per_row(extra)
    sizes = [estimate_bytes(len(j.rows), int(settings.embed_dim), dtype, j.rows.paths, extra_values=values)
             for j in prep.jobs]
    # the index maps every per-row dataset onto every part (a few hundred bytes per mapping)
    return sizes, (64 << 10) + (1024 + 256 * len(extra)) * len(prep.planned)


def _check_space(prep: Prepared, index_path: Path, dtype: str) -> None:
    """Refuse before writing when the parts this run writes (and the index) do not fit: disk or ulimit -f."""
    from ..cache import check_space

    if not prep.jobs:
        return
    sizes, index_bytes = _run_bytes(prep, dtype)
    kept = (f"The cache '{index_path}' was left as it was." if index_path.exists() else "No cache was written.")
    if any(parts_dir(index_path).glob(".*.partial")):
        kept += f" Parts finished or begun so far are kept in '{parts_dir(index_path)}'; a rerun resumes from there."
    check_space(index_path, sum(sizes) + index_bytes, kept, largest_file=max(sizes + [index_bytes]))


class _Progress:
    """The progress bar (stderr) and ``on_progress(done, total)`` over the rows of this run's shards."""

    def __init__(self, prep: Prepared, job: ExtractJob):
        self.total = sum(len(j.rows) for j in prep.jobs)
        self.done = 0
        self.on_progress = job.on_progress
        self.bar = None
        if job.config.progress and self.total:
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

    def while_loading(self, load: Callable[[], T]) -> T:
        """``load()`` (the model, when a shard first has rows to embed: a backbone's first run exports its
        ONNX graph, ~20 s) with the bar saying so; the bar's clock then skips the load, so that its rate
        is the embedding's alone. Called in this process only (``--procs 1``)."""
        if self.bar is None:
            return load()
        self.bar.set_description_str("extract (loading the model)", refresh=True)
        out = load()
        self.bar.set_description_str("extract", refresh=False)
        self.bar.unpause()  # tqdm: the clock restarts from the last print, here before the load
        return out

    def done_before(self, n: int) -> None:
        """``n`` rows an earlier run finished (resumed, or copied from old parts): counted, but as the bar's
        starting point, so its rate and ETA are this run's embedding alone."""
        if not n:
            return
        self.done += n
        if self.bar is not None:
            self.bar.initial += n
            self.bar.n += n
            self.bar.last_print_n = self.bar.n
            self.bar.refresh()
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _counts(prep: Prepared, rank: int = 0, world: int = 1) -> dict[str, int]:
    """Rows of the parts the jobs of ``rank`` (all jobs when ``world`` is 1) wrote: embedded (tried),
    reused from old parts, resumed from an interrupted run."""
    from .launchers import rank_shards

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


def _old_rows_dropped(index_path: Path, prep: Prepared) -> int:
    """Rows of the published index that live in parts this run replaces (before subtracting the reused)."""
    from ..cache import read_parts_table

    if schema_version_of(index_path) != 2:
        return 0
    try:
        table = read_parts_table(index_path)
    except (OSError, KeyError, ValueError, TypeError, CacheError):
        return 0
    keep = {part_name(p.shard_id, p.rows_digest) for p in prep.planned}
    return sum(p.n_rows for p in table if p.name not in keep)


def run_extract(config: ExtractConfig, on_progress: Callable[[int, int], None] | None = None) -> ExtractReport:
    """Run one extraction (see :func:`featbank.extract`, which documents what it raises)."""
    t0 = time.perf_counter()
    from .units import reset_engines

    job = resolve_job(config, on_progress)
    reset_engines()
    lock = writer_lock(job.index_path) if job.holds_lock else nullcontext()  # the lock names a folder it cannot create
    with lock, _early_workers(job):
        job.index_path.parent.mkdir(parents=True, exist_ok=True)
        prep, report, dropped = _plan_run(job)
        if not config.finalize and not config.overwrite and _up_to_date(prep):
            report.up_to_date = True
        else:
            sharded = _launch(job, prep)
            if not sharded.published:  # a torchrun rank other than 0, a job array's slice: others publish
                return _rank_report(report, prep, job, t0)
    return _finish_report(report, prep, t0, job, dropped)


def _early_workers(job: ExtractJob) -> AbstractContextManager[object]:
    """Local workers (``--procs`` > 1) started now, building their engine while this process plans."""
    if job.launcher != "local" or job.config.procs < 2:
        return nullcontext()
    from .launchers import prestarted_workers

    return prestarted_workers(job.config.procs, job.device, job.engine_spec)


def _plan_run(job: ExtractJob) -> tuple[Prepared, ExtractReport, int]:
    """Clean up, check the cache at ``out``, plan the run: (prepared plan, report to fill, rows dropped)."""
    from ._cachefile import remove_dead_part_temporaries, remove_stale_temporaries
    from .units import prepare

    c, index_path = job.config, job.index_path
    if job.holds_lock:
        remove_stale_temporaries(index_path)
        if not job.distributed:  # torchrun ranks may run on other hosts, whose pids this one cannot see
            remove_dead_part_temporaries(parts_dir(index_path))
    source = read_source(c)
    identity, key, wanted = _run_identity(job)
    if not c.overwrite:
        _check_existing(index_path, key, wanted)
        _migrate_or_refuse(index_path, job.shard_size, job.distributed)
    elif job.rank == 0:
        _drop_replaced_parts(index_path, key)
    prep = prepare(source, job, identity)
    report = ExtractReport(path=job.out_path, cache_key=prep.key, n_duplicates=len(source.duplicates))
    dropped = _old_rows_dropped(index_path, prep) if not c.overwrite else 0
    return prep, report, dropped


def _launch(job: ExtractJob, prep: Prepared) -> ShardedReport:
    """Hand the planned work to the job's launcher; Ctrl-C keeps what is done."""
    from .launchers import get_launcher

    c = job.config
    lead = job.rank == 0 and not c.finalize and job.launcher != "slice"
    if lead:
        _check_space(prep, job.index_path, c.dtype)
    progress = _Progress(prep, job) if lead else None
    try:
        return get_launcher(job.launcher).run(prep, c, progress)
    except KeyboardInterrupt:
        raise Interrupted(
            f"Interrupted: finished parts and the rows embedded so far are kept in {parts_dir(job.index_path)}. "
            "Run the same command again to resume."
        ) from None
    finally:
        if progress is not None:
            progress.close()


def _rank_report(report: ExtractReport, prep: Prepared, job: ExtractJob, t0: float) -> ExtractReport:
    """The report of a rank that publishes nothing: the rows of the parts it wrote."""
    c = _counts(prep, job.rank, job.world)
    report.n_embedded, report.n_reused, report.n_resumed = c["embedded"], c["reused"], c["resumed"]
    report.model_loaded = c["tried"] > 0
    report.n_images = sum(p.n_rows for p in prep.planned)
    report.published = False
    if job.launcher == "slice":
        report.slice_of = (job.rank, job.world)
    report.seconds = time.perf_counter() - t0
    return report


def _finish_report(report: ExtractReport, prep: Prepared, t0: float, job: ExtractJob, dropped: int) -> ExtractReport:
    finalize_only = job.config.finalize
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
    if job.config.strict and report.skipped:
        raise SkippedImagesError(strict_message(report))
    return report
