"""Work units: shards cut into equal units for every launcher, gathered into the same parts, exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import featbank
from featbank.cache._index import check_parts
from featbank.cache._parts import PartRows, parts_dir
from featbank.extraction._jobs import EngineSpec, ShardJob, WorkerSettings
from featbank.extraction._schedule import (
    MIN_UNIT_ROWS,
    Schedule,
    job_rows,
    plan_work,
    static_share,
    unit_bounds,
    worker_context,
)
from featbank.extraction.launchers import rank_shards, run_local, run_prepared, run_slice
from featbank.extraction.units import RowSource, prepare, run_unit
from featbank.sources import scan_folder

from conftest import extract_job

pytestmark = pytest.mark.filterwarnings("ignore::featbank.errors.SkippedImagesWarning")
TINY = dict(backbone="test_tiny", engine="torch", num_workers=0, batch_size=16)
N_IMAGES = 2 * MIN_UNIT_ROWS + 100  # one shard of 612 rows: two units for two workers


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """612 tiny real PNGs in 2 classes, one of them unreadable."""
    root = tmp_path_factory.mktemp("units") / "data"
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        d = root / "ab"[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    (root / "a" / "0100.png").write_bytes(b"not a png")
    return root


def _prepare(data: Path, out: Path, **kw):
    return prepare(RowSource.from_index(scan_folder(data)), extract_job(out, data, **{**TINY, "shard_size": 1000, **kw}))


def _read(path: Path) -> dict:
    assert check_parts(path, full=True) == []
    with h5py.File(path, "r") as f:
        return {"emb": f["embeddings"][...], "paths": [p.decode() for p in f["paths"][...]],
                "skipped": dict(zip((p.decode() for p in f["skipped/paths"][...]),
                                    (r.decode() for r in f["skipped/reasons"][...])))}


@pytest.fixture(scope="module")
def reference(many_images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    run_prepared(_prepare(many_images, out))  # one process, whole shards
    return _read(out)


def _leftovers(index: Path) -> list[str]:
    return sorted(p.name for p in parts_dir(index).iterdir() if not p.name.startswith("part-"))


def _fake_jobs(sizes: list[int], batch: int | None = None) -> list[ShardJob]:
    """Shard jobs with ``sizes`` rows (and ``batch`` rows per batch): all the scheduler reads."""
    spec = EngineSpec("test_sleep", None, None, "torch", "cpu", "fp32")
    settings = None if batch is None else WorkerSettings(spec, "float32", batch, 0, 32, {})
    out = []
    for sid, n in enumerate(sizes):
        rows = PartRows([f"{sid:03d}/{i:06d}" for i in range(n)], np.zeros((n, 2), np.int64), np.zeros(n, np.int64),
                        np.zeros(n, np.int8))
        out.append(ShardJob(sid, rows, [], "", "", "", [], "folder", settings))
    return out


def _makespan(schedule: Schedule, workers: int) -> int:
    """Rows of the busiest worker when the work is handed out in order to whoever is free first."""
    import heapq

    free = [0] * workers
    for job in schedule.work:
        t = heapq.heappop(free)
        heapq.heappush(free, t + job_rows(job))
    return max(free)


@pytest.mark.parametrize("sizes,workers", [([10_000, 2_000], 2), ([10_000] * 5, 8), ([10_000] * 5, 2), ([700], 4)])
def test_units_balance_the_work(sizes, workers):
    schedule = plan_work(_fake_jobs(sizes), workers)
    total = sum(sizes)
    assert sum(job_rows(j) for j in schedule.work) == total  # every row once
    for sid, n in schedule.n_units.items():
        units = sorted(j.unit for j in schedule.work if j.shard_id == sid)
        assert units[0][0] == 0 and units[-1][1] == sizes[sid]
        assert all(a[1] == b[0] for a, b in zip(units, units[1:]))  # contiguous, no overlap
        assert len(units) == n
    ideal = max(total / workers, MIN_UNIT_ROWS)  # no unit smaller than MIN_UNIT_ROWS rows
    assert _makespan(schedule, workers) <= 1.3 * ideal  # whole shards: 10,000 / 6,000 = 1.67 for 12,000 on 2


def _batch_makespan(schedule: Schedule, workers: int, batch: int) -> int:
    """Batches of the busiest worker (a partial batch costs a whole one), handed out in order."""
    import heapq

    free = [0] * workers
    for job in schedule.work:
        heapq.heappush(free, heapq.heappop(free) + -(-job_rows(job) // batch))
    return max(free)


@pytest.mark.parametrize("sizes", [[10_000, 2_000], [10_000] * 5, [10_000] * 5 + [3_333], [7_000, 7_000, 500]])
@pytest.mark.parametrize("workers", [2, 3, 4, 6, 8])
def test_units_are_whole_batches_and_leave_almost_no_tail(sizes, workers):
    batch = 64
    schedule = plan_work(_fake_jobs(sizes, batch), workers)
    assert schedule.batch == batch and schedule.target % batch == 0
    for job in schedule.work:  # every unit starts on a batch boundary of its shard
        assert job.unit is None or job.unit[0] % batch == 0
    ideal = -(-sum(sizes) // batch) / workers
    # Equal units (the old cut) left 1.10-1.20 x ideal here: 33 units on 8 workers, 35 on 8, 17 on 4.
    assert _batch_makespan(schedule, workers, batch) <= 1.08 * ideal + 1


def test_unit_bounds_cut_target_rows_then_share_a_small_remainder():
    assert unit_bounds(1000, 1000) == [0, 1000]  # whole
    assert unit_bounds(10_000, 3_000) == [0, 3_000, 6_000, 9_000, 10_000]  # remainder of 1,000 on its own
    # A remainder of 100 < MIN_UNIT_ROWS shares the last 3,100 rows with the unit before it, on a batch boundary.
    assert unit_bounds(9_100, 3_000, 64) == [0, 3_000, 6_000, 6_000 + 1_600, 9_100]
    assert unit_bounds(700, 256) == [0, 256, 256 + 222, 700]


def test_plan_rows_of_the_whole_plan_fix_the_cut_whatever_is_left():
    jobs = _fake_jobs([10_000, 2_000, 10_000], 64)
    full = plan_work(jobs, 4, [10_000, 2_000, 10_000])
    later = plan_work([jobs[0], jobs[2]], 4, [10_000, 2_000, 10_000])  # shard 1 finished
    assert later.target == full.target
    assert {(j.shard_id, j.unit) for j in later.work} == {(j.shard_id, j.unit) for j in full.work if j.shard_id != 1}


def test_local_workers_are_forked_from_a_preloaded_server():
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        pytest.skip("no fork server on this platform: workers are spawned")
    ctx = worker_context("featbank.extraction._launch")
    assert ctx.get_start_method() == "forkserver"


def test_one_worker_and_many_small_shards_are_left_whole():
    assert plan_work(_fake_jobs([10_000, 2_000]), 1).merges == {}
    assert plan_work(_fake_jobs([300] * 40), 4).merges == {}  # 40 shards for 4 workers: already balanced


def test_static_shares_cover_everything_once_and_agree_after_progress():
    jobs = _fake_jobs([5_000, 3_000, 800])
    planned = [(j.shard_id, len(j.rows)) for j in jobs]
    schedule = plan_work(jobs, 3, sum(n for _, n in planned))
    shares = [static_share(schedule, planned, 3, r) for r in range(3)]
    keys = sorted((j.shard_id, j.unit) for share in shares for j in share)
    assert keys == sorted((j.shard_id, j.unit) for j in schedule.work)
    assert max(sum(map(job_rows, s)) for s in shares) <= 1.2 * sum(n for _, n in planned) / 3
    # Shard 1 finished: the jobs left are cut and owned as before.
    later = plan_work([jobs[0], jobs[2]], 3, sum(n for _, n in planned))
    for r in range(3):
        assert {(j.shard_id, j.unit) for j in static_share(later, planned, 3, r)} == \
            {(j.shard_id, j.unit) for j in shares[r] if j.shard_id != 1}


@pytest.mark.slow
def test_two_workers_with_units_equal_one_process(many_images, reference, tmp_path):
    out = tmp_path / "two.h5"
    prep = _prepare(many_images, out)
    assert len(plan_work(prep.jobs, 2).n_units) == 1  # the one shard is cut
    report = run_prepared(prep, procs=2)
    got = _read(out)
    assert got["paths"] == reference["paths"] and report.n_rows == N_IMAGES - 1
    np.testing.assert_array_equal(got["emb"], reference["emb"])
    assert got["skipped"] == reference["skipped"] and "a/0100.png" in got["skipped"]
    assert _leftovers(out) == []  # no .partial or .unit left


@pytest.mark.slow
def test_a_finished_unit_is_never_embedded_again(many_images, reference, tmp_path):
    out = tmp_path / "resume.h5"
    prep = _prepare(many_images, out)
    schedule = plan_work(prep.jobs, 2, N_IMAGES)
    first = next(j for j in schedule.work if j.unit is not None)
    n = first.unit[1] - first.unit[0]
    assert run_unit(first) == (n, 0)  # all its rows, none from an earlier run
    unit_file = next(parts_dir(out).glob("*.unit"))
    with h5py.File(unit_file, "r") as f:
        assert bool(f.attrs["unit_done"]) and int(f["status"][...].sum()) == first.unit[1] - first.unit[0] - (
            1 if first.unit[0] <= 50 < first.unit[1] else 0)
    mtime = unit_file.stat().st_mtime_ns
    assert run_unit(first) == (n, n) and unit_file.stat().st_mtime_ns == mtime  # done before: not this run's speed
    report = featbank.extract(many_images, out, progress=False, procs=2, shard_size=1000, **TINY)
    assert report.n_resumed == first.unit[1] - first.unit[0] - 1  # its rows but the unreadable one
    assert report.n_embedded + report.n_resumed == N_IMAGES - 1
    np.testing.assert_array_equal(_read(out)["emb"], reference["emb"])


def test_progress_books_each_row_once():
    """A finished unit's rows that an earlier run finished are the bar's starting point (``done_before``),
    the rest this run's; a whole shard's rows are this run's; a merge adds only the rows its units did
    not report (a failed unit's, which the merge embeds), never the shard's again."""
    from types import SimpleNamespace as NS

    from featbank.extraction._schedule import Schedule
    from featbank.extraction.launchers import _Dispatch
    from featbank.extraction.units import UnitDone

    class Bar:
        def __init__(self):
            self.calls = []

        def __call__(self, n):
            self.calls.append(("now", n))

        def done_before(self, n):
            self.calls.append(("before", n))

    bar = Bar()
    merge = NS(shard_id=0, unit=None)
    d = _Dispatch(Schedule([], [], {0: merge}, {0: 3}, 10, 1))
    d.report(NS(shard_id=0, unit=(0, 10)), UnitDone(10, 4), bar)
    d.report(NS(shard_id=0, unit=(10, 20)), tuple(UnitDone(10)), bar)  # as it comes back through a pipe or Ray
    d.report(merge, NS(n_rows=29, n_skipped=1), bar)  # the third unit failed: the merge embedded its 10 rows
    d.report(NS(shard_id=1, unit=None), NS(n_rows=7, n_skipped=1), bar)  # a whole shard
    d.report(NS(shard_id=0, unit=(0, 10)), UnitDone(10, 10), None)
    assert bar.calls == [("before", 4), ("now", 6), ("now", 10), ("now", 10), ("now", 8)]
    plain = []
    d.report(NS(shard_id=2, unit=(0, 10)), UnitDone(10, 10), plain.append)  # no done_before: all rows
    assert sum(plain) == 10


def test_a_split_shard_is_counted_once(tmp_path):
    """Two workers, one shard cut into units: the progress ends at the number of images, not twice it."""
    rng = np.random.default_rng(0)
    for c in "ab":
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(250):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "d" / c / f"{i}.png")
    marks = []
    featbank.extract(tmp_path / "d", tmp_path / "c.h5", procs=2, shard_size=1000, progress=False,
                     on_progress=lambda done, total: marks.append((done, total)), **TINY)
    assert len(marks) >= 2 and marks[-1] == (500, 500) and max(d for d, _ in marks) == 500


@pytest.mark.slow
def test_units_cut_for_other_workers_are_copied_not_recomputed(many_images, reference, tmp_path):
    out = tmp_path / "other.h5"
    prep = _prepare(many_images, out)
    for job in plan_work(prep.jobs, 2, N_IMAGES).work:  # every unit of a 2-worker cut, finished
        run_unit(job)
    # A 3-worker run cuts the shard otherwise: its units copy every row from the finished ones.
    report = featbank.extract(many_images, out, progress=False, procs=3, shard_size=1000, **TINY)
    assert report.n_embedded == 0 and report.n_resumed == N_IMAGES - 1
    np.testing.assert_array_equal(_read(out)["emb"], reference["emb"])


def test_job_array_slices_with_units_then_finalize(many_images, reference, tmp_path):
    out = tmp_path / "slices.h5"
    run_slice(_prepare(many_images, out), 0, 2)
    with pytest.raises(featbank.errors.CacheError, match="no part"):
        run_prepared(_prepare(many_images, out), finalize_only=True)  # slice 1 has not run: nothing embedded here
    assert not out.exists()
    run_slice(_prepare(many_images, out), 1, 2)
    report = run_prepared(_prepare(many_images, out), finalize_only=True)
    assert report.published and report.n_rows == N_IMAGES - 1
    got = _read(out)
    np.testing.assert_array_equal(got["emb"], reference["emb"])
    assert got["skipped"] == reference["skipped"]


def test_rank_shards_partition_the_parts(many_images, tmp_path):
    prep = _prepare(many_images, tmp_path / "r.h5", shard_size=100)
    owned = [rank_shards(prep, r, 3) for r in range(3)]
    assert set().union(*owned) == {j.shard_id for j in prep.jobs}
    assert sum(map(len, owned)) == len(prep.jobs)


def test_run_local_without_jobs_or_with_one_worker_needs_no_units(many_images, tmp_path):
    assert run_local([], 2) == []
    prep = _prepare(many_images, tmp_path / "one.h5")
    parts = run_local(prep.jobs, 1)
    assert len(parts) == 1 and not list(parts_dir(tmp_path / "one.h5").glob("*.unit"))


@pytest.mark.slow
def test_torchrun_ranks_with_units_equal_one_process(many_images, reference, tmp_path):
    out = tmp_path / "tr.h5"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import featbank
        featbank.extract({str(many_images)!r}, {str(out)!r}, backbone="test_tiny", engine="torch", num_workers=0,
                         batch_size=16, shard_size=1000, launcher="torchrun", progress=False)
    """))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                          str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = _read(out)
    np.testing.assert_array_equal(got["emb"], reference["emb"])
    assert got["skipped"] == reference["skipped"] and _leftovers(out) == []


