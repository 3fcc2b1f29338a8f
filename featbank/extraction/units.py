"""Work units: plan the shards of a run, embed a shard or a unit of one into a part, merge, publish the index.

The steps every launcher (:mod:`~featbank.extraction.launchers`) runs, the same in each: :func:`prepare` (scan, key, plan, the
jobs still to do; deterministic, so every torchrun rank computes the same), :func:`run_shard`
(one shard -> one part, resumable, skipping a part already published), :func:`finalize` (check
every planned part and publish the index, then drop parts no index refers to).
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import h5py
import numpy as np

from .._device import quiet_worker_init
from .._files import remove_orphans, timestamp
from ..cache import (
    ROW_DATASETS,
    IndexContents,
    PartInfo,
    PartRows,
    PartWriter,
    PlannedPart,
    ShardRows,
    compute_cache_key,
    decode_attr,
    describe_feature_difference,
    describe_part,
    feature_settings,
    finalize_index,
    part_name,
    parts_dir,
    read_parts_table,
    rows_digest,
    write_part,
)
from ..errors import CacheError, CacheKeyMismatch
from ..sources import RowSource, TarImages
from ._cachefile import remove_dead_part_temporaries
from ._jobs import EngineSpec, ExtractJob, ShardJob, WorkerSettings
from ._plan import DEFAULT_SHARD_SIZE, Plan, assign_rows, plan_shards, plan_tars, replan

if TYPE_CHECKING:
    from ..features import FeatureSpec
    from ._engines import Engine

__all__ = ["RowSource", "engine_for", "Prepared", "prepare",
           "run_shard", "run_unit", "run_job", "UnitDone", "done_before_of", "finalize", "final_part", "migrate_v1",
           "reset_engines", "UNIT_ATTR", "unit_path"]

#: Attribute of a work unit's ``.partial``: the name of the part its rows are for.
UNIT_ATTR = "unit_of"


@dataclass
class Prepared:
    """The outcome of :func:`prepare`: the plan, every shard's planned part, the jobs still to run."""

    index_path: Path
    key: str
    plan: Plan
    planned: list[PlannedPart]
    planned_paths: dict[int, list[str]]
    jobs: list[ShardJob]
    classes: list[str]
    attrs: dict[str, Any]
    skipped: list[tuple[str, str, tuple[int, int]]]
    row_datasets: tuple[str, ...] = ROW_DATASETS


def identity_of(backbone: str, weights: str | None, weights_file: str | None) -> dict[str, Any]:
    from ..backbones import load_backbone, peek_identity

    ident = peek_identity(backbone, weights, weights_file)
    return ident if ident is not None else load_backbone(backbone, weights, weights_file).identity()


def _old_plan(index_path: Path, key: str, overwrite: bool, features: FeatureSpec | None = None,
              key_for: Callable[[dict[str, Any]], str] | None = None) -> Plan | None:
    if not index_path.exists() or overwrite:
        return None
    try:
        with h5py.File(index_path, "r") as f:
            version = int(f.attrs.get("schema_version", -1))
            have_key = str(f.attrs.get("cache_key", ""))
            plan = str(f.attrs.get("plan", ""))
            diff = describe_feature_difference(f.attrs, features.key_part() if features is not None else {})
            have_features = feature_settings(f.attrs)
    except OSError as e:
        raise CacheError(f"{str(index_path)!r} is not a readable HDF5 file ({e}); pass --overwrite to replace it.") from None
    if version != 2:
        raise CacheError(
            f"{str(index_path)!r} is a schema-v{version} cache; sharded extraction writes schema v2. "
            "Pass --overwrite to replace it, or choose another --out."
        )
    # Only the layers/views differ when the cache's key is this run's identity with the cache's own features.
    if have_key != key and diff and key_for is not None and have_features is not None and key_for(have_features) == have_key:
        raise CacheKeyMismatch(
            f"Cache {str(index_path)!r} was extracted with other layers or views: {diff}. The file was left "
            "untouched. Pass the same --layers/--views/--augment as before, --overwrite to replace it, or another --out."
        )
    if have_key != key:
        raise CacheKeyMismatch(
            f"Cache {str(index_path)!r} was made with other settings (cache key {have_key[:12]}…, this run's is "
            f"{key[:12]}…). The file was left untouched. Pass --overwrite to replace it, or choose another --out."
        )
    return Plan.from_json(plan) if plan else None


