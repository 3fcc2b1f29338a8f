"""The HDF5 cache reader, its key, and its refusals, on real files written by featbank.extract."""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import featbank
from featbank.cache import (
    compute_cache_key,
    find_latest_cache,
    open_cache,
)
from featbank.errors import CacheError

TINY = dict(backbone="test_tiny", engine="torch", num_workers=0, progress=False)


def test_reader_api(tiny_cache: Path) -> None:
    with open_cache(tiny_cache) as c:
        assert len(c) == c.n_samples == 24 and c.n_classes == 3 and c.embed_dim == 32
        assert c.labels.dtype == np.int64 and c.splits.dtype == np.int8
        assert c.split_names == ("train", "val", "test") and not c.has_split("val")
        full = c.load_embeddings()
        assert full.dtype == np.float32 and full.shape == (24, 32)
        mask = c.labels == 1
        np.testing.assert_array_equal(c.load_embeddings(mask), full[mask])
        rows = [7, 3, 7, 0]
        np.testing.assert_array_equal(c.load_embeddings(rows), full[rows])
        assert c.load_embeddings([]).shape == (0, 32)
        got = np.concatenate([e for _, e in c.iter_chunks(np.array([9, 2, 5]), 2)])
        np.testing.assert_array_equal(got, full[[2, 5, 9]])
        for picked in ([0, 1, 2, 3], [0, 1, 1, 3], [4, 5, 5, 6, 7]):  # contiguous read vs repeated rows
            got = np.concatenate([e for _, e in c.iter_chunks(np.array(picked), 8)])
            np.testing.assert_array_equal(got, full[picked])
        for bad in ([-1, 3], [3, 24]):  # out of range: a clear IndexError, never a read at a negative offset
            with pytest.raises(IndexError, match=r"row indices must lie in \[0, 24\)"):
                next(c.iter_chunks(np.array(bad), 8))
        assert c.abspath(c.paths[0]).is_file()
        with pytest.raises(ValueError, match="Unknown split"):
            c.split_mask("holdout")
        assert "test_tiny" in repr(c)


def test_find_latest_cache(image_folder: Path, tmp_path: Path, _isolated_cache_dir: Path) -> None:
    with pytest.raises(CacheError, match="featbank extract"):
        find_latest_cache()
    with pytest.raises(CacheError, match="featbank extract"):
        open_cache()
    a = featbank.extract(image_folder, **TINY).path
    featbank.extract(image_folder, **{**TINY, "dtype": "float16"}).path
    os.utime(a, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert find_latest_cache() == a
    with open_cache() as c:
        assert c.path == a


def test_refusals(tmp_path: Path, tiny_cache: Path) -> None:
    with pytest.raises(CacheError, match="does not exist"):
        open_cache(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\0" * 100)
    with pytest.raises(CacheError, match="not a featbank cache.*not an HDF5") as e:
        open_cache(junk)
    assert "--overwrite" not in str(e.value)  # never advise overwriting a file that is not a cache
    cut = tmp_path / "cut.h5"
    cut.write_bytes(tiny_cache.read_bytes()[:600])  # an HDF5 cache cut short: a damaged cache
    with pytest.raises(CacheError, match="not a readable HDF5.*--overwrite"):
        open_cache(cut)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CacheError, match="not a featbank cache"):
        open_cache(other)
    with h5py.File(tiny_cache, "r+") as f:
        f.attrs["schema_version"] = 3  # a future schema (1 is one file, 2 an index over parts)
    with pytest.raises(CacheError, match="schema version 3; this featbank .* reads versions 1 and 2. Upgrade"):
        open_cache(tiny_cache)


def test_cache_key_covers_everything_that_changes_an_embedding(tiny_cache: Path) -> None:
    ident = {"backbone": "b", "weights": "w", "weights_sha256": "0" * 64,
             "transform": {"input_size": [32, 32], "resize_size": 36}, "embed_dim": 32}
    base = compute_cache_key(ident, "float32", "float32")
    assert base == compute_cache_key(dict(ident), "float32", "float32")
    variants = [
        ({**ident, "backbone": "c"}, "float32", "float32"),
        ({**ident, "weights": "v"}, "float32", "float32"),
        ({**ident, "weights_sha256": "1" * 64}, "float32", "float32"),
        ({**ident, "transform": {"input_size": [32, 32], "resize_size": 40}}, "float32", "float32"),
        (ident, "float16", "float32"),
        (ident, "float32", "bfloat16"),
    ]
    assert len({base} | {compute_cache_key(*v) for v in variants}) == len(variants) + 1
    with open_cache(tiny_cache) as c:
        assert len(c.cache_key) == 64


def test_corrupt_staging_file_counts_as_empty(image_folder: Path, tmp_path: Path) -> None:
    """The unfinished part of a killed run, garbled (a crash mid-write): counted as empty, never fatal."""
    import featbank
    from featbank.cache._parts import PartWriter, parts_dir
    from featbank.errors import Interrupted

    out = tmp_path / "c.h5"
    args = dict(backbone="test_tiny", engine="torch", num_workers=0, progress=False, batch_size=4)

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        featbank.extract(image_folder, out, **args, on_progress=stop)
    (partial,) = parts_dir(out).glob(".part-*.partial")
    partial.write_bytes(b"garbage from a crash")
    shard_id, digest = int(partial.name.split("-")[1]), partial.name.split("-")[2][:12]
    assert PartWriter.open_if_valid(parts_dir(out), shard_id, "k", digest + "0" * 52) is None and not partial.exists()
    partial.write_bytes(b"garbage from a crash")
    report = featbank.extract(image_folder, out, **args)
    assert report.n_embedded == 24 and report.n_resumed == 0 and not partial.exists()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]
