"""Work units: how every launcher hands out the work of a sharded extraction.

A shard is the unit of the file format (one part per shard: one new file changes one part); it is
the wrong unit of work when shards are few or uneven. 12,000 images make shards of 10,000 and 2,000
rows, so two workers would split the work 10,000 / 2,000; 50,000 images on 8 GPUs make 5 shards and
3 GPUs sit idle. So a fresh shard larger than 1.5 x the unit target is cut into **units**: contiguous
ranges of its rows, each embedded into its own ``.partial`` (a part file in the making, holding only
the unit's rows). Once every unit of a shard has run, the shard's **merge** runs
:func:`~featbank.extraction.units.run_shard` for the whole shard as before: it copies the units'
finished rows (the copy that reuses rows of old parts) and embeds whatever is still missing, so a
unit that failed or never ran costs time, never correctness. Parts, the index, resume and
exactly-once are those of shards: a unit killed half-way resumes its own ``.partial``; a finished
unit is never embedded again.

The unit size is chosen per run from the sizes of **every** shard of the plan (finished ones too,
so a rerun, another rank or another job of an array cuts the same units): each candidate size, a
multiple of the batch size (a partial batch costs an accelerator as much as a full one) from one to
``MAX_UNITS_PER_WORKER`` units per worker, cuts every shard into units of that size plus its
remainder; the candidate whose largest-first hand-out onto the workers finishes first (counted in
batches, each unit charged ``UNIT_COST_BATCHES`` for opening its file) wins. Equal units alone
leave a tail whenever their count is not a multiple of the workers (33 units on 8 workers: one
worker runs a fifth unit while seven wait); the remainders, small and handed out last, fill those
gaps. One worker, or shards already many and small, leave the plan as it is. Shards that reuse rows
of old parts (an incremental update) stay whole: their work is mostly copying.

Static assignments (torchrun ranks, job arrays) use :func:`static_share`: the units of the whole
plan dealt largest first onto the least-loaded rank, so every rank, and a rerun after some shards
finished, agrees on who owns what. A finished unit is renamed ``.unit``: nothing writes it again,
and a unit cut differently by a rerun with other workers copies its rows from it.

Local worker processes are started by :func:`worker_context`: a fork server that imports torch and
featbank's extraction once, then forks every worker from it (no CUDA is initialised in it), instead
of k processes each importing torch (seconds of CPU each: on 2 cores, 8 spawned workers spent ~10 s
starting).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.context import BaseContext

from ._jobs import ShardJob

__all__ = ["MIN_UNIT_ROWS", "MAX_UNITS_PER_WORKER", "UNIT_COST_BATCHES", "Schedule", "plan_work", "static_share",
           "job_rows", "unit_target", "unit_bounds", "worker_context", "start_worker_server"]

#: Units per worker tried at most when choosing the unit size.
MAX_UNITS_PER_WORKER = 8
#: No unit is smaller (a remainder this small joins the unit before it).
MIN_UNIT_ROWS = 256
#: What opening a unit's file and gathering its rows costs, in batches, when choosing the unit size.
UNIT_COST_BATCHES = 0.25
#: Modules the worker fork server imports once, so that forked workers start warm.
PRELOAD = ("torch", "h5py", "PIL.Image", "featbank.backbones", "featbank.extraction.units",
           "featbank.extraction._embedding", "featbank.extraction._engines")


@dataclass
class Schedule:
    """The work of a run in the order to hand it out.

    Attributes:
        work: unit jobs and whole shards, largest first (a unit job has ``unit`` set).
        keys: ``(shard_id, unit index)`` of each item of ``work`` (0 for a whole shard).
        merges: ``{shard_id: job}`` of each split shard, to run once all its units have run.
        n_units: ``{shard_id: number of units}`` of each split shard.
        target: the unit size in rows.
        batch: the batch size the units are cut for (units are whole batches but for remainders).
    """

    work: list[ShardJob]
    keys: list[tuple[int, int]] = field(default_factory=list)
    merges: dict[int, ShardJob] = field(default_factory=dict)
    n_units: dict[int, int] = field(default_factory=dict)
    target: int = 0
    batch: int = 1

    @property
    def n_jobs(self) -> int:
        return len(self.work) + len(self.merges)


def job_rows(job: ShardJob) -> int:
    """The rows a job embeds at most: its unit's range, else its shard's rows."""
    return job.unit[1] - job.unit[0] if job.unit is not None else len(job.rows)


def _batch_of(jobs: Sequence[ShardJob]) -> int:
    settings = jobs[0].settings if jobs else None
    return max(1, int(getattr(settings, "batch_size", 1) or 1))


def unit_bounds(n_rows: int, target: int, batch: int = 1) -> list[int]:
    """Row bounds of the units of a shard of ``n_rows``: ``target`` rows each, then the remainder;
    a remainder smaller than ``MIN_UNIT_ROWS`` and the unit before it share their rows in two
    halves (the first a whole number of batches). ``[0, n_rows]``: the shard stays whole."""
    if n_rows < target + MIN_UNIT_ROWS // 2:
        return [0, n_rows]
    bounds = list(range(0, n_rows, target))
    if n_rows - bounds[-1] < MIN_UNIT_ROWS:
        last = bounds.pop()
        start = bounds[-1]
        half = -(-((n_rows - start) // 2) // batch) * batch
        if start + half < n_rows and last != start:
            bounds.append(start + half)
    return [*bounds, n_rows]


def _makespan(sizes: Sequence[int], target: int, workers: int, batch: int) -> float:
    """Batches the busiest worker runs when the units are handed out largest first."""
    units = sorted((b - a for n in sizes for a, b in _pairs(unit_bounds(n, target, batch))), reverse=True)
    free = [0.0] * workers
    for rows in units:
        heapq.heappush(free, heapq.heappop(free) + math.ceil(rows / batch) + UNIT_COST_BATCHES)
    return max(free)


def _pairs(bounds: list[int]) -> list[tuple[int, int]]:
    return list(zip(bounds, bounds[1:]))


def unit_target(shard_rows: Sequence[int], workers: int, batch: int = 1) -> int:
    """Rows per unit for ``workers`` workers over shards of ``shard_rows`` (the whole plan).

    Candidates: 1 to ``MAX_UNITS_PER_WORKER`` units per worker, rounded up to whole batches, at
    least ``MIN_UNIT_ROWS``; the one whose largest-first hand-out finishes first (fewest units on a tie).
    """
    total = sum(int(n) for n in shard_rows)
    best: tuple[float, int] | None = None
    for per_worker in range(1, MAX_UNITS_PER_WORKER + 1):
        target = max(MIN_UNIT_ROWS, -(-total // (max(1, workers) * per_worker)))
        target = -(-target // batch) * batch
        span = _makespan(shard_rows, target, max(1, workers), batch)
        if best is None or span < best[0] - 1e-9:
            best = (span, target)
    return best[1] if best is not None else MIN_UNIT_ROWS


def _splittable(job: ShardJob) -> bool:
    return job.unit is None and not job.reuse and not job.replace_damaged


def plan_work(jobs: Sequence[ShardJob], workers: int, plan_rows: Sequence[int] | int | None = None) -> Schedule:
    """Cut the shards of ``jobs`` into units so that ``workers`` workers get equal work.

    ``plan_rows``: the rows of every shard of the whole plan, finished ones too, so that a rerun or
    another rank cuts a shard at the same rows (default: the shards of ``jobs``; a bare total stands
    for the finished shards as one). Deterministic.
    """
    sizes = [len(j.rows) for j in jobs]
    if isinstance(plan_rows, int):
        sizes += [plan_rows - sum(sizes)] if plan_rows > sum(sizes) else []
    elif plan_rows is not None:
        sizes = [int(n) for n in plan_rows]
    batch = _batch_of(jobs)
    target = unit_target(sizes, workers, batch) if workers > 1 else max(sizes, default=1)
    items: list[tuple[ShardJob, tuple[int, int]]] = []
    merges: dict[int, ShardJob] = {}
    n_units: dict[int, int] = {}
    for job in jobs:
        pairs = _pairs(unit_bounds(len(job.rows), target, batch)) if workers > 1 and _splittable(job) else [(0, len(job.rows))]
        if len(pairs) == 1:
            items.append((job, (job.shard_id, 0)))
            continue
        items.extend((replace(job, unit=pair), (job.shard_id, k)) for k, pair in enumerate(pairs))
        merges[job.shard_id] = job
        n_units[job.shard_id] = len(pairs)
    # Largest first (stable: equal sizes keep shard order), the classic greedy for equal finish times.
    items.sort(key=lambda item: job_rows(item[0]), reverse=True)
    return Schedule([j for j, _ in items], [k for _, k in items], merges, n_units, target, batch)


def static_share(schedule: Schedule, planned: Sequence[tuple[int, int]], world: int, rank: int) -> list[ShardJob]:
    """The work of ``rank`` of ``world`` for static launchers (torchrun ranks, job arrays).

    ``planned``: ``(shard_id, n_rows)`` of every shard of the plan, finished ones included. The
    units of the whole plan are dealt largest first onto the least-loaded rank, so every rank, and a
    rerun after some shards finished, agrees on who owns what.
    """
    items = []
    for shard_id, n_rows in planned:
        bounds = unit_bounds(n_rows, schedule.target, schedule.batch) if world > 1 else [0, n_rows]
        items.extend((b - a, shard_id, u) for u, (a, b) in enumerate(_pairs(bounds)))
    owner: dict[tuple[int, int], int] = {}
    load = [(0, r) for r in range(world)]
    for size, shard_id, u in sorted(items, key=lambda it: -it[0]):
        total, r = heapq.heappop(load)
        owner[(shard_id, u)] = r
        heapq.heappush(load, (total + size, r))
    return [job for job, key in zip(schedule.work, schedule.keys) if owner.get(key, key[0] % world) == rank]


def worker_context(*modules: str) -> BaseContext:
    """How local workers are started: forked from a fork server that imported ``PRELOAD`` and
    ``modules`` once (where the platform has one), else spawned.

    The fork server is a fresh process (nothing of the parent's state, no CUDA context: each worker
    initialises its own device), started once per parent process and reused by later runs; its
    workers see the environment of the moment it started (set ``CUDA_VISIBLE_DEVICES`` and the
    like before the first run). A preloaded module that does not exist is skipped (imported by
    each worker instead).
    """
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*PRELOAD, *modules])
    return ctx


def start_worker_server() -> None:
    """Start :func:`worker_context`'s fork server now: it imports in the background while the
    caller scans and plans, and the workers forked later start warm. A no-op where workers are spawned."""
    if worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
