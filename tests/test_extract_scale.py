"""`featbank extract` at scale through the real CLI: --procs, torchrun, Ray, manifest and WebDataset
inputs, and schema-v2 caches read by open_cache, fit and cache verify (real processes, real files)."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from _v1cache import make_v1_cache
from PIL import Image

import featbank
from featbank.cache._parts import parts_dir
from featbank.errors import CacheError, ConfigError

from conftest import make_image_folder

TINY = ["--backbone", "test_tiny", "--engine", "torch", "--num-workers", "0", "-q"]


def _cli(*args: str, cwd: Path | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [*(prefix or (sys.executable,)), "-m", "featbank.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "local"}  # a private Ray cluster
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


def _reference(data: Path, tmp_path: Path) -> featbank.cache.FeatureCache:
    out = tmp_path / "ref.h5"
    featbank.extract(data, out, backbone="test_tiny", engine="torch", num_workers=0, progress=False)
    return featbank.open_cache(out)


def _assert_equal(got: Path, ref: featbank.cache.FeatureCache) -> None:
    with featbank.open_cache(got) as c:
        assert c.metadata["schema_version"] == 2
        assert c.paths == ref.paths
        np.testing.assert_array_equal(c.labels, ref.labels)
        np.testing.assert_array_equal(c.fingerprints, ref.fingerprints)
        assert c.classes == ref.classes
        np.testing.assert_allclose(c.embeddings[...], ref.embeddings[...], atol=1e-5)


@pytest.mark.slow
def test_cli_procs_2_equals_a_single_process_run(image_folder, tmp_path):
    out = tmp_path / "two.h5"
    r = _cli("extract", str(image_folder), "--out", str(out), "--procs", "2", "--shard-size", "5", *TINY[:-3])
    assert r.returncode == 0, r.stderr
    assert "24 rows; 24 embedded" in r.stdout
    assert len(list(parts_dir(out).glob("part-*.h5"))) == 5
    _assert_equal(out, _reference(image_folder, tmp_path))
    # A plain rerun (no scale option) keeps the v2 cache and finds it up to date.
    r = _cli("extract", str(image_folder), "--out", str(out), *TINY)
    assert r.returncode == 0 and "up to date" in r.stdout, r.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_through_the_cli_equal_one_process(image_folder, tmp_path):
    out = tmp_path / "tr.h5"
    r = _cli("extract", str(image_folder), "--out", str(out), "--shard-size", "5", *TINY,
             prefix=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_equal(out, _reference(image_folder, tmp_path))


@pytest.mark.slow
def test_ray_launcher_through_the_cli_equals_one_process(image_folder, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray.h5"
    r = _cli("extract", str(image_folder), "--out", str(out), "--shard-size", "8", "--launcher", "ray", "--procs", "2",
             *TINY[:-3], "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_equal(out, _reference(image_folder, tmp_path))


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 24, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_manifest_csv_through_the_cli(tmp_path):
    data = make_image_folder(tmp_path / "imgs", classes=("cat", "dog"), n_per_class=4)
    rows = sorted(p.relative_to(tmp_path).as_posix() for p in data.rglob("*.*"))
    with open(tmp_path / "list.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "kind"])
        w.writerows([(p, p.split("/")[1]) for p in rows] + [("imgs/missing.png", "cat")])
    out = tmp_path / "m.h5"
    r = _cli("extract", str(tmp_path / "list.csv"), "--out", str(out), "--path-column", "file",
             "--label-column", "kind", *TINY)
    assert r.returncode == 0, r.stderr
    with featbank.open_cache(out) as c:
        assert c.paths == rows and c.classes == ["cat", "dog"]
        assert [p for p, _ in c.skipped] == ["imgs/missing.png"]
        assert np.isfinite(c.embeddings[...]).all()
    r = _cli("extract", str(tmp_path / "list.csv"), "--out", str(tmp_path / "n.h5"), *TINY)
    assert r.returncode == 2 and "path" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_webdataset_through_the_cli(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for t in range(2):
        with tarfile.open(shards / f"{t:06d}.tar", "w") as tf:
            for i in range(4):
                for ext, payload in (("png", _png(40 * i + 100 * t)), ("cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    out = tmp_path / "w.h5"
    r = _cli("extract", str(shards / "{000000..000001}.tar"), "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    with featbank.open_cache(out) as c:
        assert c.n_samples == 8 and c.paths[0] == "000000.tar/s000"
        assert sorted(set(c.labels.tolist())) == [0, 1]
    assert len(list(parts_dir(out).glob("part-*.h5"))) == 2  # one shard per tar


@pytest.fixture
def v2_cache(image_folder, tmp_path) -> Path:
    out = tmp_path / "v2.h5"
    featbank.extract(image_folder, out, backbone="test_tiny", engine="torch", num_workers=0, progress=False,
                     shard_size=10)
    return out


def test_open_cache_on_v2_reads_what_was_embedded_and_refuses_a_missing_part(v2_cache, image_folder, tmp_path):
    ref = _reference(image_folder, tmp_path)
    _assert_equal(v2_cache, ref)
    victim = sorted(parts_dir(v2_cache).glob("part-*.h5"))[1]
    victim.unlink()
    with pytest.raises(CacheError, match=victim.name):
        featbank.open_cache(v2_cache)


def test_fit_and_verify_name_a_deleted_part_exit_2(v2_cache, tmp_path):
    victim = sorted(parts_dir(v2_cache).glob("part-*.h5"))[0]
    victim.unlink()
    for args in (["cache", "verify", str(v2_cache)], ["fit", str(v2_cache), "--out", str(tmp_path / "m")]):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert victim.name in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()


def test_truncated_part_is_refused_by_open_cache(v2_cache):
    victim = sorted(parts_dir(v2_cache).glob("part-*.h5"))[-1]
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    with pytest.raises(CacheError, match=victim.name):
        featbank.open_cache(v2_cache)


def test_v1_cache_is_migrated_by_the_next_extract(image_folder, tmp_path):
    ref = _reference(image_folder, tmp_path)
    keep = make_v1_cache(image_folder, tmp_path / "keep.h5", backbone="test_tiny", engine="torch", num_workers=0,
                         progress=False)
    with h5py.File(keep, "r") as f:
        assert int(f.attrs["schema_version"]) == 1 and not f["embeddings"].is_virtual
    # A plain extract of the folder migrates it (schema v2, same rows), embedding nothing.
    report = featbank.extract(image_folder, keep, backbone="test_tiny", engine="torch", num_workers=0, progress=False,
                              shard_size=10)
    assert report.n_embedded == 0 and not report.model_loaded and report.n_reused == 24
    _assert_equal(keep, ref)
    assert len(list(parts_dir(keep).glob("part-*.h5"))) == 3


def test_v1_cache_of_other_settings_is_refused_not_migrated(image_folder, tmp_path):
    v1 = make_v1_cache(image_folder, tmp_path / "ref.h5", backbone="test_tiny", engine="torch", num_workers=0,
                       progress=False)
    before = v1.read_bytes()
    with pytest.raises(featbank.errors.CacheKeyMismatch, match="(?s)dtype: cache has 'float32'.*left untouched"):
        featbank.extract(image_folder, v1, backbone="test_tiny", engine="torch", num_workers=0, progress=False,
                         shard_size=10, dtype="float16")
    assert v1.read_bytes() == before and not parts_dir(v1).exists()


def test_num_workers_with_local_procs_is_refused(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="--num-workers must be 0"):
        featbank.extract(image_folder, tmp_path / "x.h5", backbone="test_tiny", engine="torch", num_workers=2,
                         procs=2, progress=False)


def _tamper(index: Path, fn) -> None:
    with h5py.File(index, "a") as f:
        fn(f)


@pytest.mark.parametrize("attack", ["no_table", "short_sizes", "row_count_lie", "foreign_mapping", "bad_listing"])
def test_hostile_v2_index_is_refused_with_a_message(v2_cache, tmp_path, attack):
    def no_table(f):
        del f["parts"]

    def short_sizes(f):
        del f["parts/sizes"]
        f["parts"].create_dataset("sizes", data=np.arange(1))

    def row_count_lie(f):
        n = f["parts/n_rows"][...]
        n[0] += 1
        f["parts/n_rows"][...] = n

    def foreign_mapping(f):  # rows mapped onto a file the table does not list
        other = tmp_path / "other.h5"
        with h5py.File(other, "w") as g:
            g["embeddings"] = np.ones((24, 16), np.float32)
        shape = f["embeddings"].shape
        layout = h5py.VirtualLayout(shape=shape, dtype="f4")
        layout[:] = h5py.VirtualSource(str(other), "embeddings", shape=shape)
        del f["embeddings"]
        f.create_virtual_dataset("embeddings", layout)

    def bad_listing(f):
        f.attrs["listing_skipped"] = "[1, 2]"

    _tamper(v2_cache, locals()[attack])
    with pytest.raises(CacheError, match="damaged"):
        featbank.open_cache(v2_cache)


def test_renamed_index_is_refused_and_a_moved_folder_reads(v2_cache, tmp_path):
    renamed = tmp_path / "renamed.h5"
    shutil.copy(v2_cache, renamed)
    shutil.copytree(parts_dir(v2_cache), parts_dir(renamed))
    with pytest.raises(CacheError, match="renamed"):
        featbank.open_cache(renamed)
    moved = tmp_path / "elsewhere" / v2_cache.name
    moved.parent.mkdir()
    shutil.copy(v2_cache, moved)
    shutil.copytree(parts_dir(v2_cache), parts_dir(moved))
    with featbank.open_cache(moved) as a, featbank.open_cache(v2_cache) as b:
        np.testing.assert_array_equal(a.embeddings[...], b.embeddings[...])


@pytest.mark.slow
def test_fit_streams_from_a_v2_cache_like_from_v1(v2_cache, image_folder, tmp_path):
    """fit --max-memory below the data size streams the v2 cache through iter_chunks; same head as v1."""
    _reference(image_folder, tmp_path)
    scores = []
    for cache in (v2_cache, tmp_path / "ref.h5"):
        r = _cli("fit", str(cache), "--head", "linear", "--max-memory", "1KB", "--out", str(tmp_path / cache.stem),
                 "--seed", "0")
        assert r.returncode == 0, r.stderr[-2000:]
        assert "(streamed)" in r.stdout
        lines = [line for line in r.stdout.splitlines() if "top-1" in line or "chosen" in line]
        scores.append([re.sub(r"; [0-9.]+ s$", "", line.replace(cache.name, "CACHE")) for line in lines])
    assert len(scores[0]) == 2 and scores[0] == scores[1]


def test_hdf5_vds_prefix_is_refused_not_followed(v2_cache, monkeypatch, tmp_path):
    """HDF5 resolves a virtual dataset's relative source names against HDF5_VDS_PREFIX first: a copy of the
    parts folder there (changed) would be read instead of the cache's own parts."""
    import shutil as _shutil

    _shutil.copytree(parts_dir(v2_cache), tmp_path / "elsewhere" / parts_dir(v2_cache).name)
    monkeypatch.setenv("HDF5_VDS_PREFIX", str(tmp_path / "elsewhere"))
    with pytest.raises(CacheError, match="HDF5_VDS_PREFIX is set.*Unset it"):
        featbank.open_cache(v2_cache)
    monkeypatch.delenv("HDF5_VDS_PREFIX")
    featbank.open_cache(v2_cache).close()