def prepare(source: RowSource, job: ExtractJob, identity: dict[str, Any] | None = None) -> Prepared:
    """Plan the run: the cache key, the shards (keeping an existing index's boundaries), the jobs left.

    A shard needs a job when its part for exactly its planned rows is not yet published. ``job``
    (an :class:`~featbank.extraction._jobs.ExtractJob`) gives the settings, resolved, and the index path;
    its config is recorded in the index's attributes. ``identity``: the backbone's identity when the
    caller already has it (else resolved here, which may build the model).

    Raises:
        CacheKeyMismatch: the existing index was made with other settings.
        CacheError: ``index_path`` is not a schema-v2 index (and ``overwrite`` is not set).
    """
    from ..backbones import identity_with_window

    c = job.config
    index_path, overwrite, features, decode, dtype = job.index_path, c.overwrite, job.features, job.decode, c.dtype
    spec = job.engine_spec
    precision = spec.precision
    if identity is None:
        identity = identity_with_window(identity_of(c.backbone, c.weights, c.weights_file), c.window)
    if decode != "pillow":
        from ._decode import check_decode_transform

        check_decode_transform(decode, identity["transform"])
    key = compute_cache_key(identity, dtype, precision, features.key_part() if features is not None else None, decode)
    old = _old_plan(index_path, key, overwrite, features,
                    lambda fk: compute_cache_key(identity, dtype, precision, fk, decode))
    table = read_parts_table(index_path) if old is not None else []
    if source.layout == "webdataset":
        plan = plan_tars([t for t, _ in source.tars], [n for _, n in source.tars], old if old and old.kind == "tar" else None)
    elif old is not None and old.kind == "range":
        plan = replan(old, source.keys)
    else:
        plan = plan_shards(source.keys, job.shard_size)
    settings = WorkerSettings(spec, dtype, c.batch_size, job.num_workers, int(identity["embed_dim"]),
                              identity["transform"], decode)
    folder = parts_dir(index_path)
    planned, planned_paths, jobs = _shard_jobs(source, plan, folder, key, settings, old, table)
    attrs = _index_attrs(identity, precision, job, source, plan, decode)
    extra = tuple(features.datasets()) if features is not None else ()
    return Prepared(index_path, key, plan, planned, planned_paths, jobs, list(source.classes), attrs, list(source.skipped),
                    ROW_DATASETS + extra)


def _shard_jobs(source: RowSource, plan: Plan, folder: Path, key: str, settings: WorkerSettings, old: Any,
                table: list[Any]) -> tuple[list[PlannedPart], dict[int, list[str]], list[ShardJob]]:
    """Each shard's planned part (id, rows, digest) and paths, and a job for each shard whose part
    for exactly those rows is missing or damaged (its stat differs from the index's record, or, never
    listed, it holds another run's key)."""
    old_parts = {p.shard_id: p.name for p in table}
    recorded = {p.name: (p.size, p.mtime_ns) for p in table}
    where = assign_rows(plan, source.keys) if plan.kind == "range" else _tar_rows(plan, source)
    planned, planned_paths, jobs = [], {}, []
    for i, shard in enumerate(plan.shards):
        rows_i = np.flatnonzero(where == i)
        rows = PartRows([source.keys[r] for r in rows_i], np.asarray(source.fingerprints).reshape(-1, 2)[rows_i],
                        np.asarray(source.labels)[rows_i], np.asarray(source.splits)[rows_i])
        digest = rows_digest(rows, source.classes)
        planned.append(PlannedPart(shard.shard_id, len(rows), digest))
        planned_paths[shard.shard_id] = rows.paths
        final = folder / part_name(shard.shard_id, digest)
        damaged = final.name in recorded and final.exists() and recorded[final.name] != _stat(final)
        # A finished part no index lists (a run that never published) counts only if it has this run's key.
        damaged = damaged or (final.name not in recorded and final.exists() and _part_key(final) != key)
        if damaged or not final.exists():
            members = [source.members[r] for r in rows_i] if source.members else []
            reuse = [old_parts[j] for j in _overlapping(old, plan, i) if j in old_parts] if old is not None else []
            reuse = [n for n in reuse if n != final.name]  # never copy rows out of a damaged part
            earlier = sorted(p.name for p in folder.glob(f".part-{shard.shard_id:06d}-*.h5.unit"))
            jobs.append(ShardJob(shard.shard_id, rows, members, str(source.root), str(folder), key,
                                 list(source.classes), source.layout, settings, reuse, damaged, earlier_units=earlier))
    return planned, planned_paths, jobs


