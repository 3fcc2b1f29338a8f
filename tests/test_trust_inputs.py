"""Hostile inputs, round 2 (issue #27, the input side): real FIFOs swapped in between listing and
reading, sparse tars whose member declares gigabytes, brace patterns of a billion names, options
past any sane bound, NUL bytes in manifests and tars, one file named four ways, a BOM, two @SIZEs,
and a skops type skops trusts but featbank does not list.

Every test that could hang on a regression (a FIFO opened for reading) runs under a timeout.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featbank
from featbank.cli.main import cli
from featbank.errors import BundleError, ConfigError, DatasetError, DuplicateRowsWarning
from featbank.extraction import ExtractConfig
from featbank.extraction.job import read_source
from featbank.extraction.launchers import run_prepared
from featbank.extraction.units import prepare
from featbank.images import MAX_IMAGE_BYTES, ImageReadError, PreprocessConfig, load_image
from featbank.sources import MAX_PATTERN_NAMES, TarImages, count_braces, expand_braces, read_manifest, read_webdataset

from conftest import extract_job, make_image_folder

pytestmark = pytest.mark.timeout(60)  # a FIFO that blocks an open() fails the test instead of hanging the suite
TINY = dict(backbone="test_tiny", engine="torch", num_workers=0)
CFG = PreprocessConfig((32, 32), 32, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _png(colour: int, size: tuple[int, int] = (24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"im{i:02d}.png").write_bytes(_png(10 + 30 * i))
    return [f"{folder.name}/im{i:02d}.png" for i in range(n)]


def _tar(path: Path, members: list[tuple[str, bytes] | tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> Path:
    """A real tar of (name, bytes) members; a TarInfo (with its bytes) for PAX headers of one's own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            info, data = m if isinstance(m[0], tarfile.TarInfo) else (tarfile.TarInfo(m[0]), m[1])  # type: ignore[index]
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _skipped(out: Path) -> dict[str, str]:
    with h5py.File(out, "r") as f:
        return dict(zip((p.decode() for p in f["skipped/paths"][...]), (r.decode() for r in f["skipped/reasons"][...])))


# §4 -- no special file hangs a run: a FIFO swapped in after the listing is a skipped row.

@pytest.mark.parametrize("kind", ["folder", "manifest"])
def test_a_fifo_swapped_in_between_listing_and_reading_is_a_skipped_row(tmp_path: Path, kind: str) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_per_class=2)
    if kind == "manifest":
        (tmp_path / "m.csv").write_text("path,label\n" + "".join(
            f"data/{p.parent.name}/{p.name},{p.parent.name}\n" for p in sorted(data.rglob("*.*"))))
        source = read_source(ExtractConfig(str(tmp_path / "m.csv")))
    else:
        source = read_source(ExtractConfig(str(data)))
    victim = source.root / source.keys[0]
    victim.unlink()
    os.mkfifo(victim)  # no writer: open(victim, "rb") would wait forever
    out = tmp_path / "c.h5"
    report = run_prepared(prepare(source, extract_job(out, **TINY)))
    assert report.n_rows == 3
    assert _skipped(out) == {source.keys[0]: "not a regular file"}


def test_images_are_refused_at_open_when_not_regular_files(tmp_path: Path) -> None:
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    for bad, reason in [(fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                        (tmp_path, "not a file: it is a directory")]:
        with pytest.raises(ImageReadError) as e:
            load_image(bad)
        assert e.value.reason == reason


def test_predict_reads_a_fifo_swapped_in_after_listing_as_an_error_row(tmp_path: Path, monkeypatch) -> None:
    """predict on image paths: the listing saw a PNG, the read finds a FIFO: an error row, not a hang."""
    from test_export import make_bundle

    import featbank.inference as predict_module
    from featbank.heads import LinearHead

    data = make_image_folder(tmp_path / "data", n_per_class=3)
    bundle = make_bundle(tmp_path, data, LinearHead(C=1.0), name="fifo")
    good, victim = sorted((data / "dog").glob("*.png"))[:2]
    listed = predict_module._list_images

    def list_then_swap(images):  # the window between predict's listing and its reads, made deterministic
        paths = listed(images)
        victim.unlink()
        os.mkfifo(victim)
        return paths

    monkeypatch.setattr(predict_module, "_list_images", list_then_swap)
    preds = featbank.predict(bundle, [good, victim], device="cpu")
    assert preds[0].error is None and preds[1].error == "not a regular file"
    monkeypatch.undo()
    r = CliRunner().invoke(cli, ["predict", str(bundle), str(victim), "--device", "cpu"])
    assert r.exit_code == 2 and "not a regular file" in r.output


def test_a_manifest_or_tar_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "m.csv")
    with pytest.raises(DatasetError, match="not a file"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "wds").mkdir()
    _tar(tmp_path / "wds" / "a.tar", [("k0.png", _png(1)), ("k0.cls", b"0"), ("k1.png", _png(90)), ("k1.cls", b"1")])
    os.mkfifo(tmp_path / "wds" / "b.tar")
    src = read_webdataset(tmp_path / "wds")
    assert len(src.keys) == 2 and dict((k, r) for k, r, _ in src.skipped)["b.tar/"].startswith("not a readable tar")


