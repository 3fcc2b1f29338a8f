"""Manifest and WebDataset inputs: real CSV/TSV/parquet files and real tars, bad rows and hostile ones."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featbank.cache._index import check_parts
from featbank.errors import ConfigError, DatasetError, DuplicateRowsWarning
from featbank.extraction.launchers import run_prepared
from featbank.extraction.units import prepare
from featbank.sources import expand_braces, read_manifest, read_webdataset

from conftest import extract_job

TINY = dict(backbone="test_tiny", engine="torch", num_workers=0)


def _png(colour: int, size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        (folder / f"im{i:02d}.png").write_bytes(_png(10 * i))
        names.append(f"{folder.name}/im{i:02d}.png")
    return names


def test_csv_manifest_with_relative_absolute_missing_and_duplicate_rows(tmp_path):
    names = _images(tmp_path / "imgs", 4)
    absolute = str((tmp_path / "imgs" / "im03.png").resolve())
    (tmp_path / "m.csv").write_text(
        "path,label,split\n"
        f"{names[0]},cat,train\n{names[1]},dog,Train\n{names[2]},cat,val\n"
        f"{absolute},dog,\nimgs/gone.png,cat,test\n{names[0]},cat,train\n,cat,train\n"
    )
    with pytest.warns(DuplicateRowsWarning, match="1 row"):
        src = read_manifest(tmp_path / "m.csv")
    assert src.keys == sorted([*names[:3], absolute]) and src.classes == ["cat", "dog"]
    by_key = dict(zip(src.keys, zip(src.labels.tolist(), src.splits.tolist())))
    assert by_key[names[1]] == (1, 0) and by_key[absolute] == (1, -1) and by_key[names[2]] == (0, 1)
    reasons = {k: r for k, r, _ in src.skipped}
    assert reasons["imgs/gone.png"] == "file not found" and src.duplicates == [(names[0], names[0])]
    assert reasons["<line 8>"] == "empty path"


def test_tsv_and_parquet_manifests_with_mapped_columns(tmp_path):
    names = _images(tmp_path / "imgs", 3)
    (tmp_path / "m.tsv").write_text("file\tcls\n" + "".join(f"{n}\t{'ab'[i % 2]}\n" for i, n in enumerate(names)))
    src = read_manifest(tmp_path / "m.tsv", path_column="file", label_column="cls")
    assert src.keys == names and src.labels.tolist() == [0, 1, 0]
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"path": names, "label": ["x", "y", "x"]}), tmp_path / "m.parquet")
    src = read_manifest(tmp_path / "m.parquet")
    assert src.keys == names and src.classes == ["x", "y"] and (src.splits == -1).all()


@pytest.mark.parametrize(
    "text, kw, match",
    [
        ("file,label\na.png,x\n", {}, "no path column 'path'.*columns are \\['file', 'label'\\]"),
        ("path,label\nimgs/im00.png,x\nimgs/im01.png,x\n", {}, "single class 'x'"),
        ("path,split\nimgs/im00.png,training\n", {}, "line 2 has split 'training'"),
        ("path\n", {}, "No usable rows"),
        ("", {}, "empty"),
        ("path,label\nimgs/im00.png,a\n", {"label_column": "klass"}, "no label column 'klass'"),
    ],
)
def test_bad_manifests_are_refused_with_a_clear_message(tmp_path, text, kw, match):
    _images(tmp_path / "imgs", 2)
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(DatasetError, match=match):
        read_manifest(tmp_path / "m.csv", **kw)


def test_hostile_manifest_rows_are_read_as_images_only_or_refused(tmp_path):
    _images(tmp_path / "imgs", 2)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "m.csv").write_bytes(
        b"path,label\nimgs/im00.png,a\nimgs/im01.png,b\n../../../../../../etc/passwd,a\n"
        + str(fifo).encode() + b",b\nimgs,a\n/dev/zero,a\n\"=cmd|' /C calc'!A0\",b\n"
    )
    src = read_manifest(tmp_path / "m.csv")
    reasons = {k: r for k, r, _ in src.skipped}
    # A FIFO would block open() forever and a directory or device is not an image file: refused at listing.
    assert reasons[str(fifo)] == "not a regular file" and reasons["imgs"] == "not a regular file"
    assert reasons["/dev/zero"] == "not a regular file" and reasons["=cmd|' /C calc'!A0"] == "file not found"
    # /etc/passwd is a readable regular file: listed (a manifest is trusted to name files), then
    # refused as "not an image" by the decoder when embedded, never executed or written.
    assert "../../../../../../etc/passwd" in src.keys
    with pytest.raises(ConfigError, match="Unknown manifest type"):
        read_manifest(tmp_path / "imgs" / "im00.png")
    (tmp_path / "bad.csv").write_bytes(b"path\n\xff\xfe\n")
    with pytest.raises(DatasetError, match="UTF-8"):
        read_manifest(tmp_path / "bad.csv")


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _shards(folder: Path) -> Path:
    folder.mkdir()
    _tar(folder / "s-000000.tar", [
        ("a/000", {"png": _png(10), "cls": b"0"}), ("a/001", {"png": _png(200), "cls": b"1"}),
        ("a/002", {"jpg": b"\xff\xd8 not a jpeg", "cls": b"1"}), ("a/003", {"png": _png(30), "cls": b"one"}),
        ("a/004", {"cls": b"0"}),
    ])
    _tar(folder / "s-000001.tar", [
        ("b/000", {"png": _png(90), "cls": b"10", "json": json.dumps({"label": "x"}).encode()}),
        ("b/001", {"png": _png(120), "cls": b"2"}),
    ])
    return folder


def test_webdataset_listing_labels_and_bad_members(tmp_path):
    folder = _shards(tmp_path / "wds")
    src = read_webdataset(folder)
    assert src.keys == ["s-000000.tar/a/000", "s-000000.tar/a/001", "s-000000.tar/a/002",
                        "s-000001.tar/b/000", "s-000001.tar/b/001"]
    assert src.classes == ["0", "1", "2", "10"] and src.labels.tolist() == [0, 1, 1, 3, 2]
    assert src.tars == [("s-000000.tar", 3), ("s-000001.tar", 2)]
    reasons = {k: r for k, r, _ in src.skipped}
    assert reasons["s-000000.tar/a/003"].startswith("unreadable label in .cls")
    assert reasons["s-000000.tar/a/004"] == "no image member"
    st = (folder / "s-000001.tar").stat()
    assert src.fingerprints[-1].tolist() == [st.st_size, st.st_mtime_ns]  # the tar's fingerprint
    assert expand_braces(str(folder / "s-{000000..000001}.tar")) == [str(folder / "s-000000.tar"), str(folder / "s-000001.tar")]
    by_pattern = read_webdataset(str(folder / "s-{000000..000002}.tar"))
    assert by_pattern.keys == src.keys and ("s-000002.tar/", "tar not found", (0, 0)) in by_pattern.skipped
    with pytest.raises(ConfigError, match="label_from"):
        read_webdataset(folder, label_from="xml")
    with pytest.raises(DatasetError, match="No .tar shards"):
        read_webdataset(tmp_path)


def test_truncated_tar_keeps_whole_members_and_records_the_rest(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    _tar(folder / "t.tar", [(f"k{i}", {"png": _png(20 * i, (64, 64)), "cls": str(i % 2).encode()}) for i in range(4)])
    data = (folder / "t.tar").read_bytes()
    (folder / "t.tar").write_bytes(data[: len(data) // 2])
    src = read_webdataset(folder)
    assert 1 <= len(src.keys) < 4 and all(k.startswith("t.tar/k") for k in src.keys)
    assert any("truncated" in r for _, r, _ in src.skipped)
    (folder / "junk.tar").write_bytes(b"\x00garbage" * 100)
    src = read_webdataset(folder)
    assert any(k == "junk.tar/" for k, _, _ in src.skipped) or ("junk.tar", 0) in src.tars


def test_webdataset_extracts_one_part_per_tar_and_skips_a_corrupt_member(tmp_path):
    src = read_webdataset(_shards(tmp_path / "wds"))
    out = tmp_path / "c.h5"
    prep = prepare(src, extract_job(out, **TINY))
    assert [len(j.rows) for j in prep.jobs] == [3, 2]
    report = run_prepared(prep)
    assert report.n_rows == 4 and report.n_shards == 2
    assert check_parts(out, full=True) == []
    with h5py.File(out, "r") as f:
        # skipped/ holds both: the part's unreadable member, then the row refused while listing
        skipped = [p.decode() for p in f["skipped/paths"][...]]
        assert len(skipped) == 3 and skipped[0] == "s-000000.tar/a/002"
        assert f["skipped/reasons"][1].decode().startswith("unreadable label")
        assert "listing_skipped" not in f.attrs
        assert f["embeddings"].shape[0] == 4
        emb = f["embeddings"][...]
    # Same pixels as the file on disk would give.
    from featbank.backbones import load_backbone
    from featbank.images import load_and_preprocess

    (tmp_path / "x.png").write_bytes(_png(10))
    bb = load_backbone("test_tiny")
    import torch

    with torch.inference_mode():
        pixels = torch.from_numpy(np.array(load_and_preprocess(tmp_path / "x.png", bb.preprocess)[None]))
        want = bb.embedder().eval()(pixels).numpy()
    np.testing.assert_allclose(emb[0], want[0], atol=1e-5)


def test_manifest_extraction_records_bad_rows(tmp_path):
    names = _images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "fake.png").write_text("/etc/passwd look-alike")
    (tmp_path / "m.csv").write_text(
        "path,label\n" + "".join(f"{n},{'ab'[i % 2]}\n" for i, n in enumerate(names)) + "imgs/fake.png,a\nimgs/no.png,b\n"
    )
    out = tmp_path / "c.h5"
    report = run_prepared(prepare(read_manifest(tmp_path / "m.csv"), extract_job(out, shard_size=2, **TINY)))
    assert report.n_rows == 4 and report.n_skipped == 2
    with h5py.File(out, "r") as f:
        assert [p.decode() for p in f["paths"][...]] == names
        assert [p.decode() for p in f["skipped/paths"][...]] == ["imgs/fake.png", "imgs/no.png"]
        assert f["skipped/reasons"][0].decode().startswith("not an image")
        assert f["skipped/reasons"][1].decode() == "file not found"
        assert f["skipped/fingerprints"][1].tolist() == [0, 0] and "listing_skipped" not in f.attrs


def test_create_source_reads_each_kind_as_its_reader_does(tmp_path):
    from featbank.sources import SOURCE_KINDS, RowSource, create_source, scan_folder, source_kind

    assert set(SOURCE_KINDS) == {"folder", "manifest", "webdataset"}
    for cls in ("cat", "dog"):
        _images(tmp_path / "folder" / cls, 2)
    names = _images(tmp_path / "imgs", 4)
    (tmp_path / "m.tsv").write_text("file\tcls\n" + "".join(f"{n}\t{'ab'[i % 2]}\n" for i, n in enumerate(names)))
    wds = _shards(tmp_path / "wds")
    cases = {
        "folder": (tmp_path / "folder", {}, RowSource.from_index(scan_folder(tmp_path / "folder"))),
        "manifest": (tmp_path / "m.tsv", {"path_column": "file", "label_column": "cls"},
                     read_manifest(tmp_path / "m.tsv", path_column="file", label_column="cls")),
        "webdataset": (wds, {"label_from": "cls"}, read_webdataset(wds)),
    }
    for kind, (data, options, want) in cases.items():
        assert source_kind(data) == kind
        got = create_source(kind, data, **options)
        assert got.layout == want.layout and got.keys == want.keys and got.classes == want.classes
        assert got.labels.tolist() == want.labels.tolist()
    assert source_kind(str(wds / "s-{000000..000001}.tar")) == "webdataset"
    assert len(create_source("folder", tmp_path / "folder").keys) == 4


def test_create_source_refuses_an_unknown_kind_and_says_which_exist(tmp_path):
    from featbank.sources import create_source

    with pytest.raises(ConfigError, match="'kind' parameter of create_source must be one of folder, manifest, "
                                          "webdataset. Got 'lmdb'"):
        create_source("lmdb", tmp_path)
    with pytest.raises(TypeError):
        create_source("webdataset", tmp_path, path_column="file")  # an option of another kind
