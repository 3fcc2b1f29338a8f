"""featbank.extract end to end: layouts, schema, incremental reruns, refusals, bad images, engines."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import featbank
from featbank.backbones import load_backbone
from featbank.cache import SCHEMA_VERSION, find_latest_cache, open_cache
from featbank.cache._parts import parts_dir
from featbank.errors import (
    CacheKeyMismatch,
    ConfigError,
    DatasetError,
    Interrupted,
    NotACacheError,
    SkippedImagesError,
    SkippedImagesWarning,
)
from featbank.extraction import default_cache_path
from featbank.images import load_and_preprocess
from featbank.sources import SPLIT_NAMES

try:  # tests/ may be run as a package (tests/__init__.py) or as plain folder
    from ._imagecorpus import make_bad_image_corpus
    from .conftest import make_image_folder
except ImportError:
    from _imagecorpus import make_bad_image_corpus  # type: ignore[no-redef]
    from conftest import make_image_folder  # type: ignore[no-redef]

TINY = dict(backbone="test_tiny", engine="torch", num_workers=0, progress=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def direct_embeddings(root: Path, paths: list[str], name: str = "test_tiny") -> np.ndarray:
    """Embeddings computed without featbank.extract: decode, preprocess, one forward pass."""
    bb = load_backbone(name)
    batch = np.stack([load_and_preprocess(root / p, bb.preprocess) for p in paths])
    with torch.inference_mode():
        return bb.embedder().eval()(torch.from_numpy(batch)).numpy()


def assert_same_cache(a: Path, b: Path, atol: float = 1e-5) -> None:
    with open_cache(a) as ca, open_cache(b) as cb:
        assert ca.paths == cb.paths
        assert ca.classes == cb.classes
        np.testing.assert_array_equal(ca.labels, cb.labels)
        np.testing.assert_array_equal(ca.splits, cb.splits)
        np.testing.assert_array_equal(ca.fingerprints, cb.fingerprints)
        np.testing.assert_allclose(ca.load_embeddings(), cb.load_embeddings(), rtol=0, atol=atol)
        assert ca.cache_key == cb.cache_key


def test_imagefolder_schema_is_plain_hdf5(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    report = featbank.extract(image_folder, out, **TINY)
    assert (report.n_images, report.n_embedded, report.n_reused, report.n_removed) == (24, 24, 0, 0)
    assert report.model_loaded and not report.up_to_date and report.engine == "torch"
    assert report.skipped == [] and "24 embedded" in report.summary()

    bb = load_backbone("test_tiny")
    with h5py.File(out, "r") as f:
        for name in ("embeddings", "labels", "paths", "splits", "fingerprints", "classes",
                     "skipped/paths", "skipped/reasons", "skipped/fingerprints"):
            assert name in f, name
        emb = f["embeddings"]
        assert emb.shape == (24, 32) and emb.dtype == np.float32
        # Schema v2: the index maps every row dataset onto the part files, listed in its table of parts.
        assert emb.is_virtual and f["labels"].is_virtual and f["paths"].is_virtual
        names = [n.decode() for n in f["parts/names"][...]]
        assert len(names) == 1 and f["parts/n_rows"][...].tolist() == [24]
        assert {vs.file_name for vs in emb.virtual_sources()} == {f"c.h5.parts/{names[0]}"}
        assert f["labels"].dtype == np.int64 and f["splits"].dtype == np.int8
        assert f["fingerprints"].shape == (24, 2) and f["fingerprints"].dtype == np.int64
        assert h5py.check_string_dtype(f["paths"].dtype).encoding == "utf-8"
        paths = [p.decode() for p in f["paths"][...]]
        classes = [c.decode() for c in f["classes"][...]]
        a = dict(f.attrs)
        for key in ("format", "schema_version", "featbank_version", "backbone", "weights", "weights_sha256",
                    "transform", "engine", "dtype", "created", "updated", "cache_key", "precision",
                    "embed_dim", "n_samples", "root"):
            assert key in a, key
        assert a["format"] == "featbank-cache" and a["schema_version"] == SCHEMA_VERSION == 2
        assert a["featbank_version"] == featbank.__version__
        assert a["backbone"] == "test_tiny" and a["weights_sha256"] == bb.weights_sha256
        assert json.loads(a["transform"]) == bb.preprocess.to_dict()
        assert a["engine"] == "torch" and a["dtype"] == "float32" and len(a["cache_key"]) == 64
        time.strptime(a["created"][:19], "%Y-%m-%dT%H:%M:%S")
        emb_values = emb[...]
        np.testing.assert_allclose(emb_values, direct_embeddings(image_folder, paths), atol=1e-5)
        labels = f["labels"][...]
        fps = f["fingerprints"][...]
    with h5py.File(parts_dir(out) / names[0], "r") as part:  # contiguous, allocated in full: one slab per read
        assert part["embeddings"].chunks is None and part.attrs["complete"] and part.attrs["cache_key"] == a["cache_key"]
        np.testing.assert_array_equal(part["embeddings"][...], emb_values)
    assert classes == ["cat", "dog", "fox"]
    assert paths == sorted(paths) and len(set(paths)) == 24
    assert [classes[i] for i in labels] == [p.split("/")[0] for p in paths]
    for p, (size, mtime) in zip(paths, fps):
        st = (image_folder / p).stat()
        assert (size, mtime) == (st.st_size, st.st_mtime_ns)

    with open_cache(out) as c:
        assert c.n_samples == 24 and c.embed_dim == 32 and c.classes == classes and c.paths == paths
        assert c.root == image_folder.resolve() and c.metadata["transform"] == bb.preprocess.to_dict()
        assert not c.has_split("train") and (c.splits == -1).all()
        rows = np.array([5, 1, 5])
        np.testing.assert_array_equal(c.load_embeddings(rows), c.embeddings[...][rows])
        chunks = list(c.iter_chunks(np.arange(24), 10))
        assert [len(r) for r, _ in chunks] == [10, 10, 4]


def test_split_folders_record_the_split_per_row(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_per_class=2, splits=("train", "val", "test"))
    report = featbank.extract(data, tmp_path / "c.h5", **TINY)
    assert report.n_embedded == 12
    with open_cache(report.path) as c:
        assert c.classes == ["a", "b"]
        for p, s, lab in zip(c.paths, c.splits, c.labels):
            split, cls = p.split("/")[:2]
            assert SPLIT_NAMES[s] == split and c.classes[lab] == cls
        assert c.split_mask("train").sum() == 4 and c.has_split("val") and c.has_split("test")


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    data = tmp_path / "flat"
    data.mkdir()
    for i in range(5):
        Image.new("RGB", (20, 30), (i * 40, 0, 0)).save(data / f"img{i}.png")
    (data / ".hidden.png").write_bytes(b"")  # hidden files are ignored, not skipped
    report = featbank.extract(data, tmp_path / "c.h5", **TINY)
    assert report.n_embedded == 5 and report.skipped == []
    with open_cache(report.path) as c:
        assert c.classes == [] and (c.labels == -1).all() and c.paths == [f"img{i}.png" for i in range(5)]


def test_order_and_class_indices_are_deterministic(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=("zebra", "Apple", "mango"), n_per_class=3)
    a = featbank.extract(data, tmp_path / "a.h5", **TINY).path
    b = featbank.extract(data, tmp_path / "b.h5", **{**TINY, "batch_size": 2}).path
    assert_same_cache(a, b, atol=1e-6)
    with open_cache(a) as c:
        assert c.classes == sorted(["zebra", "Apple", "mango"])


def test_default_location_is_reused(image_folder: Path, _isolated_cache_dir: Path) -> None:
    first = featbank.extract(image_folder, **TINY)
    expected = default_cache_path(image_folder, "test_tiny")
    assert first.path == expected and expected.parent == _isolated_cache_dir / "caches"
    assert find_latest_cache() == expected
    again = featbank.extract(image_folder, **TINY)
    assert again.path == expected and again.up_to_date and again.n_embedded == 0
    assert default_cache_path(image_folder, "test_tiny", dtype="float16") != expected
    one, two = (default_cache_path(image_folder, "test_tiny", weights_file=f) for f in ("a/w.pt", "b/w.pt"))
    assert len({one, two, expected}) == 3 and "-file-w-" in one.name


def test_incremental_add_change_delete(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    featbank.extract(image_folder, out, **TINY)
    # add two (one into a new class that sorts between existing ones), change one, delete one
    Image.new("RGB", (30, 30), (1, 2, 3)).save(image_folder / "cat" / "new.png")
    (image_folder / "emu").mkdir()
    Image.new("RGB", (30, 30), (200, 2, 3)).save(image_folder / "emu" / "e.png")
    changed = image_folder / "dog" / "dog_000.png"
    Image.new("RGB", (40, 48), (9, 200, 9)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    (image_folder / "fox" / "fox_001.jpg").unlink()
    report = featbank.extract(image_folder, out, **TINY)
    assert (report.n_images, report.n_embedded, report.n_reused, report.n_removed) == (25, 3, 22, 2)
    fresh = featbank.extract(image_folder, tmp_path / "fresh.h5", **TINY).path
    assert_same_cache(out, fresh)
    with open_cache(out) as c:
        assert "fox/fox_001.jpg" not in c.paths and c.classes == ["cat", "dog", "emu", "fox"]
    # only-deletions reruns rewrite the file without embedding anything
    (image_folder / "cat" / "new.png").unlink()
    report = featbank.extract(image_folder, out, **TINY)
    assert (report.n_embedded, report.n_removed, report.model_loaded) == (0, 1, False)
    with open_cache(out) as c:
        assert c.n_samples == 24


def test_rerun_with_nothing_changed_leaves_the_file_alone(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    featbank.extract(image_folder, out, **TINY)
    before = sha256(out)
    report = featbank.extract(image_folder, out, **TINY)
    assert report.up_to_date and not report.model_loaded and report.n_reused == 24
    assert "up to date" in report.summary()
    assert sha256(out) == before
    assert not out.with_name(out.name + ".partial").exists()


def test_moved_data_folder_reuses_rows_and_updates_root(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    featbank.extract(image_folder, out, **TINY)
    moved = tmp_path / "moved"
    shutil.copytree(image_folder, moved)  # copy2 keeps mtime_ns, so fingerprints match
    report = featbank.extract(moved, out, **TINY)
    assert report.n_embedded == 0 and report.n_reused == 24
    with open_cache(out) as c:
        assert c.root == moved.resolve()


def test_key_mismatch_refuses_and_leaves_file_untouched(image_folder: Path, tmp_path: Path) -> None:
    from featbank.backbones import TinyConvNet

    out = tmp_path / "c.h5"
    featbank.extract(image_folder, out, **TINY)
    before = sha256(out)
    torch.manual_seed(5)
    wf = tmp_path / "other.pt"
    torch.save(TinyConvNet().state_dict(), wf)
    attempts = [
        ({"backbone": "efficientnet_lite0"}, "backbone"),
        ({"weights_file": wf}, "weights"),
        ({"dtype": "float16"}, "dtype"),
    ]
    for change, what in attempts:
        with pytest.raises(CacheKeyMismatch, match=what) as e:
            featbank.extract(image_folder, out, **{**TINY, **change})
        assert "--overwrite" in str(e.value) and "untouched" in str(e.value)
        assert sha256(out) == before
        assert not out.with_name(out.name + ".partial").exists()
    report = featbank.extract(image_folder, out, **{**TINY, "dtype": "float16", "overwrite": True})
    assert report.n_embedded == 24 and report.n_reused == 0
    with h5py.File(out, "r") as f:
        assert f["embeddings"].dtype == np.float16 and f.attrs["dtype"] == "float16"
        emb16 = f["embeddings"][...].astype(np.float32)
    np.testing.assert_allclose(emb16, direct_embeddings(image_folder, sorted(open_cache(out).paths)), rtol=2e-3, atol=2e-3)


def test_not_a_cache_is_refused_untouched(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    out.write_bytes(b"precious, not HDF5")
    for overwrite in (False, True):  # not a cache: never overwritten, not even with --overwrite
        with pytest.raises(NotACacheError, match="not a featbank cache.*not even with --overwrite"):
            featbank.extract(image_folder, out, **{**TINY, "overwrite": overwrite})
        assert out.read_bytes() == b"precious, not HDF5"
    out.write_bytes(b"")  # an empty file holds nothing to lose
    assert featbank.extract(image_folder, out, **{**TINY, "overwrite": True}).n_embedded == 24
    with pytest.raises(ConfigError, match="directory"):
        featbank.extract(image_folder, tmp_path, **TINY)


def test_bad_image_corpus_is_converted_or_skipped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    expected = make_bad_image_corpus(data, classes=("a", "b", "c"))
    ok = sorted(p for p, e in expected.items() if e == "ok")
    bad = sorted(p for p, e in expected.items() if e == "skip")
    out = tmp_path / "c.h5"
    with pytest.warns(SkippedImagesWarning, match=f"{len(bad)} image"):
        report = featbank.extract(data, out, **TINY)
    assert sorted(p for p, _ in report.skipped) == bad and report.n_skipped == len(bad)
    assert report.n_embedded == len(ok) and f"{len(bad)} skipped" in report.summary()
    with open_cache(out) as c:
        assert c.paths == ok
        assert sorted(p for p, _ in c.skipped) == bad and all(r for _, r in c.skipped)
        reasons = dict(c.skipped)
        np.testing.assert_allclose(c.load_embeddings(), direct_embeddings(data, ok), atol=1e-5)
    with h5py.File(out, "r") as f:
        assert len(f["skipped/paths"]) == len(bad) and f["skipped/fingerprints"].shape == (len(bad), 2)
    bad_dir = [p for p in bad if p.endswith("empty.png")][0]
    assert "empty" in reasons[bad_dir]
    assert "large" in reasons[[p for p in bad if p.endswith("bomb.png")][0]]

    # Skipped files stay skipped on a rerun without being retried; --strict reports them.
    before = sha256(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = featbank.extract(data, out, **TINY)
    assert again.up_to_date and sorted(p for p, _ in again.skipped) == bad and sha256(out) == before
    with pytest.raises(SkippedImagesError, match="strict"):
        featbank.extract(data, out, **{**TINY, "strict": True})

    # A skipped file that is fixed is embedded by the next run.
    fixed = data / bad_dir
    Image.new("RGB", (10, 10), (50, 60, 70)).save(fixed, format="PNG")
    with pytest.warns(SkippedImagesWarning):
        report = featbank.extract(data, out, **TINY)
    assert report.n_embedded == 1 and bad_dir not in [p for p, _ in report.skipped]


def test_strict_raises_after_writing_the_cache(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_per_class=2)
    (data / "a" / "broken.jpg").write_text("not a jpeg")
    out = tmp_path / "c.h5"
    with pytest.raises(SkippedImagesError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        featbank.extract(data, out, **{**TINY, "strict": True})
    assert e.value.exit_code == 3 and "a/broken.jpg" in str(e.value) and "still written" in str(e.value)
    with open_cache(out) as c:
        assert c.n_samples == 4 and c.skipped[0][0] == "a/broken.jpg"


def test_all_images_skipped_gives_an_empty_cache_that_grows(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        (data / c / "x.png").write_bytes(b"")
    out = tmp_path / "c.h5"
    with pytest.warns(SkippedImagesWarning):
        report = featbank.extract(data, out, **TINY)
    assert report.n_embedded == 0 and report.n_skipped == 2
    with open_cache(out) as c:
        assert c.n_samples == 0 and c.embed_dim == 32 and c.load_embeddings().shape == (0, 32)
    Image.new("RGB", (8, 8)).save(data / "a" / "y.png")
    with pytest.warns(SkippedImagesWarning):
        report = featbank.extract(data, out, **TINY)
    assert report.n_embedded == 1 and report.n_reused == 0
    with open_cache(out) as c:
        assert c.paths == ["a/y.png"]


def test_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        featbank.extract(tmp_path / "nope", **TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="No images"):
        featbank.extract(tmp_path / "empty", **TINY)
    one = make_image_folder(tmp_path / "one", classes=("only",), n_per_class=2)
    with pytest.raises(DatasetError, match="one class"):
        featbank.extract(one, **TINY)
    data = make_image_folder(tmp_path / "d", classes=("a", "b"), n_per_class=1)
    for bad in ({"batch_size": 0}, {"dtype": "int8"}, {"engine": "tensorrt"}, {"device": "tpu"}, {"num_workers": -1}):
        with pytest.raises(ConfigError):
            featbank.extract(data, **{**TINY, **bad})


def test_non_utf8_names_are_ignored_not_fatal(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_per_class=2)
    raw = os.fsencode(data / "a") + b"/caf\xe9.png"
    Image.new("RGB", (8, 8)).save(os.fsdecode(raw), format="PNG")
    report = featbank.extract(data, tmp_path / "c.h5", **TINY)
    assert report.n_embedded == 4 and report.skipped == []
    with open_cache(report.path) as c:
        assert all(p.isprintable() for p in c.paths) and len(c.paths) == 4


def test_decode_workers_give_the_same_cache(image_folder: Path, tmp_path: Path) -> None:
    a = featbank.extract(image_folder, tmp_path / "a.h5", **TINY).path
    b = featbank.extract(image_folder, tmp_path / "b.h5", **{**TINY, "num_workers": 2, "batch_size": 5}).path
    assert_same_cache(a, b, atol=1e-6)


@pytest.mark.slow
def test_torch_and_onnxruntime_agree_on_test_tiny(image_folder: Path, tmp_path: Path) -> None:
    a = featbank.extract(image_folder, tmp_path / "t.h5", **TINY)
    b = featbank.extract(image_folder, tmp_path / "o.h5", **{**TINY, "engine": "onnxruntime"})
    assert (a.engine, b.engine) == ("torch", "onnxruntime")
    with open_cache(a.path) as ca, open_cache(b.path) as cb:
        assert cb.metadata["engine"] == "onnxruntime" and ca.metadata["engine"] == "torch"
        assert ca.cache_key == cb.cache_key
        x, y = ca.load_embeddings(), cb.load_embeddings()
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4 * np.abs(x).max())


@pytest.mark.slow
def test_lite0_end_to_end_engines_and_fast_rerun(tmp_path: Path) -> None:
    """The real default weights: torch and onnxruntime agree, and an unchanged rerun is quick."""
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_per_class=5, size=(64, 80))
    lite = dict(num_workers=0, progress=False)
    a = featbank.extract(data, tmp_path / "t.h5", engine="torch", **lite)
    b = featbank.extract(data, tmp_path / "o.h5", engine="onnxruntime", **lite)
    assert a.n_embedded == b.n_embedded == 10 and (a.engine, b.engine) == ("torch", "onnxruntime")
    with open_cache(a.path) as ca, open_cache(b.path) as cb:
        assert ca.metadata["backbone"] == "efficientnet_lite0" and ca.embed_dim == 1280
        x, y = ca.load_embeddings(), cb.load_embeddings()
        assert cb.metadata["engine"] == "onnxruntime"
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4 * np.abs(x).max())
    np.testing.assert_allclose(x, direct_embeddings(data, sorted(open_cache(a.path).paths), "efficientnet_lite0"),
                               rtol=1e-4, atol=1e-4 * np.abs(x).max())
    before = sha256(a.path)
    t0 = time.perf_counter()
    again = featbank.extract(data, a.path, **lite)
    seconds = time.perf_counter() - t0
    print(f"unchanged Lite0 rerun: {seconds:.3f} s")
    assert again.up_to_date and not again.model_loaded and sha256(a.path) == before
    assert seconds < 10


def _interrupt_after(n_calls: int):
    calls = []

    def on_progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) >= n_calls:
            raise KeyboardInterrupt

    return on_progress


def test_interrupt_then_resume_in_process(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    with pytest.raises(Interrupted, match="again to resume"):
        featbank.extract(image_folder, out, **{**TINY, "batch_size": 4, "on_progress": _interrupt_after(2)})
    partials = list(parts_dir(out).glob(".part-*.h5.partial"))
    assert not out.exists() and len(partials) == 1  # the shard in flight, its first 8 rows flushed
    report = featbank.extract(image_folder, out, **{**TINY, "batch_size": 4})
    assert (report.n_embedded, report.n_resumed) == (16, 8) and not partials[0].exists()
    assert_same_cache(out, featbank.extract(image_folder, tmp_path / "ref.h5", **TINY).path)


def test_layers_and_views_report_progress_and_resume_after_interrupt(image_folder: Path, tmp_path: Path) -> None:
    """The layers/views loop reports every batch (a bar at 0% for a whole run otherwise) and so can
    be interrupted between batches; the resumed cache equals an uninterrupted one, views included."""
    args = {**TINY, "batch_size": 4, "layers": "stage1,final", "views": 2, "augment": "dihedral"}
    marks: list[tuple[int, int]] = []
    featbank.extract(image_folder, tmp_path / "ref.h5", **args, on_progress=lambda d, t: marks.append((d, t)))
    assert marks == [(4 * i, 24) for i in range(1, 7)]
    out = tmp_path / "c.h5"
    with pytest.raises(Interrupted, match="again to resume"):
        featbank.extract(image_folder, out, **args, on_progress=_interrupt_after(2))
    assert not out.exists() and len(list(parts_dir(out).glob(".part-*.h5.partial"))) == 1
    report = featbank.extract(image_folder, out, **args)
    assert (report.n_embedded, report.n_resumed) == (16, 8)
    assert_same_cache(out, tmp_path / "ref.h5")
    with open_cache(out) as a, open_cache(tmp_path / "ref.h5") as b:
        for view in (None, 0, 1):
            np.testing.assert_allclose(a.load_features(layers="stage1,final", view=view),
                                       b.load_features(layers="stage1,final", view=view), rtol=0, atol=1e-5)


def test_rows_an_earlier_run_finished_start_the_bar_and_do_not_count_as_speed() -> None:
    """A resumed run's bar starts at the rows already done: its rate and ETA are this run's embedding
    (a resumed ELPV run showed 200 img/s where it embedded 62); on_progress still counts every row."""
    from types import SimpleNamespace as NS

    from featbank.extraction.job import _Progress

    marks: list[tuple[int, int]] = []
    job = NS(config=NS(progress=True), on_progress=lambda d, t: marks.append((d, t)))
    p = _Progress(NS(jobs=[NS(rows=range(100))]), job)
    p.done_before(60)
    time.sleep(0.05)
    p(10)
    fmt = p.bar.format_dict
    p.close()
    assert (fmt["n"], fmt["initial"], marks) == (70, 60, [(60, 100), (70, 100)])
    assert (fmt["n"] - fmt["initial"]) / fmt["elapsed"] < 1000  # 10 rows in >= 0.05 s, not 70


def test_progress_rate_starts_after_the_model_is_loaded() -> None:
    """The bar says the model is loading (a backbone's first run exports its ONNX graph), and its
    clock starts after: the load's seconds are not counted in the rate."""
    from types import SimpleNamespace as NS

    from featbank.extraction.job import _Progress

    p = _Progress(NS(jobs=[NS(rows=range(100))]), NS(config=NS(progress=True), on_progress=None))
    seen = []
    p.while_loading(lambda: (seen.append(p.bar.format_dict["prefix"]), time.sleep(0.3)))
    p(10)
    fmt = p.bar.format_dict
    p.close()
    assert seen == ["extract (loading the model)"] and fmt["prefix"] == "extract" and fmt["n"] == 10
    assert fmt["elapsed"] < 0.3


def test_extract_loads_the_model_only_when_it_has_rows_to_embed(image_folder: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from featbank.extraction import units

    data = tmp_path / "copy"
    shutil.copytree(image_folder, data)
    rep = featbank.extract(data, tmp_path / "c.h5", **{**TINY, "progress": True})
    assert rep.n_embedded > 0 and capsys.readouterr().err.count("extract (loading the model)") == 1
    assert len(units._ENGINES) == 1
    # A deleted image: every other row is copied from the old parts, nothing is embedded, no model loaded.
    next(p for p in sorted(data.rglob("*")) if p.is_file()).unlink()
    rep = featbank.extract(data, tmp_path / "c.h5", **{**TINY, "progress": True})
    assert rep.n_embedded == 0 and rep.n_removed == 1 and not units._ENGINES
    assert "loading the model" not in capsys.readouterr().err


@pytest.mark.slow
def test_overwrite_resume_after_folder_change_with_nothing_to_fold(image_folder: Path, tmp_path: Path) -> None:
    """An interrupted --overwrite run whose finished rows all changed must not fall back on the old key."""
    out = tmp_path / "c.h5"
    featbank.extract(image_folder, out, **TINY)
    before = sha256(out)
    args = {**TINY, "batch_size": 4, "dtype": "float16", "overwrite": True}
    with pytest.raises(Interrupted):
        featbank.extract(image_folder, out, **{**args, "on_progress": _interrupt_after(1)})
    assert sha256(out) == before
    for p in sorted(image_folder.rglob("*.*"))[:4]:  # the rows the interrupted run finished
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    report = featbank.extract(image_folder, out, **args)
    assert report.n_embedded == 24
    with h5py.File(out, "r") as f:
        assert f["embeddings"].dtype == np.float16 and f.attrs["complete"]

