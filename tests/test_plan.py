"""The shard plan: stable ids owning key ranges; property tests over random insertions and deletions."""

from __future__ import annotations

import random

import pytest

from featbank.errors import ConfigError, DatasetError
from featbank.extraction._plan import Plan, assign_rows, plan_shards, plan_tars, replan


def _by_shard(plan: Plan, keys: list[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {s.shard_id: [] for s in plan.shards}
    for k, i in zip(keys, assign_rows(plan, keys)):
        out[plan.shards[i].shard_id].append(k)
    return out


def _keys(rng: random.Random, n: int) -> list[str]:
    return sorted({f"{rng.choice('abcdefgh')}/{rng.randrange(10**6):07d}.png" for _ in range(n)})


def test_fresh_plan_cuts_every_shard_size_rows():
    keys = [f"k{i:04d}" for i in range(25)]
    plan = plan_shards(keys, 10)
    assert [(s.shard_id, s.first_key, s.n_rows) for s in plan.shards] == [(0, "", 10), (1, "k0010", 10), (2, "k0020", 5)]
    assert plan.end_key(0) == "k0010" and plan.end_key(2) is None
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("seed", range(20))
def test_random_changes_touch_exactly_the_shards_whose_ranges_hold_them(seed):
    rng = random.Random(seed)
    keys = _keys(rng, 400)
    plan = plan_shards(keys, 37)
    before = _by_shard(plan, keys)
    deleted = set(rng.sample(keys, rng.randrange(0, 6)))
    added = set(_keys(rng, rng.randrange(0, 6))) - set(keys)
    new_keys = sorted((set(keys) - deleted) | added)
    new = replan(plan, new_keys)
    after = _by_shard(new, new_keys)
    # Which old shard's range holds each changed key:
    touched = {plan.shards[i].shard_id for i in assign_rows(plan, sorted(deleted | added))}
    for sid, rows in before.items():
        if sid in touched:
            assert after.get(sid, []) != rows or not rows
        else:
            assert after[sid] == rows  # same id, same rows: its part is kept as is
    # Every key in exactly one shard; row counts as planned; boundaries kept where shards survive.
    assert sorted(k for rows in after.values() for k in rows) == new_keys
    assert all(s.n_rows == len(after[s.shard_id]) for s in new.shards)
    old_first = {s.shard_id: s.first_key for s in plan.shards}
    assert all(s.first_key == old_first[s.shard_id] for s in new.shards[1:])
    assert new.shards[0].first_key == ""


def test_an_oversized_shard_splits_into_new_ids_that_never_reuse_old_ones():
    keys = [f"k{i:04d}" for i in range(30)]
    plan = plan_shards(keys, 10)
    grown = sorted(keys + [f"k0015.{j:02d}" for j in range(15)])  # shard 1 now holds 25 > 2*10
    new = replan(plan, grown)
    ids = [s.shard_id for s in new.shards]
    assert ids[0] == 0 and ids[-1] == 2 and set(ids[1:-1]) == {3, 4, 5}
    assert new.next_id == 6 and sum(s.n_rows for s in new.shards) == 45
    assert all(5 <= s.n_rows <= 10 for s in new.shards[1:-1])
    # Shrink it away again and grow: ids keep increasing.
    again = replan(new, [k for k in grown if not k.startswith("k001")])
    assert again.next_id == 6 and 1 not in {s.shard_id for s in again.shards}


def test_emptied_shards_give_their_range_away():
    keys = [f"k{i:04d}" for i in range(30)]
    plan = plan_shards(keys, 10)
    new = replan(plan, keys[10:])  # the first shard is emptied
    assert [(s.shard_id, s.first_key) for s in new.shards] == [(1, ""), (2, "k0020")]
    assert assign_rows(new, ["a"]).tolist() == [0]
    empty = replan(plan, [])
    assert len(empty.shards) == 1 and empty.shards[0].n_rows == 0 and empty.shards[0].shard_id == 3


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="shard_size"):
        plan_shards(["a"], 0)
    with pytest.raises(DatasetError, match="unique and sorted"):
        plan_shards(["b", "a"], 2)
    with pytest.raises(DatasetError, match="'a' is followed by 'a'"):
        plan_shards(["a", "a"], 2)


def test_tar_plans_keep_one_shard_per_tar_by_name():
    plan = plan_tars(["s0.tar", "s1.tar"], [5, 7])
    assert [(s.shard_id, s.tar, s.n_rows) for s in plan.shards] == [(0, "s0.tar", 5), (1, "s1.tar", 7)]
    new = plan_tars(["s0.tar", "s05.tar", "s1.tar"], [5, 3, 8], plan)
    assert [(s.shard_id, s.tar) for s in new.shards] == [(0, "s0.tar"), (2, "s05.tar"), (1, "s1.tar")]
    with pytest.raises(ConfigError):
        replan(new, ["s0.tar/x"])
