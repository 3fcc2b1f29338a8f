"""featbank cache info|verify|export on real v1 and v2 caches, through click and one real subprocess."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
from _v1cache import to_v1
from click.testing import CliRunner
from test_parts import _cache

from featbank.cache._index import read_parts_table
from featbank.cache._parts import parts_dir
from featbank.cache._tools import describe_cache, export_cache
from featbank.cli.main import cli
from featbank.errors import ConfigError

pq = pytest.importorskip("pyarrow.parquet")


def _run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_info_prints_rows_classes_key_parts(tmp_path):
    index, paths, emb, _ = _cache(tmp_path, skipped_in=2)
    res = _run("cache", "info", index)
    assert res.exit_code == 0, res.output
    assert "14 x 8 (float32)" in res.output and "3 part(s)" in res.output and "k" * 64 in res.output
    assert "a (8), b (6)" in res.output and "skipped    1" in res.output and "train (14)" in res.output


def test_info_and_verify_on_a_v1_cache(tiny_cache):
    to_v1(tiny_cache)  # extract writes v2; a v1 file of the same rows
    res = _run("cache", "info", tiny_cache)
    assert res.exit_code == 0 and "schema     v1" in res.output and "cat (8)" in res.output
    res = _run("cache", "verify", tiny_cache)
    assert res.exit_code == 0 and "ok: 24 rows" in res.output


def test_info_on_what_extract_writes(tiny_cache):
    res = _run("cache", "info", tiny_cache)
    assert res.exit_code == 0 and "schema     v2" in res.output and "cat (8)" in res.output, res.output
    assert _run("cache", "verify", tiny_cache).exit_code == 0


def test_verify_names_a_damaged_part_and_exits_2(tmp_path):
    index, *_ = _cache(tmp_path)
    assert _run("cache", "verify", index).exit_code == 0
    victim = parts_dir(index) / read_parts_table(index)[1].name
    with open(victim, "r+b") as fh:
        fh.seek(-9, 2)
        fh.write(b"corrupted")
    res = _run("cache", "verify", index)
    assert res.exit_code == 2 and victim.name in res.output and "featbank extract" in res.output
    assert describe_cache(index).problems  # info shows it too, without failing
    assert _run("cache", "info", tmp_path / "none.h5").exit_code == 2


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_export_one_shard_per_part(tmp_path, fmt):
    index, paths, emb, _ = _cache(tmp_path)
    out = tmp_path / "vectors"
    res = _run("cache", "export", index, "--format", fmt, "--out", out)
    assert res.exit_code == 0, res.output
    if fmt == "npy":
        got = np.concatenate([np.load(out / f"embeddings-{i:05d}.npy") for i in range(3)])
        meta = [pq.read_table(out / f"metadata-{i:05d}.parquet").to_pydict() for i in range(3)]
        assert np.load(out / "embeddings-00001.npy").shape == (7, 8)
    else:
        meta = [pq.read_table(out / f"embeddings-{i:05d}.parquet").to_pydict() for i in range(3)]
        got = np.array([e for m in meta for e in m["embedding"]], np.float32)
    np.testing.assert_array_equal(got, emb)
    assert [p for m in meta for p in m["path"]] == paths
    assert meta[0]["label"][:2] == ["a", "b"] and meta[0]["split"][0] == "train"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_export_refuses_a_missing_part_and_bad_options(tmp_path, tiny_cache):
    index, *_ = _cache(tmp_path)
    (parts_dir(index) / read_parts_table(index)[0].name).unlink()
    res = _run("cache", "export", index, "--out", tmp_path / "v")
    assert res.exit_code == 2 and "missing" in res.output
    with pytest.raises(ConfigError, match="format"):
        export_cache(tiny_cache, tmp_path / "v", format="csv")
    files = export_cache(tiny_cache, tmp_path / "v1", rows_per_file=10)
    assert len(files) == 6 and np.load(files[4]).shape[0] == 4
    with h5py.File(tiny_cache, "r") as f:
        np.testing.assert_array_equal(np.concatenate([np.load(p) for p in files[::2]]), f["embeddings"][...])


def test_cache_command_in_a_real_process(tmp_path):
    index, *_ = _cache(tmp_path)
    res = subprocess.run([sys.executable, "-m", "featbank.cli.main", "cache", "verify", str(index)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok: 15 rows in 3 intact part(s)" in res.stdout