def _index_attrs(identity: dict[str, Any], precision: str, job: ExtractJob, source: RowSource, plan: Plan,
                 decode: str) -> dict[str, Any]:
    """The index's attributes: the backbone's identity, the run's settings and its config."""
    from .config import CONFIG_ATTR

    features = job.features
    return {
        **{k: identity[k] for k in ("backbone", "weights", "weights_sha256", "transform")},
        "precision": precision, "engine": job.engine, "device": job.device, "root": str(source.root),
        "layout": source.layout, "classes_json": json.dumps(list(source.classes)), "updated": timestamp(),
        "complete": True, "shard_size": plan.shard_size, "decode": decode,
        **(features.to_attrs() if features is not None else {}), CONFIG_ATTR: job.config.to_json(),
    }


def final_part(job: ShardJob) -> Path:
    """Where the part of ``job``'s shard lies once published (its name: shard id and rows digest)."""
    return Path(job.folder) / part_name(job.shard_id, rows_digest(job.rows, job.classes))


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _overlapping(old: Plan, plan: Plan, i: int) -> list[int]:
    """Ids of the old shards whose key range overlaps new shard ``i`` (whose parts may hold its rows)."""
    if old.kind != plan.kind:
        return []
    if plan.kind == "tar":
        return [s.shard_id for s in old.shards if s.tar == plan.shards[i].tar]
    firsts = [s.first_key for s in old.shards]
    a, b = plan.shards[i].first_key, plan.end_key(i)
    lo = max(0, bisect.bisect_right(firsts, a) - 1)
    hi = bisect.bisect_left(firsts, b) if b is not None else len(firsts)
    return [old.shards[j].shard_id for j in range(lo, hi)]


def _tar_rows(plan: Plan, source: RowSource) -> np.ndarray:
    pos = {s.tar: i for i, s in enumerate(plan.shards)}
    return np.array([pos[m.partition("\0")[0]] for m in source.members], np.int64).reshape(-1)


_ENGINES: dict[EngineSpec, Engine] = {}


def engine_for(spec: EngineSpec) -> Engine:
    """One engine per process and spec, so a worker that runs many shards builds it once."""
    if spec not in _ENGINES:
        from ..backbones import load_backbone
        from ._engines import build_engine, build_tap_engine

        bb = load_backbone(spec.backbone, spec.weights, spec.weights_file)
        f = spec.features
        _ENGINES[spec] = (build_engine(spec.engine, bb, spec.device, spec.precision) if f is None
                          else build_tap_engine(spec.engine, bb, spec.device, spec.precision, f.layers, f.pooling))
    return _ENGINES[spec]


def done_before_of(on_rows: Callable[[int], None]) -> Callable[[int], None]:
    """Where rows an earlier run finished (resumed, copied, a finished unit's) are reported: the progress's
    ``done_before`` (its starting point, not this run's speed) where it has one, else ``on_rows`` itself."""
    return getattr(on_rows, "done_before", on_rows)


def _engine(settings: WorkerSettings, on_rows: Callable[[int], None] | None = None) -> Engine:
    """The process's engine for ``settings``; built under ``on_rows.while_loading`` (the progress bar's,
    in this process) the first time, so the bar says so and its rate leaves the load out."""
    loading = getattr(on_rows, "while_loading", None)
    if loading is None or settings.spec in _ENGINES:
        return engine_for(settings.spec)
    return loading(lambda: engine_for(settings.spec))


def reset_engines() -> None:
    """Forget this process's engines: each extract run builds (and so verifies) its engine afresh.

    Within one run a worker reuses its engine for every shard it embeds; across runs in one process
    (the Python API, tests) a reused onnxruntime session would skip the check of the cached graph.
    """
    _ENGINES.clear()


def _part_key(path: Path) -> str:
    """The cache key a part file carries; "" when it cannot be read (then it is recomputed)."""
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("cache_key", ""))
    except OSError:
        return ""