@pytest.mark.slow
def test_ray_with_units_equals_one_process(many_images, reference, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray.h5"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import os
        os.environ["RAY_ADDRESS"] = "local"
        import featbank
        featbank.extract({str(many_images)!r}, {str(out)!r}, backbone="test_tiny", engine="torch", num_workers=0,
                         batch_size=16, shard_size=1000, launcher="ray", procs=2, progress=False)
    """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_array_equal(_read(out)["emb"], reference["emb"])
    assert _leftovers(out) == []


def test_test_sleep_waits_per_batch_without_cpu_and_needs_the_torch_engine(tmp_path):
    import time

    import torch

    from featbank.backbones import load_backbone
    from featbank.backbones._tiny import SLEEP_TRACE_ENV, read_sleep_trace
    from featbank.extraction import build_engine, build_tap_engine

    bb = load_backbone("test_sleep", "0.2")
    assert bb.preprocess.input_size == (8, 8)  # inputs that cost next to nothing to decode
    x = torch.rand(4, 3, 8, 8)
    os.environ[SLEEP_TRACE_ENV] = str(tmp_path)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        emb = bb.features(x)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        del os.environ[SLEEP_TRACE_ENV]
    assert emb.shape == (4, 32) and wall >= 0.2 and cpu < wall / 2  # the wait is not CPU work
    [(start, end, rows)] = read_sleep_trace(tmp_path)  # the batch, logged once
    assert rows == 4 and end - start >= 0.2
    np.testing.assert_array_equal(emb.detach().numpy(), bb.features(x).detach().numpy())  # deterministic
    assert build_engine("auto", bb, "cpu", "fp32").name == "torch"
    with pytest.raises(featbank.errors.ConfigError, match="--engine torch"):
        build_engine("onnxruntime", bb, "cpu", "fp32")
    # The engine over taps and views (extract --layers/--views, predict) follows the same rule, with no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_tap_engine("auto", bb, "cpu", "fp32", ("final",), "gap").name == "torch"
    with pytest.raises(featbank.errors.ConfigError, match="--engine torch"):
        build_tap_engine("onnxruntime", bb, "cpu", "fp32", ("final",), "gap")
    with pytest.raises(featbank.errors.ConfigError, match="seconds per batch"):
        load_backbone("test_sleep", "forever")


def test_prestart_starts_the_fork_server_only_for_local_workers(monkeypatch):
    from featbank.extraction.launchers import prestart

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert prestart(1) is False  # one process: no workers
    assert prestart(2, "ray") is False and prestart(2, "torchrun") is False
    assert prestart(2, job_array=True) is False  # --rank / --finalize run no local workers
    assert prestart(2, "no-such-launcher") is False  # the run itself reports the bad name
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert prestart(2) is False  # auto under torchrun
    monkeypatch.delenv("WORLD_SIZE")
    assert prestart(2) is True and prestart(2, "local") is True  # idempotent: one server per process


def test_prestarted_workers_run_the_work_and_none_outlive_the_run(many_images, reference, tmp_path):
    import multiprocessing as mp
    import time

    from featbank.extraction.launchers import prestarted_workers

    out = tmp_path / "pool.h5"
    prep = _prepare(many_images, out)
    with prestarted_workers(2, "cpu", prep.jobs[0].settings.spec) as pool:
        assert pool is not None
        run_prepared(prep, procs=2)  # takes the workers started (and warmed) while it planned
        assert pool.take() is None  # taken: a second run in the block starts its own
    got = _read(out)
    np.testing.assert_array_equal(got["emb"], reference["emb"])
    assert got["skipped"] == reference["skipped"] and _leftovers(out) == []
    with prestarted_workers(2, "cpu") as pool:  # a run with nothing to do: nobody takes them
        assert pool is not None
    with prestarted_workers(1, "cpu") as pool:  # one process: no workers
        assert pool is None
    deadline = time.time() + 60
    while mp.active_children() and time.time() < deadline:
        time.sleep(0.2)
    assert mp.active_children() == []


def test_a_run_with_nothing_to_do_stops_the_prestarted_workers_quietly(many_images, tmp_path):
    """``--procs 2`` on an up-to-date cache and on a missing data folder: no worker's traceback, no
    process left behind (workers forked while the parent planned are stopped at once)."""
    out = tmp_path / "c.h5"
    cmd = [sys.executable, "-m", "featbank.cli", "extract", str(many_images), "--out", str(out), "--backbone", "test_tiny",
           "--weights", "random", "--num-workers", "0", "--procs", "2", "--shard-size", "200", "--quiet"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    for argv in (cmd, [*cmd[:4], str(tmp_path / "nodata"), *cmd[5:]]):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert res.returncode == (0 if argv is cmd else 2), res.stderr[-2000:]
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
