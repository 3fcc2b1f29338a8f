"""Schema v2: part files and the index of virtual datasets over them (real HDF5 files, no mocks)."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from featbank.cache._index import PlannedPart, check_parts, finalize_index, read_parts_table, verify_cache
from featbank.cache._parts import PartRows, PartWriter, parts_dir, rows_digest, write_part
from featbank.errors import CacheError

CLASSES = ["a", "b"]
KEY = "k" * 64


def _rows(prefix: str, n: int, start: int = 0) -> PartRows:
    paths = [f"{prefix}/{i:05d}.png" for i in range(start, start + n)]
    fps = np.stack([np.arange(n) + 100, np.arange(n) + 10**9], 1).astype(np.int64)
    return PartRows(paths, fps, np.arange(n, dtype=np.int64) % 2, np.zeros(n, np.int8))


def _cache(tmp_path, sizes=(5, 7, 3), dim=8, skipped_in=None):
    """Three parts written through the real writer and a published index; returns (index, all rows, all emb)."""
    index = tmp_path / "c" / "cache.h5"
    folder = parts_dir(index)
    rng = np.random.default_rng(0)
    planned, embs, paths = [], [], []
    for sid, n in enumerate(sizes):
        rows = _rows(f"s{sid}", n)
        emb = rng.standard_normal((n, dim)).astype(np.float32)
        digest = rows_digest(rows, CLASSES)
        bad = []
        if skipped_in == sid:
            keep = np.arange(1, n)
            bad = [(rows.paths[0], "truncated or corrupt: test", (1, 2))]
            write_part(folder, sid, KEY, rows.take(keep), emb[keep], CLASSES, bad, digest=digest)
            emb, rows = emb[keep], rows.take(keep)
        else:
            write_part(folder, sid, KEY, rows, emb, CLASSES, digest=digest)
        planned.append(PlannedPart(sid, n, digest))
        embs.append(emb)
        paths += rows.paths
    finalize_index(index, planned, KEY, CLASSES, {"backbone": "test_tiny"})
    return index, paths, np.concatenate(embs), planned


def test_index_reads_like_one_file_with_plain_h5py(tmp_path):
    index, paths, emb, _ = _cache(tmp_path)
    with h5py.File(index, "r") as f:
        assert f["embeddings"].is_virtual
        np.testing.assert_array_equal(f["embeddings"][...], emb)
        assert [p.decode() for p in f["paths"][...]] == paths
        assert f["labels"].shape == (15,) and f["fingerprints"].shape == (15, 2)
        assert f.attrs["schema_version"] == 2 and f.attrs["cache_key"] == KEY
        assert [c.decode() for c in f["classes"][...]] == CLASSES
        assert f["skipped/paths"].shape == (0,)
    assert [p.n_rows for p in read_parts_table(index)] == [5, 7, 3]
    assert check_parts(index, full=True) == []


def test_index_folder_can_move_and_cwd_does_not_matter(tmp_path, monkeypatch):
    index, paths, emb, _ = _cache(tmp_path)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(index.parent), str(moved))
    # A decoy with the same relative name in the working directory must not be read instead.
    decoy = tmp_path / "cwd" / "cache.h5.parts"
    shutil.copytree(moved / "cache.h5.parts", decoy)
    for p in decoy.iterdir():
        with h5py.File(p, "r+") as f:
            f["embeddings"][...] = 99.0
    monkeypatch.chdir(tmp_path / "cwd")
    with h5py.File(moved / "cache.h5", "r") as f:
        np.testing.assert_array_equal(f["embeddings"][...], emb)


def test_missing_part_hdf5_fills_silently_and_featbank_refuses(tmp_path):
    index, _, emb, _ = _cache(tmp_path)
    victim = read_parts_table(index)[1].name
    (parts_dir(index) / victim).unlink()
    with h5py.File(index, "r") as f:
        got = f["embeddings"][...]  # the hazard: no error, zeros in place of 7 rows
    assert np.all(got[5:12] == 0) and np.array_equal(got[:5], emb[:5])
    problems = check_parts(index)
    assert len(problems) == 1 and victim in problems[0] and "missing" in problems[0]
    with pytest.raises(CacheError, match=victim) as e:
        verify_cache(index, full=False)
    assert "featbank extract" in str(e.value)


def test_truncated_and_changed_parts_are_named(tmp_path):
    index, _, _, _ = _cache(tmp_path)
    table = read_parts_table(index)
    p0, p2 = parts_dir(index) / table[0].name, parts_dir(index) / table[2].name
    with open(p0, "r+b") as fh:
        fh.truncate(p0.stat().st_size - 100)
    # Same size, one byte flipped, mtime put back: the fast check trusts stat, the full hash does not.
    st = p2.stat()
    data = bytearray(p2.read_bytes())
    data[-1] ^= 0xFF
    p2.write_bytes(bytes(data))
    os.utime(p2, ns=(st.st_atime_ns, st.st_mtime_ns))
    fast = check_parts(index)
    assert len(fast) == 1 and table[0].name in fast[0] and "truncated" in fast[0]
    full = check_parts(index, full=True)
    assert len(full) == 2 and table[2].name in full[1] and "sha256" in full[1]
    # Without restoring the mtime, the fast check hashes the part and catches the change.
    p2.write_bytes(bytes(data))
    assert any(table[2].name in p for p in check_parts(index))


def test_skipped_rows_are_indexed(tmp_path):
    index, paths, emb, _ = _cache(tmp_path, skipped_in=1)
    with h5py.File(index, "r") as f:
        assert f["embeddings"].shape == (14, 8)
        np.testing.assert_array_equal(f["embeddings"][...], emb)
        assert [p.decode() for p in f["skipped/paths"][...]] == ["s1/00000.png"]
        assert f["skipped/reasons"][0].decode().startswith("truncated")
        assert f["skipped/fingerprints"][...].tolist() == [[1, 2]]


def _finalize(index, planned, **kw):
    return finalize_index(index, planned, kw.pop("key", KEY), CLASSES, {}, **kw)


def test_finalize_refuses_missing_shard_other_key_other_count_other_rows(tmp_path):
    index, _, _, planned = _cache(tmp_path)
    before = index.read_bytes()
    with pytest.raises(CacheError, match="shard 9: no part"):
        _finalize(index, [*planned, PlannedPart(9, 4, "0" * 64)])
    with pytest.raises(CacheError, match="cache key"):
        _finalize(index, planned, key="x" * 64)
    with pytest.raises(CacheError, match="the plan has 6"):
        _finalize(index, [PlannedPart(0, 6, planned[0].rows_digest), *planned[1:]])
    assert index.read_bytes() == before  # nothing published by a refusal


def test_finalize_checks_paths_against_plan_and_uniqueness(tmp_path):
    index, _, _, planned = _cache(tmp_path)
    want = {0: [f"s0/{i:05d}.png" for i in range(5)], 1: [f"s1/{i:05d}.png" for i in range(7)],
            2: [f"s2/{i:05d}.png" for i in range(3)]}
    _finalize(index, planned, planned_paths=want)
    with pytest.raises(CacheError, match="other paths"):
        _finalize(index, planned, planned_paths={**want, 2: ["s2/x.png"] * 3})
    # A second part holding rows of shard 0 (same digest, other id) is a duplicate.
    folder = parts_dir(index)
    rows = _rows("s0", 5)
    write_part(folder, 7, KEY, rows, np.zeros((5, 8), np.float32), CLASSES)
    with pytest.raises(CacheError, match="also in another part"):
        _finalize(index, [*planned, PlannedPart(7, 5, rows_digest(rows, CLASSES))], planned_paths=want)


def test_part_writer_resumes_and_compacts_skipped_rows(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    rows = _rows("x", 6)
    w = PartWriter.create(folder, 3, KEY, rows, CLASSES, 4, "float32")
    w.write_rows(np.array([0, 1, 2]), np.ones((3, 4), np.float32))
    w.close()  # as if the worker died here
    w = PartWriter.open_if_valid(folder, 3, KEY, rows_digest(rows, CLASSES))
    assert w is not None and w.done_mask().tolist() == [True] * 3 + [False] * 3
    with pytest.raises(CacheError, match="neither embedded"):
        w.finish({})
    w.write_rows(np.array([3, 5]), np.full((2, 4), 2, np.float32))
    info = w.finish({4: "not an image"})
    assert (info.n_rows, info.n_skipped, info.shard_id) == (5, 1, 3)
    assert not any(p.name.endswith(".partial") for p in folder.iterdir())
    with h5py.File(folder / info.name, "r") as f:
        assert "status" not in f
        assert [p.decode() for p in f["paths"][...]] == [rows.paths[i] for i in (0, 1, 2, 3, 5)]
        np.testing.assert_array_equal(f["embeddings"][3:], np.full((2, 4), 2, np.float32))
    # Another key or other rows: the partial is discarded, not reused.
    w = PartWriter.create(folder, 4, KEY, rows, CLASSES, 4, "float32")
    w.close()
    assert PartWriter.open_if_valid(folder, 4, "z" * 64, w.digest) is None
    assert not PartWriter.partial_path(folder, 4, w.digest).exists()


def test_read_rows_from_parts_equals_the_virtual_dataset(tmp_path):
    from featbank.cache._index import read_rows

    index, _, emb, _ = _cache(tmp_path)
    np.testing.assert_array_equal(read_rows(index), emb)
    np.testing.assert_array_equal(read_rows(index, 3, 13), emb[3:13])
    assert read_rows(index, 0, 0).shape == (0, 8)
    assert read_rows(index, name="labels").tolist() == [0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0]


def test_parts_array_slices_like_the_virtual_dataset(tmp_path):
    from featbank.cache._index import PartsArray

    index, paths, emb, _ = _cache(tmp_path, sizes=(5, 0, 7, 3))
    arr = PartsArray(index)
    assert arr.shape == (15, 8) and arr.dtype == np.float32 and len(arr) == 15 and arr.ndim == 2
    with h5py.File(index, "r") as f:
        vds = f["embeddings"]
        for sel in (slice(0, 15), slice(4, 6), slice(5, 12), slice(11, 15), slice(3, 3), 0, 14, -1, np.array([0, 4, 5, 13])):
            np.testing.assert_array_equal(arr[sel], vds[sel])
    out = np.zeros((20, 8), np.float32)
    arr.read_direct(out, np.s_[2:14], np.s_[5:17])
    np.testing.assert_array_equal(out[5:17], emb[2:14])
    np.testing.assert_array_equal(arr[...], emb)
    assert [p.decode() for p in PartsArray(index, "paths")[...]] == paths
    with pytest.raises(IndexError):
        arr[np.array([3, 1])]
    with pytest.raises(IndexError):
        arr[15]
    arr.close()


def test_parts_array_over_the_index_only_when_it_maps_the_table_in_order(tmp_path):
    from featbank.cache._index import PartsArray

    index, _, emb, _ = _cache(tmp_path, sizes=(5, 0, 7, 3))
    with h5py.File(index, "r") as f:
        arr = PartsArray.over(index, f["embeddings"])
        assert arr is not None
        np.testing.assert_array_equal(arr[...], emb)
        np.testing.assert_array_equal(arr[6:9], emb[6:9])  # part of one part: a hyperslab read
        arr.close()
    with h5py.File(index, "r+") as f:  # a real dataset, or mappings in another order: not taken over
        data = f["embeddings"][...]
        del f["embeddings"]
        f["embeddings"] = data
    with h5py.File(index, "r") as f:
        assert PartsArray.over(index, f["embeddings"]) is None