def run_shard(job: ShardJob, on_rows: Callable[[int], None] | None = None, *, embed: bool = True) -> PartInfo:
    """Embed one shard into its part and publish it; a part already published is returned as is.

    Resumes a ``.partial`` left by a killed worker for the same rows and key, and gathers the rows
    of the shard's work units (see ``_schedule``). Unreadable images are recorded in the part's
    ``skipped/`` with their reason. ``on_rows(n)`` is called as rows are done (embedded or skipped;
    resumed or copied from old parts through ``on_rows.done_before(n)`` where it has one).
    ``embed=False`` only gathers: rows no unit finished are then a CacheError (a job array's
    finalize step must not embed).
    """
    on_rows = on_rows or (lambda n: None)
    before = done_before_of(on_rows)
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    digest = rows_digest(job.rows, job.classes)
    final = folder / part_name(job.shard_id, digest)
    if job.replace_damaged:
        final.unlink(missing_ok=True)  # changed since the index recorded it (truncated, edited)
    if final.exists():
        before(len(job.rows))
        return describe_part(final)
    s = job.settings
    writer = PartWriter.open_if_valid(folder, job.shard_id, job.key, digest)
    if writer is None:
        writer = PartWriter.create(folder, ShardRows(job.shard_id, job.key, job.rows, job.classes), s.embed_dim, s.dtype,
                                   attrs={"root": job.root, "layout": job.layout},
                                   extra=s.features.datasets() if s.features is not None else None)
    else:  # recorded for the report: rows an interrupted run embedded (not copied from old parts)
        done = int(writer.done_mask().sum())
        writer.file.attrs["n_resumed"] = done - int(writer.file.attrs.get("n_reused", 0))
        before(done)
    try:
        # Recorded in the part: how many rows were copied from old parts instead of embedded.
        # Also the finished rows of an interrupted run's .partial of this shard for other rows (the
        # folder changed since): resuming inside the part does not need the same file list.
        # The rows of this shard's work units are this run's work, not reuse.
        stale = [p.name for p in _stale_files(folder, job.shard_id) if p.name != writer.path.name]
        copied = _reuse_rows(writer, folder, [*job.reuse, *stale], set(job.earlier_units))
        writer.file.attrs["n_reused"] = int(writer.file.attrs.get("n_reused", 0)) + copied.reused
        writer.file.attrs["n_resumed"] = int(writer.file.attrs.get("n_resumed", 0)) + copied.unit_resumed
        before(copied.reused)
        row_of = {p: i for i, p in enumerate(writer.paths)}
        skipped = {row_of[p]: why for p, why in copied.skipped.items() if p in row_of}
        if not embed:
            _check_gathered(writer, skipped)
        _embed_rows(writer, job, skipped, on_rows)
        return writer.finish(skipped)
    finally:
        writer.close()


def _stale_files(folder: Path, shard_id: int) -> list[Path]:
    """The shard's ``.partial`` files (interrupted runs, units in the making) and finished ``.unit`` files."""
    return [*folder.glob(f".part-{int(shard_id):06d}-*.h5.partial"), *folder.glob(f".part-{int(shard_id):06d}-*.h5.unit")]


def _check_gathered(writer: PartWriter, skipped: dict[int, str]) -> None:
    missing = int((~writer.done_mask()).sum()) - len(skipped)
    if missing > 0:
        raise CacheError(
            f"Shard {writer.shard_id} has {missing} row(s) that no finished work unit holds: a job of the array did "
            "not finish. Run the missing jobs (or the whole array) again, then finalize."
        )


@dataclass
class _Copied:
    """Rows copied into a part: from old parts and interrupted runs (reused), from this run's units.

    ``skipped``: the unreadable images of finished units, path -> reason (not decoded again).
    """

    reused: int = 0
    from_units: int = 0
    unit_resumed: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def _reuse_rows(writer: PartWriter, folder: Path, names: Sequence[str], earlier: set[str] = frozenset()) -> _Copied:
    """Copy the embeddings of unchanged rows (same key and fingerprint) from the shard's old parts.

    This is what makes one new file cost one new row of compute, not a shard's worth. The same copy
    gathers the rows of the shard's work units (``earlier``: units an earlier run finished).
    """
    todo = ~writer.done_mask()
    want = {p: i for i, p in enumerate(writer.paths) if todo[i]}
    copied = _Copied()
    mine = writer.path.name.lstrip(".").removesuffix(".partial")
    for name in names:
        try:
            f = h5py.File(folder / name, "r")
        except OSError:
            continue  # a missing or damaged old part (or a unit still being written): embedded again
        with f:
            if str(f.attrs.get("cache_key", "")) != writer.key:
                continue
            n = _copy_matching(writer, f, want)
            if str(f.attrs.get(UNIT_ATTR, "")) == mine:
                copied.from_units += n
                copied.unit_resumed += n if name in earlier else min(n, int(f.attrs.get("n_resumed", 0)))
                if bool(f.attrs.get("unit_done", False)):
                    copied.skipped.update(json.loads(str(f.attrs.get("unit_skipped", "{}"))))
            else:
                copied.reused += n
    return copied


