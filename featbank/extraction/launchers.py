"""Launchers: who runs the work units of a run. One :class:`Launcher` interface, picked by name from
:data:`LAUNCHERS` (``local``, ``torchrun``, ``ray``; ``slice`` and ``finalize`` for a job array).

Every launcher hands out the same schedule (:mod:`~featbank.extraction._schedule`: shards cut into
equal work units, each shard's merge after its units), runs the same
:func:`~featbank.extraction.units.run_job` per job and the same
:func:`~featbank.extraction.units.finalize` once; they differ only in who runs which job:

- ``local``: ``procs`` processes forked from a preloaded fork server (one per GPU, each pinned to its device, when GPUs are
  used), each asking the parent for the next job when it is free. ``featbank extract`` starts the server
  first (:func:`prestart`) and forks the workers while it plans (:func:`prestarted_workers`); each
  builds its engine before its first job. The parent hands out work over
  one pipe per worker and watches each worker's sentinel, so a worker killed at any moment
  (SIGKILL included) cannot leave a shared queue's lock held and hang the others.
- ``torchrun``: every rank computes the same schedule and takes its share (longest first onto the
  least-loaded rank); after a barrier each rank merges the split shards whose id ≡ rank (mod world
  size). The process group carries only barriers and a failure count (gloo, also on GPUs: no
  tensor crosses processes), then rank 0 publishes the index.
- ``slice``: one job of a job array (``--rank R --world W``, e.g. one Slurm array task) runs its
  share of the work, computed as under torchrun, and publishes nothing; ranks run at any time and
  in any order. ``finalize`` then gathers the slices' units into parts (copies, no embedding) and
  publishes the index.
- ``ray``: one Ray Core task per unit or shard (``num_gpus``, ``max_retries``; a CPU task's worker keeps
  its engine from task to task, a GPU task gets a fresh process, Ray's default), a merge task once a
  shard's units are done, on an existing
  cluster (``ray.init(address="auto")``) or a local one.
  Not Ray Data writers: they reorder blocks and their checkpointing is beta; here a retried task
  resumes its own ``.partial``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..cache import PartInfo
from ..errors import CacheError, ConfigError, FeatbankError
from ._jobs import EngineSpec, ShardJob
from ._schedule import Schedule, plan_work, start_worker_server, static_share, worker_context
from .units import Prepared, UnitDone, done_before_of, engine_for, final_part, finalize, run_job, run_shard

if TYPE_CHECKING:
    from .config import ExtractConfig

__all__ = [
    "LAUNCHERS", "Launcher", "LocalLauncher", "TorchrunLauncher", "RayLauncher", "SliceLauncher", "FinalizeLauncher",
    "RowsCallback", "ShardedReport", "JOB_ARRAY_LAUNCHERS", "register_launcher", "get_launcher", "launcher_choices",
    "launcher_name",
    "resolve_launcher", "run_local", "run_slice", "run_torchrun", "run_ray", "run_prepared", "rank_shards", "prestart",
    "WorkerPool", "prestarted_workers",
]

#: ``on_rows(n)``: n more rows are done (progress).
RowsCallback = Callable[[int], None]


@dataclass
class ShardedReport:
    """What a sharded run did: parts written now vs kept, and where the index is."""

    path: Path
    n_shards: int
    n_written: int
    n_rows: int = 0
    n_skipped: int = 0
    published: bool = False
    seconds: float = 0.0
    parts: list[PartInfo] = field(default_factory=list)


class Launcher(Protocol):
    """Runs the jobs of a prepared plan (:func:`~featbank.extraction.units.prepare`) and, unless it is one
    rank among several, publishes the index."""

    def run(self, prepared: Prepared, config: ExtractConfig, on_rows: RowsCallback | None = None) -> ShardedReport:
        """Run ``prepared``'s jobs as ``config`` says (``procs``, ``num_gpus``, ``max_retries``, ``rank``, ``world``)."""
        ...


#: Launchers by name; :func:`register_launcher` adds one.
LAUNCHERS: dict[str, Launcher] = {}


def register_launcher(name: str) -> Callable[[type], type]:
    """Class decorator: register an instance of the class under ``name`` in :data:`LAUNCHERS`."""

    def add(cls: type) -> type:
        LAUNCHERS[name] = cls()
        return cls

    return add


