"""Sharded extraction into a schema-v2 cache with real processes: local workers, torchrun, Ray, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from _v1cache import make_v1_cache, to_v1

import featbank
from featbank.cache._index import check_parts, read_parts_table
from featbank.cache._parts import parts_dir
from featbank.errors import CacheError, CacheKeyMismatch
from featbank.extraction.launchers import run_local, run_prepared
from featbank.extraction.units import RowSource, prepare
from featbank.sources import scan_folder

from conftest import extract_job, make_image_folder

TINY = dict(backbone="test_tiny", engine="torch", num_workers=0)


def _prepare(data: Path, out: Path, **kw):
    return prepare(RowSource.from_index(scan_folder(data)), extract_job(out, data, **{**TINY, "shard_size": 5, **kw}))


def _read(path: Path) -> dict:
    assert check_parts(path, full=True) == []
    with h5py.File(path, "r") as f:
        return {
            "emb": f["embeddings"][...], "paths": [p.decode() for p in f["paths"][...]],
            "labels": f["labels"][...], "splits": f["splits"][...], "fps": f["fingerprints"][...],
            "skipped": [p.decode() for p in f["skipped/paths"][...]],
        }


def _mtimes(index: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in parts_dir(index).glob("part-*.h5")}


def test_one_process_equals_a_v1_extract(image_folder, tmp_path):
    out = tmp_path / "v2.h5"
    report = run_prepared(_prepare(image_folder, out))
    assert report.published and report.n_shards == 5 and report.n_written == 5 and report.n_rows == 24
    v2 = _read(out)
    make_v1_cache(image_folder, tmp_path / "v1.h5", progress=False, **TINY)
    with h5py.File(tmp_path / "v1.h5", "r") as f:
        assert v2["paths"] == [p.decode() for p in f["paths"][...]]
        np.testing.assert_array_equal(v2["labels"], f["labels"][...])
        np.testing.assert_array_equal(v2["fps"], f["fingerprints"][...])
        np.testing.assert_allclose(v2["emb"], f["embeddings"][...], atol=1e-5)
    # Up to date: nothing to run, the index is rebuilt from the same parts.
    again = _prepare(image_folder, out)
    assert again.jobs == []


def test_incremental_add_change_delete_rewrite_only_their_shard(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    run_prepared(_prepare(image_folder, out))
    before = _mtimes(out)
    table = {p.shard_id: p.name for p in read_parts_table(out)}
    # Shards of 5 rows: 0 = cat_000..004, 1 = cat_005..dog_001, 2 = dog_002..006, 3 = dog_007..fox_003.
    from PIL import Image

    Image.fromarray(np.full((40, 48, 3), 7, np.uint8)).save(image_folder / "dog" / "dog_003b.png")
    prep = _prepare(image_folder, out)
    assert [j.shard_id for j in prep.jobs] == [2] and len(prep.jobs[0].rows) == 6
    run_prepared(prep)
    after = _mtimes(out)
    assert table[2] not in after and sum(n not in before for n in after) == 1
    new_part = next(n for n in after if n not in before)
    with h5py.File(parts_dir(out) / new_part, "r") as f:
        assert f.attrs["n_reused"] == 5  # the shard's 5 unchanged rows were copied, one was embedded
    assert all(after[n] == before[n] for n in after if n in before)  # untouched parts kept byte for byte
    fresh = tmp_path / "fresh.h5"
    run_prepared(_prepare(image_folder, fresh))
    a, b = _read(out), _read(fresh)
    assert a["paths"] == b["paths"] and len(a["paths"]) == 25
    np.testing.assert_allclose(a["emb"], b["emb"], atol=1e-5)
    (image_folder / "dog" / "dog_003b.png").unlink()
    (image_folder / "fox" / "fox_000.png").unlink()
    prep = _prepare(image_folder, out)
    # Shard 2 is back to its old rows (whose part was removed once unreferenced), shard 3 lost a row.
    assert [j.shard_id for j in prep.jobs] == [2, 3]
    before = _mtimes(out)
    run_prepared(prep)
    after = _mtimes(out)
    assert len(_read(out)["paths"]) == 23 and sum(n not in before for n in after) == 2
    # A changed file (new size and mtime) rewrites its shard only.
    (image_folder / "cat" / "cat_001.jpg").write_bytes((image_folder / "cat" / "cat_003.jpg").read_bytes())
    assert [j.shard_id for j in _prepare(image_folder, out).jobs] == [0]


def test_a_bad_image_is_recorded_in_its_part(image_folder, tmp_path):
    (image_folder / "cat" / "cat_002.png").write_bytes(b"not an image")
    out = tmp_path / "c.h5"
    report = run_prepared(_prepare(image_folder, out))
    assert report.n_skipped == 1 and report.n_rows == 23
    got = _read(out)
    assert got["skipped"] == ["cat/cat_002.png"] and "cat/cat_002.png" not in got["paths"]


def test_other_settings_are_refused_and_a_v1_file_is_not_overwritten(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    run_prepared(_prepare(image_folder, out))
    with pytest.raises(CacheKeyMismatch, match="other settings"):
        _prepare(image_folder, out, dtype="float16")
    v1 = make_v1_cache(image_folder, tmp_path / "v1.h5", progress=False, **TINY)
    with pytest.raises(CacheError, match="schema-v1"):
        _prepare(image_folder, v1)


def test_a_deleted_part_is_named_and_recomputed_alone(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    run_prepared(_prepare(image_folder, out))
    victim = read_parts_table(out)[2]
    (parts_dir(out) / victim.name).unlink()
    assert any(victim.name in p for p in check_parts(out))
    prep = _prepare(image_folder, out)
    assert [j.shard_id for j in prep.jobs] == [victim.shard_id]
    run_prepared(prep)
    assert check_parts(out, full=True) == []
    # Truncated in place: same name, other size. Named, then rewritten by the next run.
    other = parts_dir(out) / read_parts_table(out)[0].name
    with open(other, "r+b") as fh:
        fh.truncate(other.stat().st_size // 2)
    assert any(other.name in p and "truncated" in p for p in check_parts(out))
    prep = _prepare(image_folder, out)
    assert [(j.shard_id, j.replace_damaged) for j in prep.jobs] == [(0, True)]
    run_prepared(prep)
    assert check_parts(out, full=True) == [] and len(_read(out)["paths"]) == 24


def test_procs_must_be_positive():
    with pytest.raises(featbank.errors.ConfigError, match="procs"):
        run_local([], 0)


@pytest.mark.slow
def test_two_local_processes_equal_one(image_folder, tmp_path):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    run_prepared(_prepare(image_folder, one))
    report = run_prepared(_prepare(image_folder, two), procs=2)
    assert report.n_written == 5
    a, b = _read(one), _read(two)
    assert a["paths"] == b["paths"]
    np.testing.assert_allclose(a["emb"], b["emb"], atol=1e-5)


_DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from featbank.sources import scan_folder
    from featbank.extraction.launchers import run_prepared
    from featbank.extraction import ExtractConfig
    from featbank.extraction.job import resolve_job
    from featbank.extraction.units import RowSource, prepare

    if __name__ == "__main__":  # spawned workers import this file again
        data, out, launcher, procs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
        config = ExtractConfig(str(data), str(out), backbone="test_tiny", engine="torch", num_workers=0,
                               shard_size=int(sys.argv[5]), batch_size=int(sys.argv[6]))
        prep = prepare(RowSource.from_index(scan_folder(data)), resolve_job(config))
        report = run_prepared(prep, launcher=launcher, procs=procs, finalize_only=launcher == "finalize")
        print(f"published {report.published} {report.n_written}", flush=True)  # one write: ranks share stdout
    """
)