def _copy_matching(writer: PartWriter, f: h5py.File, want: dict[str, int]) -> int:
    """Copy rows of ``f`` whose path is wanted and whose fingerprint matches; drop them from ``want``."""
    old_paths = decode_attr(f["paths"][...])
    old_fps = f["fingerprints"][...]
    # No tuple per row: container objects wake Python's cyclic GC, which then walks every
    # object alive (the caller's millions of keys) and made this step grow with the cache.
    new_rows = np.fromiter((want.get(p, -1) for p in old_paths), np.int64, count=len(old_paths))
    old_rows = np.arange(len(old_paths), dtype=np.int64)
    hit = new_rows >= 0
    hit[hit] = np.all(old_fps[hit] == writer.rows.fingerprints[new_rows[hit]], axis=1)
    if "status" in f:  # a .partial: only its rows flagged done
        hit &= f["status"][...].astype(bool)
    new_rows, old_rows = new_rows[hit], old_rows[hit]
    # Both sides are in key order: copy runs that are contiguous on both sides in one write each.
    breaks = np.flatnonzero((np.diff(new_rows) != 1) | (np.diff(old_rows) != 1)) + 1
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(new_rows)]):
        if b > a:
            lo, hi = int(old_rows[a]), int(old_rows[b - 1]) + 1
            writer.write_rows(new_rows[a:b], f["embeddings"][lo:hi], {n: f[n][lo:hi] for n in writer.extra})
    for i in new_rows:
        want.pop(writer.paths[int(i)], None)
    return len(new_rows)


class UnitDone(NamedTuple):
    """What a finished work unit reports for progress: its rows, and how many of them an earlier run
    had finished (resumed or copied: progress, but not this run's speed)."""

    rows: int
    earlier: int = 0


def run_unit(job: ShardJob, on_rows: Callable[[int], None] | None = None) -> UnitDone:
    """Embed a work unit (rows ``job.unit`` of a shard) into its own ``.partial``; publish nothing.

    The shard's merge (:func:`run_shard` on the whole shard) gathers the units' rows into the part.
    Resumes the unit's ``.partial`` left by a killed worker. Returns the unit's rows and how many of
    them an earlier run finished (both 0 when the shard's part is already published; all of them when
    the unit had finished).
    """
    on_rows = on_rows or (lambda n: None)
    before = done_before_of(on_rows)
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    whole_digest = rows_digest(job.rows, job.classes)
    whole = part_name(job.shard_id, whole_digest)
    if (folder / whole).exists():
        return UnitDone(0)
    unit = _unit_job(job)
    done = unit_path(folder, job.shard_id, rows_digest(unit.rows, unit.classes))
    if done.exists():
        return UnitDone(len(unit.rows), len(unit.rows))
    writer = _open_unit(unit, whole, before)
    try:
        # Finished rows of an interrupted run: the shard's whole .partial, units cut otherwise (.unit).
        earlier = [PartWriter.partial_path(folder, job.shard_id, whole_digest).name,
                   *(p.name for p in folder.glob(f".part-{int(job.shard_id):06d}-*.h5.unit"))]
        copied = _reuse_rows(writer, folder, earlier, set(earlier))
        n_earlier = copied.reused + copied.from_units
        if n_earlier:
            writer.file.attrs["n_resumed"] = int(writer.file.attrs.get("n_resumed", 0)) + n_earlier
            before(n_earlier)
        skipped: dict[int, str] = {}
        _embed_rows(writer, unit, skipped, on_rows)
        # The merge trusts a unit's skip reasons (and decodes nothing again) only once it is done.
        writer.file.attrs["unit_skipped"] = json.dumps({writer.paths[r]: why for r, why in skipped.items()})
        writer.file.attrs["unit_done"] = True
        writer.file.flush()
        earlier_rows = int(writer.file.attrs.get("n_resumed", 0))
    finally:
        writer.close()
    os.replace(writer.path, done)  # finished: nothing writes it again, and only now may others read it
    return UnitDone(len(unit.rows), earlier_rows)