# §3 -- every reader is bounded.

def _sparse_tar(path: Path, declared: int, extra: list[tuple[str, bytes]] = ()) -> Path:
    """A tar whose member ``big.png`` declares ``declared`` bytes: a real PNG, then a hole (a sparse file)."""
    _tar(path, list(extra))
    with tarfile.open(path) as tf:  # the members' bytes, without the end-of-archive blocks and record padding
        end = max((m.offset_data + -(-m.size // 512) * 512 for m in tf), default=0)
    head = path.read_bytes()[:end]
    info = tarfile.TarInfo("big.png")
    info.size = declared
    with open(path, "wb") as fh:
        fh.write(head)
        fh.write(info.tobuf(tarfile.PAX_FORMAT))
        start = fh.tell()
        fh.write(_png(200, (64, 64)))
        fh.seek(start + -(-declared // 512) * 512)
        fh.write(b"\0" * 1024)  # end of archive, after the hole
    return path


def test_a_tar_member_larger_than_the_byte_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    tar = _sparse_tar(tmp_path / "wds" / "s.tar", MAX_IMAGE_BYTES + 1,
                      [("k0.png", _png(10)), ("k0.cls", b"0"), ("k1.png", _png(99)), ("k1.cls", b"1")])
    assert tar.stat().st_size > MAX_IMAGE_BYTES and tar.stat().st_blocks * 512 < 10 << 20  # sparse on disk
    src = read_webdataset(tmp_path / "wds")
    assert src.keys == ["s.tar/k0", "s.tar/k1"]
    assert dict((k, r) for k, r, _ in src.skipped)["s.tar/big"].startswith("too large: 1073741825 bytes")
    # The reader checks the header too (a tar changed after the listing): refused before a byte is read.
    row, pixels, why = TarImages(tar.parent, ["s.tar/big"], ["s.tar\0big.png"], np.array([0]), CFG)[0]
    assert pixels is None and why.startswith("too large")


def test_a_big_tar_member_is_decoded_as_a_stream_not_read_whole(tmp_path: Path) -> None:
    _sparse_tar(tmp_path / "s.tar", 200 << 20)
    row, pixels, why = TarImages(tmp_path, ["s.tar/big"], ["s.tar\0big.png"], np.array([0]), CFG)[0]
    assert why == "" and pixels.shape == (32, 32, 3) and int(pixels[0, 0, 0]) == 200


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_of_a_sparse_tar_member_stays_that_of_a_file(tmp_path: Path) -> None:
    """The issue's case: a small sparse tar whose member declares ~1 GB; decoding it stays far below that."""
    _sparse_tar(tmp_path / "s.tar", MAX_IMAGE_BYTES - 4096)
    code = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from featbank.sources import TarImages\n"
        "from featbank.images import PreprocessConfig\n"
        "cfg = PreprocessConfig((224, 224), 256, 'bicubic', (0.5,) * 3, (0.5,) * 3)\n"
        "row, px, why = TarImages(Path(sys.argv[1]), ['s.tar/big'], ['s.tar\\0big.png'], np.array([0]), cfg)[0]\n"
        "assert px is not None, why\n"
        # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's peak across the exec)
        "print(next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    peak_mb = int(out.stdout.split()[-1])
    assert peak_mb < 600, f"peak RSS {peak_mb} MB while decoding a 64x64 PNG from a 1 GB sparse member"


def test_brace_patterns_are_counted_before_they_are_expanded() -> None:
    assert count_braces("s/{0..999}{0..999}{0..999}.tar") == MAX_PATTERN_NAMES + 1  # a product, not a list
    assert count_braces("s/{00..09}-{a,b}.tar") == 20 and count_braces("{a,{b,c}}{0..9}") == 40
    with pytest.raises(ConfigError, match="more than 1,000,000 tar files"):
        expand_braces("shards/{0..999}{0..999}{0..999}.tar")
    with pytest.raises(ConfigError, match="more than 1,000,000"):
        expand_braces("{" * 30 + "{0..99999},1}" + "}" * 29 + "{0..99}")  # nested: counted lazily, stops early
    with pytest.raises(ConfigError, match="brace groups"):
        expand_braces("{a}" * 65 + ".tar")
    with pytest.raises(ConfigError, match="counts down"):
        expand_braces("s/{9..0}.tar")


def test_extract_refuses_a_billion_shard_pattern_with_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    r = CliRunner().invoke(cli, ["extract", str(tmp_path / "shards/{0..999}{0..999}{0..999}.tar"), "--out", str(out),
                                 "--backbone", "test_tiny", "-q"])
    assert r.exit_code == 2 and "more than 1,000,000 tar files" in r.output
    assert not out.exists()


@pytest.mark.parametrize("args, match", [
    (["--views", "1000000", "--augment", "crops"], "at most 64 augmented views"),
    (["--shard-size", "99999999999999999999"], "--shard-size.*from 1 to 1,000,000"),
    (["--batch-size", "10000000"], "batch_size.*65,536"),
    (["--procs", "100000"], "procs.*from 1 to 256"),
    (["--num-workers", "100000"], "num_workers.*from 0 to 256"),
])
def test_extract_bounds_its_options_before_any_work(tmp_path: Path, args: list[str], match: str) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_per_class=1)
    out = tmp_path / "c.h5"
    r = CliRunner().invoke(cli, ["extract", str(data), "--out", str(out), "--backbone", "test_tiny", "-q", *args])
    assert r.exit_code == 2, r.output
    assert re.search(match, r.output), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no cache, no parts, no staging file


@pytest.mark.parametrize("value", ["1e400GB", "nan", "inf", "-1GB", "0", "0.5", "1e30GB"])
def test_fit_max_memory_is_bounded(tiny_cache: Path, value: str) -> None:
    r = CliRunner().invoke(cli, ["fit", str(tiny_cache), "--max-memory", value, "--out", str(tiny_cache.parent / "b")])
    assert r.exit_code == 2 and "--max-memory" in r.output and "Traceback" not in r.output, r.output


def test_a_staging_part_is_not_written_up_front(tmp_path: Path) -> None:
    """A part being written reserves its rows (64 views x 1280-d for 2,000 rows: 656 MB) without writing them."""
    from featbank.cache._parts import PartRows, PartWriter, ShardRows

    n = 2000
    rows = PartRows([f"im{i:05d}.png" for i in range(n)], np.zeros((n, 2), np.int64), np.zeros(n, np.int64),
                    np.full(n, -1, np.int8))
    w = PartWriter.create(tmp_path, ShardRows(0, "k", rows, ["a", "b"]), 1280, "float32", extra={"views/embeddings": (64, 1280)})
    try:
        st = w.path.stat()
        assert st.st_size > 600 << 20 and st.st_blocks * 512 < 16 << 20
        assert not w.done_mask().any()  # rows not written read as not done, whatever the bytes
        w.write_rows(np.array([3]), np.ones((1, 1280), np.float32), {"views/embeddings": np.ones((1, 64, 1280))})
        assert w.done_mask().sum() == 1 and float(w.embeddings[3].sum()) == 1280.0
    finally:
        w.close()


def test_temporaries_of_a_failed_or_killed_run_are_removed(tmp_path: Path) -> None:
    from featbank.cache._parts import PartRows, PartWriter, ShardRows

    rows = PartRows(["a\0b.png"], np.zeros((1, 2), np.int64), np.zeros(1, np.int64), np.full(1, -1, np.int8))
    with pytest.raises(ValueError):
        PartWriter.create(tmp_path, ShardRows(0, "k", rows, ["a", "b"]), 8, "float32")  # HDF5 refuses the NUL: no temp left
    assert list(tmp_path.iterdir()) == []
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_per_class=1)
    out = tmp_path / "c.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    parts = tmp_path / "c.h5.parts"
    parts.mkdir()
    stale = parts / f".part-000000-0123456789ab.h5.partial.tmp-{int(dead.stdout)}-0badc0de"
    live = parts / f".part-000001-0123456789ab.h5.partial.tmp-{os.getpid()}-0badc0de"
    stale.write_bytes(b"x" * 4096)
    live.write_bytes(b"y")
    featbank.extract(data, out, progress=False, **TINY)
    assert not stale.exists() and live.exists()  # a live writer's temporary is left alone


# §5 -- strings HDF5 cannot store are reasons, not crashes.

def test_nul_bytes_in_a_manifest_are_skipped_rows_and_the_run_finishes(tmp_path: Path) -> None:
    names = _images(tmp_path / "imgs", 4)
    (tmp_path / "m.csv").write_text(
        "path,label\n" + "".join(f"{n},{'ab'[i % 2]}\n" for i, n in enumerate(names[:3]))
        + f"{names[3]},b\0ad\nimgs/im\0x.png,a\n")
    out = tmp_path / "c.h5"
    r = CliRunner().invoke(cli, ["extract", str(tmp_path / "m.csv"), "--out", str(out), "--backbone", "test_tiny", "-q"])
    assert r.exit_code == 0, r.output
    skipped = _skipped(out)
    assert skipped == {names[3]: "the label holds a NUL byte, which the cache (HDF5) cannot store",
                       "imgs/im\\x00x.png": "the path holds a NUL byte, which the cache (HDF5) cannot store"}
    with h5py.File(out, "r") as f:
        assert f["embeddings"].shape[0] == 3
    assert not [p for p in (tmp_path / "c.h5.parts").iterdir() if ".tmp-" in p.name]


def test_nul_bytes_in_a_webdataset_label_or_pax_name_are_skipped_rows(tmp_path: Path) -> None:
    pax = tarfile.TarInfo("x.png")
    pax.pax_headers = {"path": "bad\0name.png"}
    _tar(tmp_path / "wds" / "s.tar", [("k0.png", _png(1)), ("k0.txt", b"cat"), ("k1.png", _png(90)),
                                      ("k1.txt", b"dog"), ("k2.png", _png(50)), ("k2.txt", b"d\0g"), (pax, _png(7))])
    src = read_webdataset(tmp_path / "wds", label_from="txt")
    assert src.keys == ["s.tar/k0", "s.tar/k1"]
    reasons = {k: r for k, r, _ in src.skipped}
    assert reasons["s.tar/k2"] == "unreadable label in .txt: the label holds a NUL byte, which the cache (HDF5) cannot store"
    assert reasons["s.tar/bad\\x00name"] == "the member name holds a NUL byte, which the cache (HDF5) cannot store"
    out = tmp_path / "c.h5"
    assert run_prepared(prepare(src, extract_job(out, **TINY))).n_rows == 2
    _tar(Path(os.fsdecode(os.fsencode(tmp_path / "wds") + b"/bad\xff.tar")), [("k0.png", _png(3)), ("k0.txt", b"cat")])
    src = read_webdataset(tmp_path / "wds", label_from="txt")  # a tar whose file name is not UTF-8: skipped
    assert src.keys == ["s.tar/k0", "s.tar/k1"]
    assert {k: r for k, r, _ in src.skipped}["bad\\udcff.tar/"].startswith("the tar's file name is not valid UTF-8")


# §6 -- one file, one row.

def _four_ways(tmp_path: Path, splits: list[str]) -> Path:
    names = _images(tmp_path / "d", 3)
    x = tmp_path / "d" / "im00.png"
    (tmp_path / "link.png").symlink_to(x)
    ways = ["d/im00.png", "./d/im00.png", str(x.resolve()), "d//im00.png"]
    rows = [f"{w},cat,{s}\n" for w, s in zip(ways, splits)]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "".join(rows) + f"{names[1]},dog,train\n{names[2]},dog,test\n")
    return tmp_path / "m.csv"


def test_one_file_named_four_ways_is_one_row(tmp_path: Path) -> None:
    manifest = _four_ways(tmp_path, ["train"] * 4)
    with (tmp_path / "m.csv").open("a") as fh:
        fh.write("link.png,cat,train\n")
    with pytest.warns(DuplicateRowsWarning, match="4 row\\(s\\) name the same file"):
        src = read_manifest(manifest)
    assert src.keys == ["d/im00.png", "d/im01.png", "d/im02.png"] and len(src.duplicates) == 4
    out = tmp_path / "c.h5"
    r = CliRunner().invoke(cli, ["extract", str(manifest), "--out", str(out), "--backbone", "test_tiny"])
    assert r.exit_code == 0 and "4 repeated row(s) collapsed" in r.output, r.output
    with h5py.File(out, "r") as f:
        assert f["embeddings"].shape[0] == 3


def test_one_file_in_two_splits_is_an_error_that_lists_the_rows(tmp_path: Path) -> None:
    manifest = _four_ways(tmp_path, ["train", "test", "val", "test"])
    with pytest.raises(DatasetError) as e:
        read_manifest(manifest)
    msg = str(e.value)
    assert "line 2 'd/im00.png' (label 'cat', split train) and line 3 './d/im00.png' (label 'cat', split test)" in msg
    assert "line 5 'd//im00.png'" in msg
    r = CliRunner().invoke(cli, ["extract", str(manifest), "--out", str(tmp_path / "c.h5"), "--backbone", "test_tiny"])
    assert r.exit_code == 2 and "more than once with different labels or splits" in r.output
    assert not (tmp_path / "c.h5").exists()


def test_webdataset_repeated_keys_are_collapsed_or_refused_never_last_wins(tmp_path: Path) -> None:
    same = [("k0.png", _png(1)), ("k0.cls", b"0"), ("k1.png", _png(90)), ("k1.cls", b"1")]
    _tar(tmp_path / "a" / "s.tar", [*same, ("k0.png", _png(1)), ("k0.cls", b"0")])  # a repeat with the same bytes
    with pytest.warns(DuplicateRowsWarning):
        src = read_webdataset(tmp_path / "a")
    assert src.keys == ["s.tar/k0", "s.tar/k1"] and len(src.duplicates) == 2  # the .png and the .cls
    _tar(tmp_path / "b" / "s.tar", [*same, ("k0.png", _png(2))])  # same key, other pixels
    with pytest.raises(DatasetError, match="'s.tar/k0' has 2 different .png members"):
        read_webdataset(tmp_path / "b")
    _tar(tmp_path / "c" / "t1.tar", same)
    _tar(tmp_path / "c" / "t2.tar", [("k0.png", _png(1)), ("k0.cls", b"0"), ("k9.png", _png(40)), ("k9.cls", b"1")])
    with pytest.warns(DuplicateRowsWarning, match="the same sample"):
        src = read_webdataset(tmp_path / "c")  # k0 in two tars, same bytes and label: one row
    assert src.keys == ["t1.tar/k0", "t1.tar/k1", "t2.tar/k9"] and src.tars == [("t1.tar", 2), ("t2.tar", 1)]
    out = tmp_path / "c.h5"
    assert run_prepared(prepare(src, extract_job(out, **TINY))).n_rows == 3
    _tar(tmp_path / "c" / "t2.tar", [("k0.png", _png(1)), ("k0.cls", b"1"), ("k9.png", _png(40)), ("k9.cls", b"1")])
    with pytest.raises(DatasetError, match="'t1.tar/k0' \\(label '0'.*'t2.tar/k0' \\(label '1'"):
        read_webdataset(tmp_path / "c")  # same bytes, other label
    _tar(tmp_path / "c" / "t2.tar", [("k0.png", _png(3)), ("k0.cls", b"1"), ("k9.png", _png(40)), ("k9.cls", b"1")])
    assert len(read_webdataset(tmp_path / "c").keys) == 4  # same key, other image: another sample
    _tar(tmp_path / "c" / "t2.tar", [("k7.png", _png(1)), ("k7.cls", b"0"), ("k9.png", _png(40)), ("k9.cls", b"1")])
    _tar(tmp_path / "c" / "t3.tar", [("k0.png", _png(1)), ("k0.cls", b"0"), ("k7.png", _png(1)), ("k7.cls", b"0")])
    with pytest.warns(DuplicateRowsWarning):  # same bytes under other keys are other samples; only keys repeat
        src = read_webdataset(tmp_path / "c")
    assert src.keys == ["t1.tar/k0", "t1.tar/k1", "t2.tar/k7", "t2.tar/k9"] and len(src.duplicates) == 2


# §7 -- one @SIZE, one parser; a BOM; skops' defaults do not load on top of featbank's list.

@pytest.mark.parametrize("name", ["efficientnet_lite0@300@300", "test_tiny@16@300"])
def test_two_sizes_are_refused_by_extract_and_compare_alike(tmp_path: Path, name: str) -> None:
    from featbank.backbones import check_backbone_name

    with pytest.raises(ConfigError, match="more than one '@SIZE'"):
        check_backbone_name(name)
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_per_class=1)
    for cmd in (["extract", str(data), "--backbone", name, "--out", str(tmp_path / "c.h5")],
                ["compare", str(data), "--backbones", name, "--no-plot"]):
        r = CliRunner().invoke(cli, [*cmd, "-q"])
        assert r.exit_code == 2 and "more than one '@SIZE'" in r.output, r.output
    assert not (tmp_path / "c.h5").exists()


def test_compare_accepts_what_extract_accepts(tmp_path: Path) -> None:
    from featbank.backbones import check_backbone_name

    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_per_class=1)
    for name in ("test_tiny", "test_tiny@32"):
        check_backbone_name(name)  # the parser both commands run first
        featbank.extract(data, tmp_path / f"{name}.h5", progress=False, **{**TINY, "backbone": name})