def _driver(tmp_path: Path) -> Path:
    p = tmp_path / "driver.py"
    p.write_text(_DRIVER)
    return p


def _env() -> dict:
    # RAY_ADDRESS=local: a private Ray cluster, never one another process left running on this node.
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "local"}


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(image_folder, tmp_path):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    run_prepared(_prepare(image_folder, one))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           str(_driver(tmp_path)), str(image_folder), str(two), "torchrun", "1", "5", "32"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("published True") == 1 and res.stdout.count("published False") == 1
    a, b = _read(one), _read(two)
    assert a["paths"] == b["paths"]
    np.testing.assert_allclose(a["emb"], b["emb"], atol=1e-5)


@pytest.mark.slow
def test_ray_local_cluster_equals_one_process(image_folder, tmp_path):
    pytest.importorskip("ray")
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    run_prepared(_prepare(image_folder, one))
    cmd = [sys.executable, str(_driver(tmp_path)), str(image_folder), str(two), "ray", "2", "5", "32"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _read(one), _read(two)
    assert a["paths"] == b["paths"]
    np.testing.assert_allclose(a["emb"], b["emb"], atol=1e-5)


@pytest.mark.slow
def test_a_worker_killed_mid_shard_resumes_exactly_once(tmp_path):
    psutil = pytest.importorskip("psutil")
    data = make_image_folder(tmp_path / "data", n_per_class=30, size=(160, 160))
    out, ref = tmp_path / "c.h5", tmp_path / "ref.h5"
    cmd = [sys.executable, str(_driver(tmp_path)), str(data), str(out), "local", "2", "10", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    folder = parts_dir(out)
    deadline = time.time() + 240
    killed = None
    while time.time() < deadline and proc.poll() is None:
        published = list(folder.glob("part-*.h5")) if folder.exists() else []
        partials = list(folder.glob(".part-*.partial")) if folder.exists() else []
        if published and partials:
            children = [c for c in psutil.Process(proc.pid).children()
                        if "resource_tracker" not in " ".join(c.cmdline())]
            if children:
                killed = children[0].pid
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=240)
    assert killed is not None, "no worker was caught mid-shard"
    assert proc.returncode != 0 and "died" in err and "run the same command again" in err
    assert not out.exists()  # nothing published by a run with a dead worker
    kept = _mtimes(out)
    assert kept
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    after = _mtimes(out)
    assert all(after[n] == t for n, t in kept.items())  # finished parts not recomputed
    run_prepared(_prepare(data, ref, shard_size=10, batch_size=1))
    a, b = _read(out), _read(ref)
    assert a["paths"] == b["paths"] and len(set(a["paths"])) == 90
    np.testing.assert_allclose(a["emb"], b["emb"], atol=1e-5)


def test_separate_jobs_then_finalize(image_folder, tmp_path):
    from featbank.extraction._schedule import plan_work, static_share
    from featbank.extraction.launchers import run_slice

    out, ref = tmp_path / "c.h5", tmp_path / "ref.h5"
    prep = _prepare(image_folder, out)
    run_slice(prep, 0, 2)
    planned = [(p.shard_id, p.n_rows) for p in prep.planned]
    first = {j.shard_id for j in static_share(plan_work(prep.jobs, 2, 24), planned, 2, 0)}
    others = sorted(j.shard_id for j in prep.jobs if j.shard_id not in first)
    assert first and others
    with pytest.raises(CacheError, match="(?s)" + ".*".join(f"shard {s}: no part" for s in others)):
        run_prepared(_prepare(image_folder, out), finalize_only=True)
    assert not out.exists()
    run_slice(_prepare(image_folder, out), 1, 2)
    report = run_prepared(_prepare(image_folder, out), finalize_only=True)
    assert report.published and report.n_rows == 24
    run_prepared(_prepare(image_folder, ref))
    np.testing.assert_array_equal(_read(out)["emb"], _read(ref)["emb"])
    with pytest.raises(featbank.errors.ConfigError, match="rank"):
        run_slice(prep, 2, 2)


def _kill_mid_shard(proc: subprocess.Popen, folder: Path, pick) -> int | None:
    """SIGKILL the first process ``pick`` selects once a part is published and another is in flight."""
    import psutil

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if folder.exists() and list(folder.glob("part-*.h5")) and list(folder.glob(".part-*.partial")):
            victims = [p for p in psutil.Process(proc.pid).children(recursive=True) if pick(" ".join(p.cmdline()))]
            if victims:
                os.kill(victims[0].pid, signal.SIGKILL)
                return victims[0].pid
        time.sleep(0.01)
    return None


@pytest.mark.slow
def test_torchrun_rank_killed_mid_shard_then_rerun(tmp_path):
    pytest.importorskip("psutil")
    data = make_image_folder(tmp_path / "data", n_per_class=30, size=(160, 160))
    out, ref = tmp_path / "c.h5", tmp_path / "ref.h5"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29518",
           str(_driver(tmp_path)), str(data), str(out), "torchrun", "1", "10", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    killed = _kill_mid_shard(proc, parts_dir(out), lambda c: "driver.py" in c and "torch.distributed.run" not in c)
    proc.communicate(timeout=240)
    assert killed is not None and proc.returncode != 0 and not out.exists()
    kept = _mtimes(out)
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert all(_mtimes(out)[n] == t for n, t in kept.items())
    run_prepared(_prepare(data, ref, shard_size=10, batch_size=1))
    a, b = _read(out), _read(ref)
    assert a["paths"] == b["paths"] and len(set(a["paths"])) == 90
    np.testing.assert_allclose(a["emb"], b["emb"], atol=1e-5)


@pytest.mark.slow
def test_ray_task_killed_mid_shard_is_retried(tmp_path):
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    data = make_image_folder(tmp_path / "data", n_per_class=30, size=(160, 160))
    out, ref = tmp_path / "c.h5", tmp_path / "ref.h5"
    cmd = [sys.executable, str(_driver(tmp_path)), str(data), str(out), "ray", "2", "10", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    killed = _kill_mid_shard(proc, parts_dir(out), lambda c: c.startswith("ray::run_job"))
    _, err = proc.communicate(timeout=300)
    assert killed is not None
    assert proc.returncode == 0, err[-3000:]  # Ray retried the task; it resumed its own .partial
    run_prepared(_prepare(data, ref, shard_size=10, batch_size=1))
    a, b = _read(out), _read(ref)
    assert a["paths"] == b["paths"] and len(set(a["paths"])) == 90
    np.testing.assert_allclose(a["emb"], b["emb"], atol=1e-5)


_STOP_ON_RAY = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import featbank

    if __name__ == "__main__":
        data, out = Path(sys.argv[1]), Path(sys.argv[2])
        opts = dict(backbone="test_sleep", weights="0.2", engine="torch", launcher="ray", shard_size=50, batch_size=5,
                    num_workers=0, progress=False)

        def stop(done, total):
            raise KeyboardInterrupt

        try:
            featbank.extract(data, out, on_progress=stop, **opts)
        except featbank.errors.Interrupted:
            pass
        parts = Path(str(out) + ".parts")
        state = lambda: {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
        before = state()
        time.sleep(4)  # a task still running would write (its .partial, a finished part) meanwhile
        print(json.dumps({"unchanged": state() == before, "files": len(before)}), flush=True)
        report = featbank.extract(data, out, **opts)
        print(json.dumps({"rows": report.n_images, "kept": report.n_reused + report.n_resumed}), flush=True)
    """
)


@pytest.mark.slow
def test_stopping_a_ray_run_from_on_progress_cancels_its_tasks(tmp_path):
    """The API's way to stop a run (on_progress raises KeyboardInterrupt) cancels the Ray tasks in flight:
    nothing writes behind the caller that caught it, and the rerun keeps what was finished."""
    pytest.importorskip("ray")
    data = make_image_folder(tmp_path / "data", n_per_class=100, size=(8, 8))
    driver = tmp_path / "stop.py"
    driver.write_text(_STOP_ON_RAY)
    res = subprocess.run([sys.executable, str(driver), str(data), str(tmp_path / "c.h5")], capture_output=True,
                         text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    stopped, rerun = (json.loads(line) for line in res.stdout.splitlines()[-2:])
    assert stopped["unchanged"] and stopped["files"] >= 1, stopped
    assert rerun["rows"] == 300 and rerun["kept"] >= 50, rerun


def test_a_v1_cache_migrates_in_place_and_the_next_run_has_nothing_to_do(image_folder, tiny_cache):
    from featbank.extraction.units import migrate_v1

    to_v1(tiny_cache)
    with h5py.File(tiny_cache, "r") as f:
        v1 = {k: f[k][...] for k in ("embeddings", "labels", "splits", "paths", "fingerprints")}
    parts = migrate_v1(tiny_cache, shard_size=5)
    assert len(parts) == 5
    got = _read(tiny_cache)
    np.testing.assert_array_equal(got["emb"], v1["embeddings"])
    assert got["paths"] == [p.decode() for p in v1["paths"]]
    np.testing.assert_array_equal(got["labels"], v1["labels"])
    with h5py.File(tiny_cache, "r") as f:
        assert f.attrs["schema_version"] == 2 and f.attrs["backbone"] == "test_tiny"
    prep = _prepare(image_folder, tiny_cache)
    assert prep.jobs == []  # same rows, same key: every migrated part is reused as is
    with pytest.raises(CacheError, match="schema version 2"):
        migrate_v1(tiny_cache)
