"""The plan of a sharded extraction: shards with stable ids, each owning a contiguous range of the sort key.

Rows are ordered by their key (the relative path, as ``scan_folder`` sorts them, or
``<tar>/<__key__>``). A shard owns the keys ``first_key <= key < end_key`` (the next shard's
``first_key``; the first shard starts at ``""`` and the last has no end), never row numbers or a
worker's rank. Re-planning keeps every boundary: a new file joins the shard whose range holds it,
a deleted one leaves it, so one changed file changes one shard. A shard that grows past
``2 * shard_size`` rows is split into new shards with ids never used before; a shard left empty
gives its range to its neighbour (whose rows, and so whose part, do not change).

The default of 10,000 rows per shard: a part is then ~51 MB at 1280-d float32, a few seconds of
GPU work and the unit of retry, and one changed file rewrites at most ~20,000 rows; 10^9 images
make 10^5 parts, still a listable folder and an index of a few MB.

WebDataset inputs get one shard per tar (:func:`plan_tars`), owned by the tar's name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import ConfigError, DatasetError

__all__ = ["DEFAULT_SHARD_SIZE", "MAX_SHARD_SIZE", "Shard", "Plan", "plan_shards", "replan", "plan_tars", "assign_rows",
           "check_shard_size"]

DEFAULT_SHARD_SIZE = 10_000
#: The most rows one shard may hold: a part of a million rows is ~5 GB at 1280-d float32.
MAX_SHARD_SIZE = 1_000_000


@dataclass(frozen=True)
class Shard:
    """One shard: a stable id and the key range it owns (``first_key`` inclusive); ``n_rows`` as planned."""

    shard_id: int
    first_key: str
    n_rows: int
    tar: str = ""


@dataclass
class Plan:
    """Shards in key order, the target size, and the next unused id.

    Attributes:
        shard_size: the target number of rows per shard (a shard splits past twice this).
        shards: in key order; shard ``i`` ends where shard ``i + 1`` starts.
        next_id: ids are never reused, so a part file name never means two things.
        kind: ``"range"`` (folders, manifests) or ``"tar"`` (one shard per tar).
    """

    shard_size: int
    shards: list[Shard] = field(default_factory=list)
    next_id: int = 0
    kind: str = "range"

    def end_key(self, i: int) -> str | None:
        """The exclusive end of shard ``i``'s range (``None`` for the last)."""
        return self.shards[i + 1].first_key if i + 1 < len(self.shards) else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        return cls(int(d["shard_size"]), [Shard(**s) for s in d["shards"]], int(d["next_id"]), str(d.get("kind", "range")))


def check_shard_size(shard_size: int) -> None:
    """Refuse a shard size that is not an integer in [1, :data:`MAX_SHARD_SIZE`] (before any work).

    Raises:
        ConfigError: with the value and the bound.
    """
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise ConfigError(f"The 'shard_size' parameter (--shard-size) must be an integer from 1 to {MAX_SHARD_SIZE:,} "
                          f"(rows per part file). Got {shard_size!r} instead.")


def _check(keys: Sequence[str], shard_size: int) -> None:
    check_shard_size(shard_size)
    if len(keys) < 2:
        return
    arr = np.asarray(keys, dtype=str)
    bad = np.flatnonzero(~(arr[1:] > arr[:-1]))  # numpy compares str by code point, as Python does
    if bad.size:
        a, b = keys[int(bad[0])], keys[int(bad[0]) + 1]
        raise DatasetError(
            f"Row keys must be unique and sorted; {a!r} is followed by {b!r}. "
            "Two manifest rows name the same file? Remove the duplicate."
        )


def plan_shards(keys: Sequence[str], shard_size: int = DEFAULT_SHARD_SIZE) -> Plan:
    """A fresh plan: ``keys`` (sorted, unique) cut every ``shard_size`` rows.

    Raises:
        ConfigError: ``shard_size`` is not a positive integer.
        DatasetError: the keys are not sorted and unique.
    """
    _check(keys, shard_size)
    shards = [
        Shard(i, "" if i == 0 else keys[start], min(shard_size, len(keys) - start))
        for i, start in enumerate(range(0, len(keys), shard_size))
    ]
    return Plan(shard_size, shards or [Shard(0, "", 0)], max(1, len(shards)))


def assign_rows(plan: Plan, keys: Sequence[str]) -> np.ndarray:
    """For each key, the index (into ``plan.shards``) of the shard whose range holds it."""
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    firsts = np.asarray([s.first_key for s in plan.shards], dtype=str)
    return (np.searchsorted(firsts, np.asarray(keys, dtype=str), side="right") - 1).astype(np.int64)


def replan(plan: Plan, keys: Sequence[str]) -> Plan:
    """The plan for ``keys`` (sorted, unique) that keeps ``plan``'s boundaries and ids.

    Each key joins the shard whose range holds it; a shard with more than ``2 * shard_size`` rows
    splits into ``ceil(n / shard_size)`` shards with new ids; an emptied shard is dropped and its
    range joins the previous shard (the first shard's range always starts at ``""``).
    """
    if plan.kind != "range":
        raise ConfigError("replan() is for key-range plans; use plan_tars() for WebDataset shards.")
    _check(keys, plan.shard_size)
    where = assign_rows(plan, keys)
    counts = np.bincount(where, minlength=len(plan.shards)) if len(keys) else np.zeros(len(plan.shards), np.int64)
    starts = np.searchsorted(where, np.arange(len(plan.shards)), side="left")
    out: list[Shard] = []
    next_id = plan.next_id
    for i, s in enumerate(plan.shards):
        n = int(counts[i])
        if n == 0:
            continue
        if n <= 2 * plan.shard_size:
            out.append(Shard(s.shard_id, s.first_key, n))
            continue
        base = int(starts[i])
        pieces = -(-n // plan.shard_size)
        bounds = [base + (n * j) // pieces for j in range(pieces + 1)]
        for j in range(pieces):
            first = s.first_key if j == 0 else keys[bounds[j]]
            out.append(Shard(next_id, first, bounds[j + 1] - bounds[j]))
            next_id += 1
    if not out:
        out = [Shard(next_id, "", 0)]
        next_id += 1
    if out[0].first_key != "":
        out[0] = Shard(out[0].shard_id, "", out[0].n_rows)
    return Plan(plan.shard_size, out, next_id, "range")


def plan_tars(tars: Sequence[str], counts: Sequence[int], old: Plan | None = None) -> Plan:
    """One shard per tar (``tars`` sorted, unique); a tar already planned keeps its shard id.

    Row keys of a tar are ``<tar>/<__key__>``, so ``first_key`` is ``<tar>/``.
    """
    _check(tars, 1)
    known = {s.tar: s.shard_id for s in old.shards} if old is not None else {}
    next_id = old.next_id if old is not None else 0
    shards = []
    for t, n in zip(tars, counts):
        sid = known.get(t)
        if sid is None:
            sid, next_id = next_id, next_id + 1
        shards.append(Shard(sid, f"{t}/", int(n), t))
    return Plan(old.shard_size if old is not None else DEFAULT_SHARD_SIZE, shards, next_id, "tar")
