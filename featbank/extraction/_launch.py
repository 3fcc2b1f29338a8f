"""Launchers for sharded extraction, on existing engines: local processes, torchrun, Ray Core tasks.

Every launcher runs the same :func:`~featbank.extraction._sharded.run_shard` per shard and the
same :func:`~featbank.extraction._sharded.finalize` once; they differ only in who runs which shard:

- ``local``: ``procs`` spawned processes (one per GPU, each pinned to its device, when GPUs are
  used), each asking the parent for the next shard id when it is free. The parent hands out work
  over one pipe per worker and watches each worker's sentinel, so a worker killed at any moment
  (SIGKILL included) cannot leave a shared queue's lock held and hang the others.
- ``torchrun``: each rank takes the shards whose id ≡ rank (mod world size); the process group
  carries only a barrier and a failure count (gloo, also on GPUs: no tensor crosses processes),
  then rank 0 publishes the index. Ranks run as separate jobs (a Slurm array) publish nothing;
  ``finalize_only`` does it once they are all done.
- ``ray``: one Ray Core task per shard (``num_gpus``, ``max_retries``) on an existing cluster
  (``ray.init(address="auto")``) or a local one. Not Ray Data writers: they reorder blocks and
  their checkpointing is beta; here a retried task resumes its own part.
"""

from __future__ import annotations

import os
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..cache._parts import PartInfo
from ..errors import CacheError, ConfigError, FeatbankError
from ._sharded import Prepared, ShardJob, finalize, run_shard

__all__ = [
    "LAUNCHERS", "ShardedReport", "resolve_launcher", "run_local", "run_slice", "run_torchrun", "run_ray", "run_prepared",
]

LAUNCHERS = ("auto", "local", "torchrun", "ray")


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