def test_a_csv_manifest_with_a_utf8_bom_is_read(tmp_path: Path) -> None:
    names = _images(tmp_path / "imgs", 2)
    text = "path,label\n" + f"{names[0]},a\n{names[1]},b\n"
    (tmp_path / "m.csv").write_bytes(text.encode("utf-8-sig"))  # what Excel's "CSV UTF-8" writes
    src = read_manifest(tmp_path / "m.csv")
    assert src.keys == names and src.classes == ["a", "b"]


def test_a_type_skops_trusts_by_default_but_featbank_does_not_list_is_refused() -> None:
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MinMaxScaler

    from featbank.bundles import load_skops, trusted_skops_types

    X = np.random.default_rng(0).normal(size=(20, 3))
    est = Pipeline([("scale", MinMaxScaler()), ("clf", LogisticRegression())]).fit(X, np.arange(20) % 2)
    data = sio.dumps(est)
    assert sio.get_untrusted_types(data=data) == []  # skops alone would load it
    assert "sklearn.preprocessing._data.MinMaxScaler" not in trusted_skops_types()
    with pytest.raises(BundleError, match="sklearn.preprocessing._data.MinMaxScaler"):
        load_skops(data, "head.skops")


def test_one_file_linked_into_a_folder_twice_is_one_row_or_an_error(tmp_path: Path) -> None:
    from featbank.sources import scan_folder

    data = make_image_folder(tmp_path / "data", classes=("a", "b"), splits=("train", "test"), n_per_class=2)
    x = data / "train" / "a" / "a_000.png"
    os.link(x, data / "train" / "a" / "again.png")  # a hard link, same class and split: collapsed
    with pytest.warns(DuplicateRowsWarning, match="1 path"):
        index = scan_folder(data)
    assert index.duplicates == [("train/a/again.png", "train/a/a_000.png")] and len(index) == 8
    assert "train/a/again.png" not in index.paths
    (data / "test" / "a" / "leak.png").symlink_to(x)  # the same image in test: an error naming both paths
    with pytest.raises(DatasetError, match="'test/a/leak.png' and 'train/a/a_000.png'|'train/a/a_000.png' and"):
        scan_folder(data)
    r = CliRunner().invoke(cli, ["extract", str(data), "--out", str(tmp_path / "c.h5"), "--backbone", "test_tiny"])
    assert r.exit_code == 2 and "one file under two classes or splits" in r.output