def get_launcher(name: str) -> Launcher:
    """The launcher registered as ``name``.

    Raises:
        ConfigError: no launcher has that name.
    """
    if name not in LAUNCHERS:
        raise ConfigError(f"Unknown launcher {name!r}. Registered launchers: {sorted(LAUNCHERS)}.")
    return LAUNCHERS[name]


#: Launchers a job array's options pick (``--rank``, ``--finalize``), never ``--launcher``.
JOB_ARRAY_LAUNCHERS = ("slice", "finalize")


def launcher_choices() -> tuple[str, ...]:
    """What ``launcher`` may name: ``auto`` and every registered launcher but the job array's."""
    return ("auto", *(n for n in LAUNCHERS if n not in JOB_ARRAY_LAUNCHERS))


def resolve_launcher(launcher: str) -> str:
    """``auto`` -> ``torchrun`` when torchrun's environment is set (``WORLD_SIZE`` > 1), else ``local``."""
    if launcher not in launcher_choices():
        raise ConfigError(f"The 'launcher' parameter must be one of {launcher_choices()} (a job array: --rank R "
                          f"--world W, then --finalize). Got {launcher!r} instead.")
    if launcher == "auto":
        return "torchrun" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "local"
    return launcher


def launcher_name(config: ExtractConfig) -> str:
    """The launcher a config asks for: ``finalize``, ``slice`` (``rank`` given), else ``--launcher`` resolved."""
    if config.finalize:
        return "finalize"
    if config.rank is not None:
        return "slice"
    return resolve_launcher(config.launcher or "auto")


def prestart(procs: int, launcher: str | None = None, *, job_array: bool = False) -> bool:
    """Start the local workers' fork server now if a run with these options will fork workers.

    The fork server is a fresh process that imports torch (seconds); started before the caller
    builds its :class:`~featbank.extraction.config.ExtractConfig` (whose checks import torch in
    this process too), both imports run side by side instead of one after the other. ``featbank
    extract`` calls it first; a run starts the server anyway when it needs one (once per process).
    ``job_array``: ``--rank`` or ``--finalize`` was given (no local workers). Returns whether a run
    with these options uses the fork server.
    """
    if job_array or not isinstance(procs, int) or procs < 2 or (launcher or "auto") not in launcher_choices():
        return False
    if resolve_launcher(launcher or "auto") != "local":
        return False
    start_worker_server()
    return True


def _pinned(job: ShardJob, slot: int, n_gpu: int) -> ShardJob:
    if n_gpu and job.settings.device.startswith("cuda"):
        return replace(job, settings=replace(job.settings, spec=replace(job.settings.spec, device=f"cuda:{slot % n_gpu}")))
    return job


def _warm(spec: EngineSpec, slot: int, n_gpu: int) -> None:
    """Build the engine a worker's jobs will use (on its pinned device) before the first job comes."""
    if n_gpu and spec.device.startswith("cuda"):
        spec = replace(spec, device=f"cuda:{slot % n_gpu}")
    try:
        engine_for(spec)
    except Exception:  # noqa: BLE001 - only a head start: the first job builds it again and reports the error
        pass


def _local_worker(conn: Any, slot: int, n_gpu: int, threads: int) -> None:
    """Loop of one local worker: ask for a job, run it, report; ``None`` means stop, an
    :class:`EngineSpec` means build that engine now (no reply)."""
    try:
        import torch

        # N workers with torch's default (every core each) would oversubscribe the CPU N times over.
        torch.set_num_threads(threads)
        if n_gpu:
            torch.cuda.set_device(slot % n_gpu)
        _serve(conn, slot, n_gpu)
    except (EOFError, OSError):  # BrokenPipeError, ConnectionResetError
        return  # the parent is gone (e.g. it stopped on an error while this worker started): nobody to report to
    except KeyboardInterrupt:
        # Ctrl-C reaches the terminal's whole process group, starting workers too: the parent says it was
        # interrupted and what is kept (this worker's rows so far are in its .partial, which a rerun resumes);
        # no traceback per worker. Exit 130, as a process stopped by SIGINT, should the parent report it.
        sys.exit(130)


