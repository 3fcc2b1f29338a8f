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

The unit target is ``ceil(rows / (workers * UNITS_PER_WORKER))`` rows (at least
``MIN_UNIT_ROWS``): with dynamic hand-out (local processes, Ray) each worker takes about four units,
so the last one to finish waits at most about a quarter of its share. One worker, or shards already
many and small, leave the plan as it is. Shards that reuse rows of old parts (an incremental update)
stay whole: their work is mostly copying.

Units are cut from the whole plan's size, so a rerun with the same number of workers cuts the same
units and resumes them. Static assignments (torchrun ranks, job arrays) use :func:`static_share`:
the units of the whole plan dealt largest first onto the least-loaded rank, so every rank, and a
rerun after some shards finished, agrees on who owns what. A finished unit is renamed ``.unit``: nothing writes it again,
and a unit cut differently by a rerun with other workers copies its rows from it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from .units import ShardJob

__all__ = ["MIN_UNIT_ROWS", "UNITS_PER_WORKER", "Schedule", "plan_work", "static_share", "job_rows", "unit_target",
           "n_pieces"]

UNITS_PER_WORKER = 4
MIN_UNIT_ROWS = 256


@dataclass
class Schedule:
    """The work of a run in the order to hand it out.

    Attributes:
        work: unit jobs and whole shards, largest first (a unit job has ``unit`` set).
        keys: ``(shard_id, unit index)`` of each item of ``work`` (0 for a whole shard).
        merges: ``{shard_id: job}`` of each split shard, to run once all its units have run.
        n_units: ``{shard_id: number of units}`` of each split shard.
        target: the unit size in rows.
    """

    work: list[ShardJob]
    keys: list[tuple[int, int]] = field(default_factory=list)
    merges: dict[int, ShardJob] = field(default_factory=dict)
    n_units: dict[int, int] = field(default_factory=dict)
    target: int = 0

    @property
    def n_jobs(self) -> int:
        return len(self.work) + len(self.merges)


def job_rows(job: ShardJob) -> int:
    """The rows a job embeds at most: its unit's range, else its shard's rows."""
    return job.unit[1] - job.unit[0] if job.unit is not None else len(job.rows)


def unit_target(total_rows: int, workers: int) -> int:
    """Rows per unit: about ``UNITS_PER_WORKER`` units per worker, at least ``MIN_UNIT_ROWS``."""
    return max(MIN_UNIT_ROWS, -(-int(total_rows) // (max(1, workers) * UNITS_PER_WORKER)))


def n_pieces(n_rows: int, target: int) -> int:
    """Into how many units a shard of ``n_rows`` is cut (1: it stays whole)."""
    return -(-n_rows // target) if n_rows > 1.5 * target else 1


def _splittable(job: ShardJob) -> bool:
    return job.unit is None and not job.reuse and not job.replace_damaged


def plan_work(jobs: Sequence[ShardJob], workers: int, total_rows: int | None = None) -> Schedule:
    """Cut the shards of ``jobs`` into units so that ``workers`` workers get equal work.

    ``total_rows``: the rows of the whole plan (the finished shards too), so that a rerun or
    another rank cuts a shard at the same rows (default: the rows of ``jobs``). Deterministic.
    """
    total = total_rows if total_rows is not None else sum(len(j.rows) for j in jobs)
    target = unit_target(total, workers)
    items: list[tuple[ShardJob, tuple[int, int]]] = []
    merges: dict[int, ShardJob] = {}
    n_units: dict[int, int] = {}
    for job in jobs:
        n = len(job.rows)
        pieces = n_pieces(n, target) if workers > 1 and _splittable(job) else 1
        if pieces == 1:
            items.append((job, (job.shard_id, 0)))
            continue
        bounds = [(n * k) // pieces for k in range(pieces + 1)]
        items.extend((replace(job, unit=(bounds[k], bounds[k + 1])), (job.shard_id, k)) for k in range(pieces))
        merges[job.shard_id] = job
        n_units[job.shard_id] = pieces
    # Largest first (stable: equal sizes keep shard order), the classic greedy for equal finish times.
    items.sort(key=lambda item: job_rows(item[0]), reverse=True)
    return Schedule([j for j, _ in items], [k for _, k in items], merges, n_units, target)


def static_share(schedule: Schedule, planned: Sequence[tuple[int, int]], world: int, rank: int) -> list[ShardJob]:
    """The work of ``rank`` of ``world`` for static launchers (torchrun ranks, job arrays).

    ``planned``: ``(shard_id, n_rows)`` of every shard of the plan, finished ones included. The
    units of the whole plan are dealt largest first onto the least-loaded rank, so every rank, and a
    rerun after some shards finished, agrees on who owns what.
    """
    items = []
    for shard_id, n_rows in planned:
        pieces = n_pieces(n_rows, schedule.target) if world > 1 else 1
        items.extend(((n_rows * (u + 1)) // pieces - (n_rows * u) // pieces, shard_id, u) for u in range(pieces))
    owner: dict[tuple[int, int], int] = {}
    load = [(0, r) for r in range(world)]
    for size, shard_id, u in sorted(items, key=lambda it: -it[0]):
        total, r = heapq.heappop(load)
        owner[(shard_id, u)] = r
        heapq.heappush(load, (total + size, r))
    return [job for job, key in zip(schedule.work, schedule.keys) if owner.get(key, key[0] % world) == rank]