def unit_path(folder: Path, shard_id: int, digest: str) -> Path:
    """Where a finished work unit lies: its ``.partial`` renamed ``.unit``."""
    return PartWriter.partial_path(folder, shard_id, digest).with_suffix(".unit")


def _unit_job(job: ShardJob) -> ShardJob:
    """The job of a unit's own rows (``job.unit`` of the shard's)."""
    from dataclasses import replace

    lo, hi = job.unit if job.unit is not None else (0, len(job.rows))
    r = job.rows
    sub = PartRows(r.paths[lo:hi], r.fingerprints[lo:hi], r.labels[lo:hi], r.splits[lo:hi])
    return replace(job, rows=sub, members=job.members[lo:hi] if job.members else [], unit=None, reuse=[])


def _open_unit(unit: ShardJob, whole: str, done_before: Callable[[int], None]) -> PartWriter:
    folder, s = Path(unit.folder), unit.settings
    digest = rows_digest(unit.rows, unit.classes)
    writer = PartWriter.open_if_valid(folder, unit.shard_id, unit.key, digest)
    if writer is None:
        return PartWriter.create(folder, ShardRows(unit.shard_id, unit.key, unit.rows, unit.classes), s.embed_dim,
                                 s.dtype, attrs={"root": unit.root, "layout": unit.layout, UNIT_ATTR: whole},
                                 extra=s.features.datasets() if s.features is not None else None)
    writer.file.attrs["n_resumed"] = int(writer.done_mask().sum())
    writer.file.attrs["unit_done"] = False
    done_before(int(writer.file.attrs["n_resumed"]))
    return writer


def run_job(job: ShardJob, on_rows: Callable[[int], None] | None = None) -> PartInfo | UnitDone:
    """What a worker runs for any job of a schedule: a work unit, or a whole shard (or a merge)."""
    return run_unit(job, on_rows) if job.unit is not None else run_shard(job, on_rows)


def _embed_rows(writer: PartWriter, job: ShardJob, skipped: dict[int, str],
                on_rows: Callable[[int], None] = lambda n: None) -> None:
    from torch.utils.data import DataLoader

    from ..images import PreprocessConfig
    from ._embedding import Collate, ImageRowsDataset, embed_block

    pending = np.flatnonzero(~writer.done_mask())
    if skipped:  # unreadable images a finished work unit already reported
        pending = pending[~np.isin(pending, list(skipped))]
    if len(pending) == 0:
        return
    s = job.settings
    cfg = PreprocessConfig.from_dict(s.transform)
    if job.layout == "webdataset":
        dataset: Any = TarImages(Path(job.root), writer.paths, job.members, pending, cfg)
    else:
        dataset = ImageRowsDataset(Path(job.root), writer.paths, pending, cfg)
    eng = _engine(s, on_rows)
    if s.decode == "gpu" and s.features is None and job.layout != "webdataset":
        from ._decode import embed_jpeg_rows

        return embed_jpeg_rows(writer, Path(job.root), pending, cfg, s, eng, skipped, on_rows)
    loader = DataLoader(dataset, batch_size=s.batch_size, shuffle=False, num_workers=s.num_workers,
                        collate_fn=Collate(cfg), prefetch_factor=4 if s.num_workers > 0 else None,
                        worker_init_fn=quiet_worker_init)
    if s.features is not None:
        from ._embedding import ViewCollate, ViewImageDataset, embed_feature_rows

        loader = DataLoader(ViewImageDataset(dataset, writer.paths, s.features, cfg.interpolation), batch_size=s.batch_size,
                            shuffle=False, num_workers=s.num_workers, collate_fn=ViewCollate(cfg, s.features.n_views),
                            prefetch_factor=4 if s.num_workers > 0 else None, worker_init_fn=quiet_worker_init)
        return embed_feature_rows(writer, loader, eng, s.features, s.batch_size, skipped, on_rows)
    for rows, batch, ok, reasons in loader:
        embed_block(writer, eng, rows, batch, ok, reasons, skipped)
        on_rows(len(rows))


