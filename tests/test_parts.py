"""Schema v2: part files and the index of virtual datasets over them (real HDF5 files, no mocks)."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from featbank.cache._index import IndexContents, PlannedPart, check_parts, finalize_index, read_parts_table, verify_cache
from featbank.cache._parts import PartRows, PartWriter, ShardRows, parts_dir, rows_digest, write_part
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
            write_part(folder, ShardRows(sid, KEY, rows.take(keep), CLASSES), emb[keep], bad, digest=digest)
            emb, rows = emb[keep], rows.take(keep)
        else:
            write_part(folder, ShardRows(sid, KEY, rows, CLASSES), emb, digest=digest)
        planned.append(PlannedPart(sid, n, digest))
        embs.append(emb)
        paths += rows.paths
    finalize_index(index, planned, KEY, IndexContents(CLASSES, {"backbone": "test_tiny"}))
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
    return finalize_index(index, planned, kw.pop("key", KEY), IndexContents(CLASSES, {}), **kw)


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
    write_part(folder, ShardRows(7, KEY, rows, CLASSES), np.zeros((5, 8), np.float32))
    with pytest.raises(CacheError, match="also in another part"):
        _finalize(index, [*planned, PlannedPart(7, 5, rows_digest(rows, CLASSES))], planned_paths=want)


def test_part_writer_resumes_and_compacts_skipped_rows(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    rows = _rows("x", 6)
    w = PartWriter.create(folder, ShardRows(3, KEY, rows, CLASSES), 4, "float32")
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
    w = PartWriter.create(folder, ShardRows(4, KEY, rows, CLASSES), 4, "float32")
    w.close()
    assert PartWriter.open_if_valid(folder, 4, "z" * 64, w.digest) is None
    assert not PartWriter.partial_path(folder, 4, w.digest).exists()


# --- featbank's read path (featbank.cache._direct.RowReader): straight from the part files ---------------


def _vds(index, name="embeddings"):
    with h5py.File(index, "r") as f:
        return f[name][...]


def test_reads_straight_from_the_parts_equal_the_virtual_dataset(tmp_path):
    from featbank.cache import open_cache

    index, _, emb, _ = _cache(tmp_path, sizes=(5, 0, 7, 3))
    np.testing.assert_array_equal(_vds(index), emb)
    with open_cache(index) as c:
        reader = c._reader("embeddings")
        assert reader.direct  # the index maps the table's parts in order: no HDF5 on the way
        for block_rows in (reader.block_rows, 4, 1):  # blocks spanning parts, the empty part, one row each
            reader.block_rows = block_rows
            np.testing.assert_array_equal(c.load_embeddings(), emb)
            np.testing.assert_array_equal(c.load_embeddings(np.arange(3, 13)), emb[3:13])  # a range over 3 parts
            rows = np.array([14, 0, 6, 5, 6, 11])  # unsorted, repeated
            np.testing.assert_array_equal(c.load_embeddings(rows), emb[rows])
            mask = np.arange(15) % 3 != 1
            np.testing.assert_array_equal(c.load_embeddings(mask), emb[mask])
            np.testing.assert_array_equal(c.load_embeddings(dtype=np.float64), emb.astype(np.float64))
            got = [(i.tolist(), x) for i, x in c.iter_chunks(np.arange(15)[::-1], 4)]
            assert [i for i, _ in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14]]
            np.testing.assert_array_equal(np.concatenate([x for _, x in got]), emb)
        assert c.load_embeddings([]).shape == (0, 8)
        with pytest.raises(IndexError):
            c.load_embeddings([3, 15])
        with pytest.raises(IndexError):
            c.load_embeddings(np.array([1.5]))


def test_part_deleted_or_truncated_after_open_is_named_not_read_as_zeros(tmp_path):
    from featbank.cache import open_cache

    index, _, emb, _ = _cache(tmp_path)
    table = read_parts_table(index)
    with open_cache(index) as c:
        (parts_dir(index) / table[1].name).unlink()  # HDF5's virtual dataset would give zeros for its rows
        np.testing.assert_array_equal(c.load_embeddings(np.arange(5)), emb[:5])  # other parts still read
        with pytest.raises(CacheError, match=f"part cache.h5.parts/{table[1].name} .*featbank cache verify"):
            c.load_embeddings()
    index, _, emb, _ = _cache(tmp_path / "t")
    table = read_parts_table(index)
    with open_cache(index) as c:
        c.load_embeddings()  # offsets known, files open
        victim = parts_dir(index) / table[2].name
        os.truncate(victim, c._reader("embeddings")._offsets[2] + 8)  # in its first row
        c._reader("embeddings").close()  # opened again: the truncated file
        with pytest.raises(CacheError, match=f"{table[2].name} ends before the rows .*truncated"):
            c.load_embeddings()


def test_other_mappings_and_chunked_parts_are_read_through_hdf5(tmp_path):
    from featbank.cache import open_cache
    from featbank.cache._direct import RowReader

    index, _, emb, planned = _cache(tmp_path, sizes=(5, 7, 3))
    table = read_parts_table(index)
    chunked = parts_dir(index) / table[1].name
    with h5py.File(chunked, "r+") as f:  # a part whose embeddings are not one byte range
        data = f["embeddings"][...]
        del f["embeddings"]
        f.create_dataset("embeddings", data=data, chunks=(2, 8))
    with h5py.File(index, "r") as f:
        reader = RowReader(f["embeddings"], parts_dir(index), table)
        assert reader.direct
        out = np.empty_like(emb)
        assert reader.read_rows(np.arange(15), out) == []
        np.testing.assert_array_equal(out, emb)
        assert reader._offsets == {0: reader._offsets[0], 1: None, 2: reader._offsets[2]} and reader._offsets[0]
        reader.close()
    finalize_index(index, planned, KEY, IndexContents(CLASSES, {"backbone": "test_tiny"}))  # the table made to agree
    with open_cache(index) as c:
        assert c._reader("embeddings").direct
        np.testing.assert_array_equal(c.load_embeddings(), emb)
    with h5py.File(index, "r+") as f:  # a real dataset instead of the virtual one: rows no part holds (and no
        del f["embeddings"]  # hash covers), refused
        f["embeddings"] = emb
    with pytest.raises(CacheError, match="dataset 'embeddings' is not a virtual dataset over the parts"):
        open_cache(index)


def test_nan_and_extreme_rows_in_a_part_are_refused_on_the_direct_path(tmp_path):
    from featbank.cache import open_cache

    index, paths, emb, planned = _cache(tmp_path, sizes=(5, 7, 3))
    table = read_parts_table(index)
    with h5py.File(parts_dir(index) / table[1].name, "r+") as f:
        f["embeddings"][2, 3] = np.nan  # row 7 of the cache
        f["embeddings"][4, 0] = 1e30  # row 9
    finalize_index(index, planned, KEY, IndexContents(CLASSES, {"backbone": "test_tiny"}))  # the table made to agree
    with open_cache(index) as c:
        assert c._reader("embeddings").direct
        with pytest.raises(CacheError, match=f"NaN or infinite values in 1 row.*row 7 \\('{paths[7]}'\\)"):
            c.load_embeddings()
        np.testing.assert_array_equal(c.load_embeddings(np.arange(7)), emb[:7])  # rows before it are fine
        with pytest.raises(CacheError, match=f"beyond .*row 9 \\('{paths[9]}'\\)"):
            c.load_embeddings(np.r_[0:7, 8:15])
    with open_cache(index, extreme="ignore") as c:
        assert c.load_embeddings(np.r_[0:7, 8:15])[8, 0] == np.float32(1e30)


def test_within_bounds_clears_only_finite_blocks_within_the_extreme_value():
    import warnings

    from featbank.cache._validate import EXTREME_VALUE, within_bounds

    block = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32) * 100
    assert within_bounds(block) and within_bounds(block.astype(np.float64)) and within_bounds(block[:0])
    for bad in (np.nan, np.inf, -np.inf, EXTREME_VALUE * 1.01, -EXTREME_VALUE * 1.01, 3e38):
        b = block.copy()
        b[17, 5] = bad
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an overflow in the sum is no warning, only "check exactly"
            assert not within_bounds(b), bad
    assert not within_bounds(np.full((4, 4), EXTREME_VALUE / 10, np.float32) * 100)  # large sum: checked exactly
    assert not within_bounds(block.astype(np.float16))  # no BLAS for half floats: checked exactly
    assert not within_bounds(block[:, ::2])  # not contiguous: checked exactly


def test_layers_and_views_read_straight_from_the_parts_equal_the_virtual_datasets(tmp_path):
    from featbank.cache import open_cache
    from featbank.cache._parts import ROW_DATASETS

    index = tmp_path / "c" / "cache.h5"
    rng = np.random.default_rng(1)
    planned, extra_names = [], ["layers/stage1", "views/embeddings", "views/layers/stage1"]
    for sid, n in enumerate((4, 6, 3)):
        rows = _rows(f"s{sid}", n)
        extra = {"layers/stage1": rng.standard_normal((n, 5)).astype(np.float32),
                 "views/embeddings": rng.standard_normal((n, 2, 8)).astype(np.float32),
                 "views/layers/stage1": rng.standard_normal((n, 2, 5)).astype(np.float32)}
        write_part(parts_dir(index), ShardRows(sid, KEY, rows, CLASSES), rng.standard_normal((n, 8)).astype(np.float32),
                   digest=rows_digest(rows, CLASSES), extra=extra)
        planned.append(PlannedPart(sid, n, rows_digest(rows, CLASSES)))
    attrs = {"backbone": "test_tiny", "layers": ["stage1", "final"], "layer_dims": {"stage1": 5, "final": 8},
             "pooling": "gap", "views": 2, "augment": "crops", "view_seed": 0}
    finalize_index(index, planned, KEY, IndexContents(CLASSES, attrs, row_datasets=[*ROW_DATASETS, *extra_names]))
    rows = np.array([12, 1, 3, 4, 9, 3])
    with open_cache(index) as c:
        for name in ("embeddings", *extra_names):
            assert c._reader(name).direct, name
            c._reader(name).block_rows = 2  # blocks across the parts' boundaries
        both = np.concatenate([_vds(index, "layers/stage1"), _vds(index)], axis=1)
        np.testing.assert_array_equal(c.load_features(layers="all"), both)
        np.testing.assert_array_equal(c.load_features(rows, layers=("stage1", "final")), both[rows])
        for k in (0, 1):
            views = np.concatenate([_vds(index, "views/layers/stage1")[:, k], _vds(index, "views/embeddings")[:, k]], axis=1)
            np.testing.assert_array_equal(c.load_features(rows, layers="all", view=k), views[rows])
            chunks = list(c.iter_feature_chunks(np.arange(13), 5, layers="all", view=k))
            np.testing.assert_array_equal(np.concatenate([x for _, x in chunks]), views)


def test_part_without_the_mapped_rows_is_refused_where_hdf5_fills_zeros(tmp_path):
    from featbank.cache import open_cache

    for case in ("short", "missing"):
        index, _, emb, planned = _cache(tmp_path / case, sizes=(5, 7, 3))
        victim = parts_dir(index) / read_parts_table(index)[1].name
        with h5py.File(victim, "r+") as f:
            del f["embeddings"]
            if case == "short":
                f.create_dataset("embeddings", data=emb[5:11])  # 6 of its 7 rows
        finalize_index(index, planned, KEY, IndexContents(CLASSES, {"backbone": "test_tiny"}))  # the table made to agree
        if case == "missing":
            assert not _vds(index)[5:12].any()  # plain h5py: rows of zeros, no error
        else:
            with pytest.raises(OSError):  # plain h5py: HDF5's own words
                _vds(index)
        want = "holds 'embeddings' of shape \\(6, 8\\), the index maps \\(7, 8\\)" if case == "short" else "has no dataset"
        with pytest.raises(CacheError, match=f"part cache.h5.parts/{victim.name} {want}"):  # checked at open
            open_cache(index)