def _serve(conn: Any, slot: int, n_gpu: int) -> None:
    conn.send(("ready", None))
    while True:
        job = conn.recv()
        if job is None:
            return
        if isinstance(job, EngineSpec):
            _warm(job, slot, n_gpu)
            continue
        try:
            conn.send(("done", run_job(_pinned(job, slot, n_gpu))))
        except FeatbankError as e:
            conn.send(("error", f"shard {job.shard_id}: {e}"))
        except Exception as e:  # noqa: BLE001 - reported by the parent, with the worker's traceback
            conn.send(("error", f"shard {job.shard_id}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))


class _Dispatch:
    """The hand-out of a schedule: work first (largest first), a shard's merge once all its units ran.

    A unit that failed or whose worker died still releases its merge: the merge embeds what the unit
    left, so a unit's failure costs time, never rows. Failures of units are reported only when the
    merge of their shard fails too.
    """

    def __init__(self, schedule: Schedule):
        self.pending: deque[ShardJob] = deque(schedule.work)
        self.merges = dict(schedule.merges)
        self.left = dict(schedule.n_units)
        self.unit_errors: dict[int, list[str]] = {}
        self.unit_rows: dict[int, int] = {}  # per split shard: the rows its finished units reported

    def report(self, job: ShardJob, payload: Any, on_rows: Callable[[int], None] | None) -> None:
        """Progress for a finished ``job``. A unit: its rows, those an earlier run finished through
        ``on_rows.done_before`` where it has one (progress, not this run's speed). A whole shard: its
        rows. A merge: those of its rows its units did not report (a failed unit's, which it embedded)."""
        if on_rows is None:
            return
        if job.unit is not None:
            done = UnitDone(*payload)
            self.unit_rows[job.shard_id] = self.unit_rows.get(job.shard_id, 0) + done.rows
            if done.earlier:
                done_before_of(on_rows)(done.earlier)
            on_rows(done.rows - done.earlier)
        elif payload is not None:
            on_rows(max(0, payload.n_rows + payload.n_skipped - self.unit_rows.pop(job.shard_id, 0)))

    def next(self) -> ShardJob | None:
        return self.pending.popleft() if self.pending else None

    @property
    def waiting(self) -> bool:
        """Merges not yet released: an idle worker should wait for them, not stop."""
        return bool(self.merges)

    def finished(self, job: ShardJob, error: str | None = None) -> str | None:
        """Book a finished job; returns the failure to report (``None``: nothing to report)."""
        sid = job.shard_id
        if job.unit is None:
            if error is not None and sid in self.unit_errors:
                error += "\n  (its work units: " + "; ".join(self.unit_errors.pop(sid)) + ")"
            return error
        if error is not None:
            self.unit_errors.setdefault(sid, []).append(error)
        self.left[sid] -= 1
        if self.left[sid] == 0:
            self.pending.appendleft(self.merges.pop(sid))
        return None


def _start_workers(ctx: Any, n_procs: int, n_gpu: int) -> dict[int, list[Any]]:
    threads = max(1, (os.cpu_count() or 1) // n_procs)
    workers = {}
    for slot in range(n_procs):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_local_worker, args=(child, slot, n_gpu, threads), daemon=True)
        proc.start()
        child.close()
        workers[slot] = [parent, proc, None]
    return workers


class WorkerPool:
    """``procs`` local workers started in a background thread before the run's plan is known, each
    building its engine from ``spec`` (when given) while the parent lists files and plans.

    :func:`run_local` takes them (:meth:`take`) when its run needs as many workers on as many
    GPUs; otherwise, and whenever the run ends, :meth:`close` stops whatever was not taken.
    """

    def __init__(self, procs: int, n_gpu: int, spec: EngineSpec | None = None):
        self.procs, self.n_gpu = procs, n_gpu
        self._lock = threading.Lock()
        self._workers: dict[int, list[Any]] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._start, args=(spec,), name="featbank-workers", daemon=True)
        self._thread.start()

    def _start(self, spec: EngineSpec | None) -> None:
        workers: dict[int, list[Any]] = {}
        try:
            workers = _start_workers(worker_context(__name__), self.procs, self.n_gpu)
            if spec is not None:
                for conn, _, _ in workers.values():
                    conn.send(spec)
        except BaseException as e:  # noqa: BLE001 - raised again by take()
            self._error = e
            _terminate_workers(workers)
            return
        with self._lock:
            if not self._closed:
                self._workers = workers
                return
        _terminate_workers(workers)  # closed while they started: nobody will take them

    def take(self) -> dict[int, list[Any]] | None:
        """The started workers (waits for them), ``{slot: [conn, process, None]}``, or None when they were
        already taken or the pool is closed; raises what starting them raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        with self._lock:
            workers, self._workers = self._workers, None
        return workers

    def close(self) -> None:
        """Stop the workers nobody took, at once: they hold no work (waits for the k forks to finish, so
        none outlives the caller)."""
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, None
        if workers:
            _terminate_workers(workers)
        self._thread.join(timeout=60)


def _terminate_workers(workers: dict[int, list[Any]]) -> None:
    """Stop workers that hold no job (never given one): SIGTERM, then wait."""
    for conn, proc, _ in workers.values():
        conn.close()
        proc.terminate()
    for _, proc, _ in workers.values():
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()


_POOL: ContextVar[WorkerPool | None] = ContextVar("featbank_worker_pool", default=None)


def _gpu_count(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    import torch

    return torch.cuda.device_count()


@contextmanager
def prestarted_workers(procs: int, device: str, spec: EngineSpec | None = None) -> Iterator[WorkerPool | None]:
    """Start ``procs`` local workers now (``procs`` > 1), for :func:`run_local` calls inside the block to take.

    The workers are forked (from the fork server) and build their engine while the caller scans and
    plans; a run that needs them takes them, and the ones nobody took are stopped when the block ends.
    """
    if procs < 2:
        yield None
        return
    pool = WorkerPool(procs, _gpu_count(device), spec)
    token = _POOL.set(pool)
    try:
        yield pool
    finally:
        _POOL.reset(token)
        pool.close()


def run_local(jobs: Sequence[ShardJob], procs: int = 1, on_rows: Callable[[int], None] | None = None,
              total_rows: Sequence[int] | None = None) -> list[PartInfo]:
    """Run ``jobs`` in this process (``procs == 1``) or in ``procs`` worker processes.

    With workers, shards are cut into work units so every worker gets equal work (``_schedule``;
    ``total_rows``: the whole plan's rows, so a rerun cuts the same units).
    ``on_rows(n)``: progress, per batch in this process, per finished unit or part with workers.

    Raises:
        ConfigError: ``procs`` is not a positive integer.
        CacheError: a shard failed or a worker died; finished parts are kept, a rerun resumes.
    """
    if not isinstance(procs, int) or isinstance(procs, bool) or procs < 1:
        raise ConfigError(f"The 'procs' parameter must be a positive integer. Got {procs!r} instead.")
    if procs == 1 or len(jobs) == 0:
        return [run_shard(j, on_rows) for j in jobs]
    schedule = plan_work(jobs, procs, total_rows)
    if schedule.n_jobs <= 1:
        if (pool := _POOL.get()) is not None:
            pool.close()  # the prestarted workers (and their engines) are not needed for one job
        return [run_shard(j, on_rows) for j in jobs]
    return _run_workers(schedule, procs, on_rows)


def _run_workers(schedule: Schedule, procs: int, on_rows: Callable[[int], None] | None) -> list[PartInfo]:
    import torch

    every = [*schedule.work, *schedule.merges.values()]
    n_gpu = torch.cuda.device_count() if any(j.settings.device.startswith("cuda") for j in every) else 0
    dispatch = _Dispatch(schedule)
    pool = _POOL.get()
    workers = pool.take() if pool is not None and pool.procs == procs and pool.n_gpu == n_gpu else None
    if workers is None:  # else: started while the parent planned; more than the work needs stop at once
        workers = _start_workers(worker_context(__name__), min(procs, len(schedule.work)), n_gpu)
    crew = _Crew(workers, dispatch, on_rows)
    try:
        crew.run()
    except BaseException:  # on_rows raised (the API's on_progress: KeyboardInterrupt stops a run), or Ctrl-C
        crew.stop()
        raise
    left = len(dispatch.pending) + len(dispatch.merges)
    if crew.failures or left:
        raise CacheError(
            f"Sharded extraction failed ({left} job(s) not started):\n  " + "\n  ".join(crew.failures[:10])
            + "\nFinished parts are kept; run the same command again to resume."
        )
    return crew.done


class _Crew:
    """The worker processes of one run (``slot -> [conn, process, job in hand]``): hands out the
    dispatch's jobs as workers ask, books their results, and a death as the failure of its job."""

    def __init__(self, workers: dict[int, list[Any]], dispatch: _Dispatch, on_rows: Callable[[int], None] | None):
        self.workers, self.dispatch, self.on_rows = workers, dispatch, on_rows
        self.idle: list[int] = []  # workers waiting for a merge still blocked on units in flight
        self.done: list[PartInfo] = []
        self.failures: list[str] = []

    def run(self) -> None:
        from multiprocessing.connection import wait

        while self.workers:
            by_handle = {}
            for slot, (conn, proc, _) in self.workers.items():
                by_handle[conn] = slot
                by_handle[proc.sentinel] = slot
            for handle in wait(list(by_handle)):
                slot = by_handle[handle]
                if slot not in self.workers or slot in self.idle:
                    continue
                self._take(slot, handle)
                if slot in self.workers:
                    self._hand_out(slot)
                while self.idle and (self.dispatch.pending or not self.dispatch.waiting):
                    self._hand_out(self.idle.pop())
            if not self.workers and self.idle:
                break

    def stop(self, grace: float = 5.0) -> None:
        """Stop every worker when the run stops early: closing its pipe ends an idle one (EOF); one busy with a
        job gets ``grace`` seconds, then SIGTERM. Its rows so far are in its ``.partial``, which a rerun resumes;
        none outlives the call (an API caller that caught the error would otherwise keep them running)."""
        workers = [w for _, w in sorted(self.workers.items())]
        self.workers.clear()
        for conn, _, _ in workers:
            conn.close()
        deadline = time.monotonic() + grace
        for _, proc, _ in workers:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        _terminate_workers({slot: w for slot, w in enumerate(workers) if w[1].is_alive()})

    def _take(self, slot: int, handle: Any) -> None:
        """What woke ``slot``: a message (ready, done, error) or its death."""
        conn, proc, current = self.workers[slot]
        try:
            kind, payload = conn.recv() if handle is conn else (None, None)
        except (EOFError, OSError):
            kind, payload = None, None
        if kind is None:  # the worker died
            proc.join()
            during = f"during shard {current.shard_id}" if current is not None else "before taking a shard"
            self.failures.append(f"worker {slot} (pid {proc.pid}) died with exit code {proc.exitcode} {during}")
            del self.workers[slot]
            if current is not None:
                self.dispatch.finished(current, self.failures[-1])
        elif kind in ("done", "error") and current is not None:
            failure = self.dispatch.finished(current, payload if kind == "error" else None)
            if failure is not None:
                self.failures.append(failure)
            elif kind == "done":
                if current.unit is None:
                    self.done.append(payload)
                self.dispatch.report(current, payload, self.on_rows)

    def _hand_out(self, slot: int) -> None:
        conn, proc, _ = self.workers[slot]
        nxt = self.dispatch.next()
        if nxt is None and self.dispatch.waiting:
            self.workers[slot][2] = None
            self.idle.append(slot)
            return
        conn.send(nxt)
        if nxt is None:
            proc.join()
            del self.workers[slot]
        else:
            self.workers[slot][2] = nxt


def run_slice(prepared: Prepared, rank: int, world: int) -> list[PartInfo]:
    """Run this job's share of the work and publish nothing: one job of a Slurm array
    (``rank = $SLURM_ARRAY_TASK_ID``); ``run_prepared(..., finalize_only=True)`` gathers the work
    units into parts and publishes once every job is done. Shares are computed the same way by
    every job (:func:`~featbank.extraction._schedule.static_share`).

    Raises:
        ConfigError: ``rank`` is not in ``[0, world)``.
    """
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ConfigError(f"The rank must lie in [0, world size) and the world size be >= 1. Got rank {rank!r}, world {world!r}.")
    schedule = plan_work(prepared.jobs, world, _total_rows(prepared))
    out = []
    for job in static_share(schedule, _planned(prepared), world, rank):
        result = run_job(job)
        if job.unit is None:
            out.append(result)
    return out


def rank_shards(prepared: Prepared, rank: int, world: int) -> set[int]:
    """The shards whose parts ``rank`` of a torchrun run writes: its whole shards and its merges."""
    schedule = plan_work(prepared.jobs, world, _total_rows(prepared))
    whole = {j.shard_id for j in static_share(schedule, _planned(prepared), world, rank) if j.unit is None}
    return whole | {sid for sid in schedule.merges if sid % world == rank}


def _total_rows(prepared: Prepared) -> list[int]:
    return [p.n_rows for p in prepared.planned]  # every shard's rows: units are cut from the whole plan


def _planned(prepared: Prepared) -> list[tuple[int, int]]:
    return [(p.shard_id, p.n_rows) for p in prepared.planned]


def _finalize_only(prepared: Prepared, world: int | None = None) -> list[PartInfo]:
    """Gather the work units of separate jobs into parts (copies, no embedding), then publish.

    Raises:
        CacheError: a shard has no finished part and no units to gather (a slice did not run or did
            not finish): every such shard and, given ``world``, the ranks that owe it; nothing is published.
    """
    missing = []
    for job in prepared.jobs:
        if any(Path(job.folder).glob(f".part-{job.shard_id:06d}-*.h5.unit")):
            try:
                run_shard(job, embed=False)
                continue
            except CacheError:
                pass
        if job.replace_damaged or not final_part(job).exists():
            missing.append(job.shard_id)
    if missing:
        raise CacheError(_missing_message(prepared, missing, world))
    return finalize(prepared)


def _missing_message(prepared: Prepared, missing: list[int], world: int | None) -> str:
    lines = [f"--finalize: {len(missing)} shard(s) of {len(prepared.planned)} have no finished part, so slices of the "
             "job array have not run or not finished. Nothing was published."]
    lines += [f"  shard {sid}: no part" for sid in missing[:20]]
    if len(missing) > 20:
        lines.append(f"  ... and {len(missing) - 20} more")
    if world is not None and world <= 4096:
        ranks = _owing_ranks(prepared, set(missing), world)
        lines.append(f"Ranks that owe them (of --world {world}): {', '.join(map(str, ranks))}.")
    lines.append("Run the missing slices ('featbank extract DATA --out CACHE --rank R --world W'; a rerun of a "
                 "finished slice costs nothing), then '--finalize' again.")
    return "\n".join(lines)


def _owing_ranks(prepared: Prepared, missing: set[int], world: int) -> list[int]:
    schedule = plan_work(prepared.jobs, world, _total_rows(prepared))
    return [r for r in range(world)
            if any(j.shard_id in missing for j in static_share(schedule, _planned(prepared), world, r))]


def run_torchrun(prepared: Prepared, *, publish: bool = True) -> ShardedReport:
    """Run this rank's share of the work, wait for every rank, merge, publish on rank 0.

    Every rank computes the same schedule: units and whole shards are dealt by
    :func:`~featbank.extraction._schedule.static_share`; after a barrier each rank merges the split
    shards whose id ≡ rank (mod world size). Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as
    torchrun sets them.

    Raises:
        CacheError: a shard of any rank failed (reported by every rank; nothing is published).
    """
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    schedule = plan_work(prepared.jobs, world, _total_rows(prepared))
    mine = static_share(schedule, _planned(prepared), world, rank)
    merges = [j for sid, j in sorted(schedule.merges.items()) if sid % world == rank]
    n_gpu = torch.cuda.device_count() if any(j.settings.device.startswith("cuda") for j in mine) else 0
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        # A rank may run for hours before the barrier; the default 30 min would fail healthy runs.
        dist.init_process_group("gloo", timeout=timedelta(hours=48))
    errors = _run_rank_jobs(mine, local, n_gpu, rank, units_fail_quietly=True)
    if world > 1 and schedule.merges:
        dist.barrier()  # every unit has run before any merge gathers them
    errors += _run_rank_jobs(merges, local, n_gpu, rank)
    failed = torch.tensor([len(errors)], dtype=torch.int64)
    if world > 1:
        dist.all_reduce(failed)
    report = ShardedReport(prepared.index_path, len(prepared.planned), len(mine) + len(merges))
    try:
        if int(failed.item()):
            raise CacheError(
                f"{int(failed.item())} shard(s) failed across the ranks" + (":\n  " + "\n  ".join(errors) if errors else "")
                + "\nFinished parts are kept; run the same command again to resume."
            )
        if publish and rank == 0:
            report.parts = finalize(prepared)
            report.published = True
        if world > 1:
            dist.barrier()
    finally:
        if own_group:
            dist.destroy_process_group()
    return report


def _run_rank_jobs(jobs: Sequence[ShardJob], local: int, n_gpu: int, rank: int,
                   units_fail_quietly: bool = False) -> list[str]:
    """Run ``jobs`` in order; the failures to report (a unit's failure is left to its merge)."""
    errors = []
    for job in jobs:
        try:
            run_job(_pinned(job, local, n_gpu))
        except FeatbankError as e:
            if not (units_fail_quietly and job.unit is not None):
                errors.append(f"rank {rank}, shard {job.shard_id}: {e}")
    return errors


def _ray_init(num_cpus: int) -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray's own variable decides, as for any Ray program: an address joins that cluster, "local"
    # starts a private one; unset, join the cluster running on this node, else start a local one.
    address = os.environ.get("RAY_ADDRESS", "auto")
    if address != "local":
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            return
        except (ConnectionError, RuntimeError, ValueError):
            if address != "auto":
                raise
    # A local cluster, sized explicitly (an actor pool that takes every CPU hangs when the
    # driver's own work needs one).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def _ray_slots(num_gpus: float, procs: int) -> int:
    """How many tasks the cluster runs at once (GPUs / num_gpus, else CPUs), at least ``procs``."""
    import ray

    res = ray.cluster_resources()
    slots = res.get("GPU", 0) / num_gpus if num_gpus else res.get("CPU", 1)
    return max(procs, int(slots))


def run_ray(jobs: Sequence[ShardJob], *, num_cpus: int = 2, num_gpus: float = 0.0, max_retries: int = 3,
            on_rows: Callable[[int], None] | None = None, procs: int = 1,
            total_rows: Sequence[int] | None = None) -> list[PartInfo]:
    """One Ray Core task per work unit or shard; a shard's merge task once its units have run.

    A task that dies is retried and resumes its own ``.partial``. Units are sized for the tasks the
    cluster runs at once (see ``_schedule``).

    Raises:
        ConfigError: Ray is not installed (``pip install 'featbank[ray]'``).
        CacheError: a shard failed after its retries; finished parts are kept.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("--launcher ray needs Ray: pip install 'featbank[ray]'.") from None
    _ray_init(num_cpus)
    # Ray's default max_calls stays: CPU tasks reuse their worker (and its engine); a task that asks for GPUs
    # gets a fresh process (max_calls=1), which frees its GPU memory and never computes on a GPU that a
    # reused process had been given before (CUDA_VISIBLE_DEVICES is read once, when CUDA starts).
    task = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=False)(run_job)
    dispatch = _Dispatch(plan_work(jobs, _ray_slots(num_gpus, procs), total_rows))
    refs = {}
    while (job := dispatch.next()) is not None:
        refs[task.remote(job)] = job
    parts, failures = [], []
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            job = refs.pop(ready[0])
            try:
                result, error = ray.get(ready[0]), None
            except Exception as e:  # noqa: BLE001 - RayTaskError wraps the worker's exception
                cause = getattr(e, "cause", None) or e
                first = str(cause).splitlines()[0] if str(cause) else ""
                result, error = None, f"shard {job.shard_id}: {type(cause).__name__}: {first}"
            failure = dispatch.finished(job, error)
            if failure is not None:
                failures.append(failure)
            elif error is None:
                if job.unit is None:
                    parts.append(result)
                dispatch.report(job, result, on_rows)
            while (nxt := dispatch.next()) is not None:  # a merge released by this unit
                refs[task.remote(nxt)] = nxt
    except BaseException:  # on_rows raised (the API's on_progress: KeyboardInterrupt stops a run), or Ctrl-C
        _cancel(refs)
        raise
    if failures:
        raise CacheError(
            f"{len(failures)} shard(s) failed on Ray:\n  " + "\n  ".join(failures[:10])
            + "\nFinished parts are kept; run the same command again to resume."
        )
    return parts


def _cancel(refs: Iterable[Any], wait: float = 30.0) -> None:
    """Cancel the tasks of a run that stops early (Ray does not retry a cancelled task) and wait up to ``wait``
    seconds for them to end, so that none goes on writing behind a caller that caught the error; a task's rows
    so far stay in its ``.partial``."""
    import ray

    refs = list(refs)
    for ref in refs:
        with suppress(Exception):  # finished meanwhile, or the cluster is gone
            ray.cancel(ref, force=True)
    with suppress(Exception):
        ray.wait(refs, num_returns=len(refs), timeout=wait)


def _published(prepared: Prepared, n_written: int) -> ShardedReport:
    report = ShardedReport(prepared.index_path, len(prepared.planned), n_written)
    report.parts, report.published = finalize(prepared), True
    return report


@register_launcher("local")
class LocalLauncher:
    """``procs`` spawned processes on this machine (this process alone when ``procs`` is 1)."""

    def run(self, prepared: Prepared, config: ExtractConfig, on_rows: RowsCallback | None = None) -> ShardedReport:
        run_local(prepared.jobs, config.procs, on_rows, _total_rows(prepared))
        return _published(prepared, len(prepared.jobs))


@register_launcher("ray")
class RayLauncher:
    """One Ray Core task per work unit or shard."""

    def run(self, prepared: Prepared, config: ExtractConfig, on_rows: RowsCallback | None = None) -> ShardedReport:
        run_ray(prepared.jobs, num_cpus=max(config.procs, 2), num_gpus=config.num_gpus, max_retries=config.max_retries,
                on_rows=on_rows, procs=config.procs, total_rows=_total_rows(prepared))
        return _published(prepared, len(prepared.jobs))


@register_launcher("torchrun")
class TorchrunLauncher:
    """This torchrun rank's share; rank 0 publishes."""

    def run(self, prepared: Prepared, config: ExtractConfig, on_rows: RowsCallback | None = None) -> ShardedReport:
        return run_torchrun(prepared)


@register_launcher("slice")
class SliceLauncher:
    """Slice ``config.rank`` of ``config.world`` of a job array; publishes nothing."""

    def run(self, prepared: Prepared, config: ExtractConfig, on_rows: RowsCallback | None = None) -> ShardedReport:
        rank, world = config.rank, config.world
        if rank is None or world is None:
            raise ConfigError("The slice launcher needs a rank and a world size (--rank R --world W).")
        parts = run_slice(prepared, rank, world)
        return ShardedReport(prepared.index_path, len(prepared.planned), len(parts), parts=parts)


@register_launcher("finalize")
class FinalizeLauncher:
    """Embeds nothing: gathers the work a job array's slices left into parts, then publishes."""

    def run(self, prepared: Prepared, config: ExtractConfig, on_rows: RowsCallback | None = None) -> ShardedReport:
        report = ShardedReport(prepared.index_path, len(prepared.planned), 0)
        report.parts, report.published = _finalize_only(prepared, config.world), True
        return report


def run_prepared(prepared: Prepared, *, launcher: str = "local", procs: int = 1, num_gpus: float = 0.0,
                 max_retries: int = 3, finalize_only: bool = False,
                 on_rows: RowsCallback | None = None) -> ShardedReport:
    """Run a prepared plan with a launcher and publish the index (rank 0 only under torchrun).

    ``finalize_only`` runs no shard: it checks the parts that separate jobs wrote and publishes.
    ``on_rows(n)`` reports progress (local and Ray launchers).
    """
    from .config import ExtractConfig

    t0 = time.perf_counter()
    name = "finalize" if finalize_only else resolve_launcher(launcher)
    config = ExtractConfig(str(prepared.attrs["root"]), procs=procs, num_gpus=num_gpus, max_retries=max_retries)
    report = get_launcher(name).run(prepared, config, on_rows)
    report.n_rows = sum(p.n_rows for p in report.parts)
    report.n_skipped = sum(p.n_skipped for p in report.parts) + len(prepared.skipped)
    report.seconds = time.perf_counter() - t0
    return report