def finalize(prepared: Prepared) -> list[PartInfo]:
    """Check every planned part, publish the index, then remove parts and partials no plan refers to.

    Raises:
        CacheError: a planned part is missing or does not match the plan (nothing is published).
    """
    index_path = prepared.index_path
    created = None
    if index_path.exists():
        try:
            with h5py.File(index_path, "r") as f:
                created = f.attrs.get("created")
        except OSError:
            created = None
    attrs = {**prepared.attrs, "created": created or prepared.attrs["updated"]}
    try:
        known = read_parts_table(index_path) if created is not None else []
    except (OSError, KeyError, CacheError):  # a v1 file being replaced with --overwrite has no table
        known = []
    contents = IndexContents(prepared.classes, attrs, row_datasets=prepared.row_datasets,
                             plan_json=prepared.plan.to_json(), listed=prepared.skipped)
    parts = finalize_index(index_path, prepared.planned, prepared.key, contents, known=known)
    _remove_unreferenced(index_path, parts)
    return parts


def _remove_unreferenced(index_path: Path, parts: Sequence[PartInfo]) -> None:
    folder = parts_dir(index_path)
    keep = {p.name for p in parts}
    remove_orphans(index_path)
    remove_dead_part_temporaries(folder)
    for p in folder.iterdir():
        if p.name.startswith("part-") and p.name.endswith(".h5") and p.name not in keep:
            p.unlink(missing_ok=True)
        elif p.name.endswith((".partial", ".unit")):  # every planned part is published: what is left is stale
            p.unlink(missing_ok=True)


def migrate_v1(path: Path, *, shard_size: int = DEFAULT_SHARD_SIZE) -> list[PartInfo]:
    """Turn a schema-v1 cache file into a v2 index over parts at the same path, embedding nothing.

    Rows are copied shard by shard (one shard in memory at a time); the index replaces the v1
    file atomically once every part is written, so a crash leaves the v1 file as it was.

    Raises:
        CacheError: ``path`` is not a readable schema-v1 featbank cache.
    """
    from ..cache import FeatureCache

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            version = f.attrs.get("schema_version")
    except OSError:
        version = None  # FeatureCache below says what is wrong with the file
    if isinstance(version, (int, np.integer)) and int(version) == 2:
        raise CacheError(f"{str(path)!r} has cache schema version 2 already; only a schema-v1 cache can be migrated.")
    # Refuses anything but a readable v1 cache, with its message; an interrupted run's (complete=False) is fine.
    with FeatureCache(path, allow_incomplete=True) as c:
        meta = {k: v for k, v in c.metadata.items() if k not in ("format", "schema_version", "n_samples", "embed_dim")}
        key, classes = c.cache_key, list(c.classes)
        sk_fps = {p: tuple(int(v) for v in fp) for (p, _), fp in zip(c.skipped, c.skipped_fingerprints)}
        sk_why = dict(c.skipped)
        keys = sorted(set(c.paths) | set(sk_why))
        plan = plan_shards(keys, shard_size)
        where = assign_rows(plan, c.paths)
        sk_where = assign_rows(plan, sorted(sk_why))
        planned = []
        for i, shard in enumerate(plan.shards):
            rows_i = np.flatnonzero(where == i)
            rows = PartRows([c.paths[r] for r in rows_i], c.fingerprints[rows_i], c.labels[rows_i], c.splits[rows_i])
            bad_keys = [k for k, w in zip(sorted(sk_why), sk_where) if w == i]
            bad = [(k, sk_why[k], sk_fps[k]) for k in bad_keys]
            everything = sorted([*zip(rows.paths, rows.fingerprints.tolist(), rows.labels.tolist(), rows.splits.tolist()),
                                 *((k, list(sk_fps[k]), -1, -1) for k in bad_keys)])
            listed = PartRows([e[0] for e in everything], np.array([e[1] for e in everything], np.int64).reshape(-1, 2),
                              np.array([e[2] for e in everything], np.int64), np.array([e[3] for e in everything], np.int8))
            digest = rows_digest(listed, classes)
            if len(rows_i):
                emb = c.embeddings[int(rows_i[0]):int(rows_i[-1]) + 1]
            else:
                emb = np.zeros((0, c.embed_dim), c.embeddings.dtype)
            write_part(parts_dir(path), ShardRows(shard.shard_id, key, rows, classes), emb, bad, digest=digest)
            planned.append(PlannedPart(shard.shard_id, len(everything), digest))
    meta.update(updated=timestamp(), shard_size=shard_size, migrated_from_schema=1)
    return finalize_index(path, planned, key, IndexContents(classes, meta, plan_json=plan.to_json()))