def resolve_launcher(launcher: str) -> str:
    """``auto`` -> ``torchrun`` when torchrun's environment is set (``WORLD_SIZE`` > 1), else ``local``."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"The 'launcher' parameter must be one of {LAUNCHERS}. Got {launcher!r} instead.")
    if launcher == "auto":
        return "torchrun" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "local"
    return launcher


def _pinned(job: ShardJob, slot: int, n_gpu: int) -> ShardJob:
    if n_gpu and job.settings.device.startswith("cuda"):
        return replace(job, settings=replace(job.settings, device=f"cuda:{slot % n_gpu}"))
    return job


def _local_worker(conn: Any, slot: int, n_gpu: int, threads: int) -> None:
    """Loop of one local worker: ask for a job, run it, report; ``None`` means stop."""
    import torch

    # N workers with torch's default (every core each) would oversubscribe the CPU N times over.
    torch.set_num_threads(threads)
    if n_gpu:
        torch.cuda.set_device(slot % n_gpu)
    conn.send(("ready", None))
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(("done", run_shard(_pinned(job, slot, n_gpu))))
        except FeatbankError as e:
            conn.send(("error", f"shard {job.shard_id}: {e}"))
        except Exception as e:  # noqa: BLE001 - reported by the parent, with the worker's traceback
            conn.send(("error", f"shard {job.shard_id}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_local(jobs: Sequence[ShardJob], procs: int = 1, on_rows: Callable[[int], None] | None = None) -> list[PartInfo]:
    """Run ``jobs`` in this process (``procs == 1``) or in ``procs`` spawned worker processes.

    ``on_rows(n)``: progress, per batch in this process, per finished part with workers.

    Raises:
        ConfigError: ``procs`` is not a positive integer.
        CacheError: a shard failed or a worker died; finished parts are kept, a rerun resumes.
    """
    if not isinstance(procs, int) or isinstance(procs, bool) or procs < 1:
        raise ConfigError(f"The 'procs' parameter must be a positive integer. Got {procs!r} instead.")
    if procs == 1 or len(jobs) <= 1:
        return [run_shard(j, on_rows) for j in jobs]
    from multiprocessing.connection import wait

    import torch
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    n_gpu = torch.cuda.device_count() if any(j.settings.device.startswith("cuda") for j in jobs) else 0
    pending = deque(jobs)
    workers: dict[int, tuple[Any, Any, ShardJob | None]] = {}
    n_procs = min(procs, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // n_procs)
    for slot in range(n_procs):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_local_worker, args=(child, slot, n_gpu, threads), daemon=True)
        proc.start()
        child.close()
        workers[slot] = (parent, proc, None)
    done, failures = [], []
    while workers:
        by_handle = {}
        for slot, (conn, proc, _) in workers.items():
            by_handle[conn] = slot
            by_handle[proc.sentinel] = slot
        for handle in wait(list(by_handle)):
            slot = by_handle[handle]
            if slot not in workers:
                continue
            conn, proc, current = workers[slot]
            try:
                kind, payload = conn.recv() if handle is conn else (None, None)
            except (EOFError, OSError):
                kind, payload = None, None
            if kind is None:  # the worker died
                proc.join()
                during = f"during shard {current.shard_id}" if current is not None else "before taking a shard"
                failures.append(f"worker {slot} (pid {proc.pid}) died with exit code {proc.exitcode} {during}")
                del workers[slot]
                continue
            if kind == "done":
                done.append(payload)
                if on_rows is not None:
                    on_rows(payload.n_rows + payload.n_skipped)
            elif kind == "error":
                failures.append(payload)
            nxt = pending.popleft() if pending else None
            conn.send(nxt)
            if nxt is None:
                proc.join()
                del workers[slot]
            else:
                workers[slot] = (conn, proc, nxt)
    if failures or pending:
        raise CacheError(
            f"Sharded extraction failed ({len(pending)} shard(s) not started):\n  " + "\n  ".join(failures[:10])
            + "\nFinished parts are kept; run the same command again to resume."
        )
    return done


def run_slice(prepared: Prepared, rank: int, world: int) -> list[PartInfo]:
    """Run the shards whose id ≡ ``rank`` (mod ``world``) and publish nothing: one job of a Slurm
    array (``rank = $SLURM_ARRAY_TASK_ID``); ``run_prepared(..., finalize_only=True)`` publishes
    once every job is done.

    Raises:
        ConfigError: ``rank`` is not in ``[0, world)``.
    """
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ConfigError(f"The rank must lie in [0, world size) and the world size be >= 1. Got rank {rank!r}, world {world!r}.")
    return run_local([j for j in prepared.jobs if j.shard_id % world == rank], 1)


def run_torchrun(prepared: Prepared, *, publish: bool = True) -> ShardedReport:
    """Run this rank's shards (id ≡ rank mod world size), wait for every rank, publish on rank 0.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun sets them.

    Raises:
        CacheError: a shard of any rank failed (reported by every rank; nothing is published).
    """
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    mine = [j for j in prepared.jobs if j.shard_id % world == rank]
    n_gpu = torch.cuda.device_count() if any(j.settings.device.startswith("cuda") for j in mine) else 0
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        # A rank may run for hours before the barrier; the default 30 min would fail healthy runs.
        dist.init_process_group("gloo", timeout=timedelta(hours=48))
    errors = []
    for job in mine:
        try:
            run_shard(_pinned(job, local, n_gpu))
        except FeatbankError as e:
            errors.append(f"rank {rank}, shard {job.shard_id}: {e}")
    failed = torch.tensor([len(errors)], dtype=torch.int64)
    if world > 1:
        dist.all_reduce(failed)
    report = ShardedReport(prepared.index_path, len(prepared.planned), len(mine))
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


def run_ray(jobs: Sequence[ShardJob], *, num_cpus: int = 2, num_gpus: float = 0.0, max_retries: int = 3,
            on_rows: Callable[[int], None] | None = None) -> list[PartInfo]:
    """One Ray Core task per shard; a task that dies is retried and resumes its own ``.partial``.

    Raises:
        ConfigError: Ray is not installed (``pip install 'featbank[ray]'``).
        CacheError: a shard failed after its retries; finished parts are kept.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("--launcher ray needs Ray: pip install 'featbank[ray]'.") from None
    _ray_init(num_cpus)
    task = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=False)(run_shard)
    refs = [task.remote(j) for j in jobs]
    parts, failures = [], []
    for job, ref in zip(jobs, refs):
        try:
            parts.append(ray.get(ref))
            if on_rows is not None:
                on_rows(parts[-1].n_rows + parts[-1].n_skipped)
        except Exception as e:  # noqa: BLE001 - RayTaskError wraps the worker's exception
            cause = getattr(e, "cause", None) or e
            failures.append(f"shard {job.shard_id}: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
    if failures:
        raise CacheError(
            f"{len(failures)} shard(s) failed on Ray:\n  " + "\n  ".join(failures[:10])
            + "\nFinished parts are kept; run the same command again to resume."
        )
    return parts


def run_prepared(prepared: Prepared, *, launcher: str = "local", procs: int = 1, num_gpus: float = 0.0,
                 max_retries: int = 3, finalize_only: bool = False,
                 on_rows: Callable[[int], None] | None = None) -> ShardedReport:
    """Run a prepared plan with a launcher and publish the index (rank 0 only under torchrun).

    ``finalize_only`` runs no shard: it checks the parts that separate jobs wrote and publishes.
    ``on_rows(n)`` reports progress (local and Ray launchers).
    """
    t0 = time.perf_counter()
    launcher = resolve_launcher(launcher)
    if finalize_only:
        report = ShardedReport(prepared.index_path, len(prepared.planned), 0)
        report.parts, report.published = finalize(prepared), True
    elif launcher == "torchrun":
        report = run_torchrun(prepared)
    else:
        if launcher == "ray":
            run_ray(prepared.jobs, num_cpus=max(procs, 2), num_gpus=num_gpus, max_retries=max_retries, on_rows=on_rows)
        else:
            run_local(prepared.jobs, procs, on_rows)
        report = ShardedReport(prepared.index_path, len(prepared.planned), len(prepared.jobs))
        report.parts, report.published = finalize(prepared), True
    report.n_rows = sum(p.n_rows for p in report.parts)
    report.n_skipped = sum(p.n_skipped for p in report.parts) + len(prepared.skipped)
    report.seconds = time.perf_counter() - t0
    return report
