"""Layers and augmented views in the cache: stored, keyed, read back, resumable and incremental."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import featbank
from featbank.backbones import TapModel, load_backbone
from featbank.cache._schema import FEATURE_DEFAULTS, compute_cache_key
from featbank.cli.main import cli
from featbank.errors import CacheKeyMismatch, ConfigError
from featbank.features import DIHEDRAL_ORDER, FeatureSpec, make_views
from featbank.images import load_and_preprocess

try:
    from .conftest import make_image_folder
except ImportError:  # pragma: no cover - pytest without rootdir package
    from conftest import make_image_folder  # type: ignore[no-redef]

TINY = dict(backbone="test_tiny", engine="torch", num_workers=0, progress=False)


def _datasets(path: Path) -> dict[str, np.ndarray]:
    """Every per-row dataset of a cache (paths decoded), for equality checks."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj) -> None:
            if isinstance(obj, h5py.Dataset) and not name.startswith("parts/"):
                out[name] = obj[...]
        f.visititems(visit)
    return out


def _assert_same(a: Path, b: Path) -> None:
    da, db = _datasets(a), _datasets(b)
    assert sorted(da) == sorted(db)
    for name in da:
        if da[name].dtype.kind == "f":
            np.testing.assert_allclose(da[name], db[name], atol=1e-5, rtol=1e-5, err_msg=name)
        else:
            assert np.array_equal(da[name], db[name]), name


def test_plain_key_is_unchanged_by_the_feature_defaults() -> None:
    ident = load_backbone("test_tiny").identity()
    plain = compute_cache_key(ident, "float32", "float32")
    assert compute_cache_key(ident, "float32", "float32", FEATURE_DEFAULTS) == plain
    assert compute_cache_key(ident, "float32", "float32", {**FEATURE_DEFAULTS, "view_seed": 3}) == plain  # no views
    assert compute_cache_key(ident, "float32", "float32", {**FEATURE_DEFAULTS, "layers": ["stem", "final"]}) != plain
    assert compute_cache_key(ident, "float32", "float32", {**FEATURE_DEFAULTS, "views": 1, "augment": "hflip"}) != plain


def test_layers_and_views_are_stored_and_equal_the_tap_model(image_folder, tmp_path) -> None:
    out = tmp_path / "c.h5"
    featbank.extract(image_folder, out, layers="stage1", views=1, augment="hflip", **TINY)
    bb = load_backbone("test_tiny")
    with featbank.open_cache(out) as c:
        assert c.layers == ("stage1", "final") and c.layer_dims == {"stage1": 80, "final": 32}
        assert (c.n_views, c.augment, c.pooling) == (1, "hflip", "gap+2x2")
        plain = c.load_features(layers=("final", "stage1"))
        mirror = c.load_features(layers="stage1,final", view=0)
        imgs = np.stack([load_and_preprocess(c.abspath(p), bb.preprocess) for p in c.paths])
        assert np.array_equal(plain[:, :32], c.load_embeddings())
    model = TapModel(bb, "stage1,final").eval()
    with torch.inference_mode():
        s1, fin = model(torch.from_numpy(imgs))
        m1, mfin = model(torch.from_numpy(np.ascontiguousarray(imgs[:, :, ::-1])))
    model.remove_hooks()
    np.testing.assert_allclose(plain, np.concatenate([fin, s1], 1), atol=1e-5)
    np.testing.assert_allclose(mirror, np.concatenate([m1, mfin], 1), atol=1e-5)
    assert not np.allclose(mirror, plain[:, [*range(32, 112), *range(32)]], atol=1e-3)  # the views differ


def test_max_pooled_layers_from_the_cli_hold_the_maxima_with_either_engine(image_folder, tmp_path) -> None:
    """extract --pooling gap+2x2+max: recorded, keyed apart from gap+2x2, and each layer's columns are
    its gap+2x2 columns then the stage's global and 2x2 maxima, the same from onnxruntime and torch."""
    caches = {}
    for engine in ("onnxruntime", "torch"):
        out = tmp_path / f"{engine}.h5"
        res = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(out), "--backbone", "test_tiny",
                                       "--layers", "stage1", "--pooling", "gap+2x2+max", "--engine", engine,
                                       "--num-workers", "0", "--quiet"])
        assert res.exit_code == 0, res.output
        caches[engine] = out
    _assert_same(caches["onnxruntime"], caches["torch"])  # within 1e-5
    bb = load_backbone("test_tiny")
    with featbank.open_cache(caches["torch"]) as c:
        assert c.pooling == "gap+2x2+max" and c.layer_dims == {"stage1": 160, "final": 32}
        got = c.load_features(layers="stage1")
        imgs = np.stack([load_and_preprocess(c.abspath(p), bb.preprocess) for p in c.paths])
        key = c.cache_key
    with torch.inference_mode():
        feat = bb.features.stage1(bb.features.stem(bb.embedder().prepare(torch.from_numpy(imgs))))
    want = torch.cat([feat.mean((2, 3)), torch.nn.functional.adaptive_avg_pool2d(feat, 2).flatten(1),
                      feat.amax((2, 3)), torch.nn.functional.adaptive_max_pool2d(feat, 2).flatten(1)], 1)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    featbank.extract(image_folder, tmp_path / "avg.h5", layers="stage1", **TINY)
    with featbank.open_cache(tmp_path / "avg.h5") as avg:
        assert avg.cache_key != key  # another pooling is another cache
        np.testing.assert_allclose(got[:, :80], avg.load_features(layers="stage1"), atol=1e-6)


@pytest.mark.slow
@pytest.mark.own_onnx_cache  # it checks which graphs the run built
def test_onnxruntime_engine_gives_the_torch_numbers_for_layers_and_views(image_folder, tmp_path) -> None:
    a, b = tmp_path / "ort.h5", tmp_path / "torch.h5"
    kw = dict(TINY, layers="all", views=2, augment="crops", view_seed=3)
    featbank.extract(image_folder, a, **{**kw, "engine": "onnxruntime"})
    featbank.extract(image_folder, b, **kw)
    with h5py.File(a, "r") as f:
        assert f.attrs["engine"] == "onnxruntime"
    _assert_same(a, b)  # within 1e-5
    # the graph is cached with its taps, apart from the plain embedder's
    from featbank.extraction._engines import onnx_cache_path, tap_identity

    bb = load_backbone("test_tiny")
    assert onnx_cache_path(tap_identity(bb, ("stem", "stage1", "stage2", "final"))).exists()
    assert not onnx_cache_path(bb.identity()).exists()
    # views alone run the plain embedder's graph: no graph of a 'final'-only TapModel is exported
    featbank.extract(image_folder, tmp_path / "views.h5", **{**TINY, "engine": "onnxruntime", "views": 1, "augment": "hflip"})
    assert onnx_cache_path(bb.identity()).exists()
    assert not onnx_cache_path(tap_identity(bb, ("final",))).exists()


def test_views_are_deterministic_per_path_view_and_seed() -> None:
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    crops = FeatureSpec(n_views=3, augment="crops", view_seed=7)
    a = make_views(img, "cat/a.png", crops)
    assert a.shape == (3, 32, 32, 3)
    assert np.array_equal(a, make_views(img, "cat/a.png", crops))
    assert not np.array_equal(a, make_views(img, "cat/b.png", crops))
    assert not np.array_equal(a, make_views(img, "cat/a.png", FeatureSpec(n_views=3, augment="crops", view_seed=8)))
    assert not np.array_equal(a[0], a[1])
    d = make_views(img, "x", FeatureSpec(n_views=7, augment="dihedral"))
    assert np.array_equal(d[0], img[:, ::-1]) and np.array_equal(d[1], img[::-1])
    assert len({v.tobytes() for v in d} | {img.tobytes()}) == 8 == len(DIHEDRAL_ORDER) + 1


@pytest.mark.parametrize(("kw", "words"), [
    (dict(layers="stage9"), ["Unknown layer 'stage9'", "stem, stage1, stage2, final"]),
    (dict(views=2), ["needs --augment"]),
    (dict(views=2, augment="hflip"), ["exactly one view"]),
    (dict(views=8, augment="dihedral"), ["at most 7"]),
    (dict(augment="crops"), ["needs --views K"]),
    (dict(augment="jitter"), ["'augment' parameter must be one of"]),
    (dict(pooling="max", layers="stem"), ["'pooling' parameter must be one of"]),
    (dict(views=-1, augment="crops"), ["'views' parameter must be an integer >= 0"]),
])
def test_bad_layer_or_view_options_are_refused_before_any_work(image_folder, tmp_path, kw, words) -> None:
    out = tmp_path / "c.h5"
    with pytest.raises(ConfigError) as e:
        featbank.extract(image_folder, out, **{**TINY, **kw})
    for w in words:
        assert w in str(e.value)
    assert not out.exists()


def test_cli_layers_and_views_exit_codes(image_folder, tmp_path) -> None:
    out = tmp_path / "c.h5"
    run = CliRunner().invoke
    res = run(cli, ["extract", str(image_folder), "--out", str(out), "-b", "test_tiny", "--layers", "stage9", "-q"])
    assert res.exit_code == 2 and "Unknown layer 'stage9'" in res.output and not out.exists()
    base = ["extract", str(image_folder), "--out", str(out), "-b", "test_tiny", "--engine", "torch", "--num-workers", "0",
            "-q"]
    res = run(cli, [*base, "--layers", "stem,final", "--views", "2", "--augment", "crops"])
    assert res.exit_code == 0, res.output
    res = run(cli, base)
    assert res.exit_code == 2
    assert "the cache holds layers stem,final; you asked final" in res.output
    assert "the cache holds views 2; you asked 0" in res.output


def test_key_refuses_other_layers_or_views_and_leaves_the_cache(image_folder, tmp_path) -> None:
    out = tmp_path / "c.h5"
    featbank.extract(image_folder, out, layers="stage1,final", **TINY)
    before = out.read_bytes()
    for kw, words in [
        (dict(layers="stage2"), "the cache holds layers stage1,final; you asked stage2,final"),
        (dict(layers="stage1", pooling="gap"), "the cache holds pooling gap+2x2; you asked gap"),
        (dict(layers="stage1", views=1, augment="hflip"), "the cache holds views 0; you asked 1"),
        (dict(), "the cache holds layers stage1,final; you asked final"),
    ]:
        with pytest.raises(CacheKeyMismatch) as e:
            featbank.extract(image_folder, out, **{**TINY, **kw})
        assert words in str(e.value) and "left untouched" in str(e.value)
    assert out.read_bytes() == before
    # A plain cache refuses a run with layers, naming them; --overwrite replaces it.
    plain = tmp_path / "plain.h5"
    featbank.extract(image_folder, plain, shard_size=10, **TINY)
    with pytest.raises(CacheKeyMismatch, match="the cache holds layers final; you asked stem,final"):
        featbank.extract(image_folder, plain, layers="stem", **TINY)
    featbank.extract(image_folder, plain, layers="stem", overwrite=True, **TINY)
    with featbank.open_cache(plain) as c:
        assert c.layers == ("stem", "final")


def test_a_v1_cache_refuses_layers_naming_them(tiny_cache, image_folder) -> None:
    before = tiny_cache.read_bytes()
    with pytest.raises(CacheKeyMismatch, match="the cache holds layers final; you asked stage2,final"):
        featbank.extract(image_folder, tiny_cache, layers="stage2", **TINY)
    assert tiny_cache.read_bytes() == before


@pytest.mark.slow
def test_incremental_add_with_views_equals_a_fresh_extraction(tmp_path) -> None:
    data = make_image_folder(tmp_path / "data", n_per_class=6)
    kw = dict(TINY, layers="stem,stage2", views=2, augment="crops", view_seed=5, shard_size=4)
    out = tmp_path / "c.h5"
    featbank.extract(data, out, **kw)
    make_image_folder(tmp_path / "more", n_per_class=9, seed=1)  # 3 new images per class, other pixels
    for c in ("cat", "dog", "fox"):
        for i in range(6, 9):
            name = f"{c}_{i:03d}" + (".png" if i % 2 == 0 else ".jpg")
            os.replace(tmp_path / "more" / c / name, data / c / name)
    (data / "dog" / "dog_000.png").unlink()
    report = featbank.extract(data, out, **kw)
    assert report.n_embedded == 9 and report.n_reused == 17
    fresh = tmp_path / "fresh.h5"
    featbank.extract(data, fresh, **kw)
    _assert_same(out, fresh)


CHILD = r"""
import sys, time
import featbank
from featbank.cache._parts import PartWriter
data, out, marker = sys.argv[1], sys.argv[2], sys.argv[3]
write_rows = PartWriter.write_rows
def slow_write_rows(self, rows, emb, extra=None):
    write_rows(self, rows, emb, extra)
    with open(marker, "a") as f:
        f.write(f"{len(rows)}\n")
    time.sleep(0.15)  # time for the parent to kill us between two batches or inside one
PartWriter.write_rows = slow_write_rows
featbank.extract(data, out, backbone="test_tiny", engine="torch", num_workers=0, progress=False, batch_size=2,
                 layers="stage1", views=3, augment="crops", view_seed=1, shard_size=8)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [3, 7])
def test_sigkill_mid_run_with_views_then_rerun_equals_an_uninterrupted_run(tmp_path, kill_after) -> None:
    data = make_image_folder(tmp_path / "data", n_per_class=6)
    out, marker = tmp_path / "c.h5", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(out), str(marker)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if marker.exists() and len(marker.read_text().split()) >= kill_after:
            time.sleep(0.05)
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not out.exists()  # nothing published yet
    assert list((tmp_path / "c.h5.parts").glob(".part-*.partial"))  # a shard was in flight
    kw = dict(TINY, batch_size=2, layers="stage1", views=3, augment="crops", view_seed=1, shard_size=8)
    report = featbank.extract(data, out, **kw)
    assert report.n_reused + report.n_resumed + report.n_embedded == 18  # each image once: copied, resumed or embedded
    ref = tmp_path / "ref.h5"
    featbank.extract(data, ref, **{**kw, "batch_size": 5})
    _assert_same(out, ref)


# --------------------------------------------------------------------------------------------
# Hostile caches: the layers/views datasets and attributes, changed one at a time with h5py
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("views")
    data = make_image_folder(tmp / "data")
    out = tmp / "c.h5"
    mp = pytest.MonkeyPatch()
    mp.setenv("FEATBANK_CACHE_DIR", str(tmp / "fc"))
    try:
        featbank.extract(data, out, layers="stem,stage1", views=2, augment="dihedral", **TINY)
    finally:
        mp.undo()
    return out


def _copy(src: Path, dst_dir: Path) -> Path:
    """The index and its parts folder, copied (parts keep their mtimes, so the table still matches)."""
    import shutil

    dst = dst_dir / src.name
    shutil.copy2(src, dst)
    shutil.copytree(src.with_name(src.name + ".parts"), dst.with_name(dst.name + ".parts"), copy_function=shutil.copy2)
    return dst


def _replace(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f[name] = data


def _republish(index: Path) -> None:
    """Rewrite the index over its (edited) parts, as a buggy writer would have published them."""
    from featbank.cache._index import read_parts_table, write_index
    from featbank.cache._parts import describe_part, parts_dir

    with h5py.File(index, "r") as f:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        classes = [c.decode() for c in f["classes"][...]]
    parts = [describe_part(parts_dir(index) / p.name) for p in read_parts_table(index)]
    rows = ("embeddings", "labels", "splits", "paths", "fingerprints", "layers/stem", "layers/stage1",
            "views/embeddings", "views/layers/stem", "views/layers/stage1")
    write_index(index, parts, classes, attrs, row_datasets=rows)


def _edit_part(index: Path, name: str, row: int, value: float) -> None:
    part = next(index.with_name(index.name + ".parts").glob("part-*.h5"))
    with h5py.File(part, "r+") as f:
        ds = f[name]
        block = ds[row]
        block.flat[3] = value
        ds[row] = block
    _republish(index)


ATTR_ATTACKS = {
    "layers_not_json": (lambda f: f.attrs.__setitem__("layers", "[stem"), "attribute 'layers'"),
    "layers_not_list": (lambda f: f.attrs.__setitem__("layers", '"stem"'), "attribute 'layers'"),
    "layers_without_final": (lambda f: f.attrs.__setitem__("layers", '["stem", "stage1"]'), "ending with \"final\""),
    "layers_repeated": (lambda f: f.attrs.__setitem__("layers", '["stem", "stem", "final"]'), "distinct"),
    "layers_path_escape": (lambda f: f.attrs.__setitem__("layers", '["../embeddings", "final"]'), "attribute 'layers'"),
    "layer_missing": (lambda f: f.attrs.__setitem__("layers", '["stem", "stage1", "stage2", "final"]'), "layer_dims"),
    "dims_not_json": (lambda f: f.attrs.__setitem__("layer_dims", "{"), "attribute 'layer_dims'"),
    "dims_wrong": (lambda f: f.attrs.__setitem__("layer_dims", '{"stem": 41, "stage1": 80, "final": 32}'),
                   "dataset 'layers/stem' has shape (24, 40)"),
    "dims_negative": (lambda f: f.attrs.__setitem__("layer_dims", '{"stem": -40, "stage1": 80, "final": 32}'),
                      "positive size"),
    "dims_final": (lambda f: f.attrs.__setitem__("layer_dims", '{"stem": 40, "stage1": 80, "final": 33}'),
                   "the 32 values 'embeddings' has"),
    "views_more": (lambda f: f.attrs.__setitem__("views", 3), "has shape (24, 2, 40) and dtype float32, expected (24, 3, 40)"),
    "views_string": (lambda f: f.attrs.__setitem__("views", "2"), "attribute 'views'"),
    "views_negative": (lambda f: f.attrs.__setitem__("views", -1), "attribute 'views'"),
    "views_without_augment": (lambda f: f.attrs.__setitem__("augment", ""), "disagree"),
    "augment_unknown": (lambda f: f.attrs.__setitem__("augment", "rot13"), "disagree"),
    "augment_without_views": (lambda f: (f.attrs.__setitem__("views", 0), f.attrs.__setitem__("augment", "hflip")),
                              "disagree"),
    "pooling_unknown": (lambda f: f.attrs.__setitem__("pooling", "max"), "attribute 'pooling'"),
    "layer_dataset_missing": (lambda f: f.__delitem__("layers/stage1"), "dataset 'layers/stage1' is missing"),
    "layer_dataset_short": (lambda f: _replace(f, "layers/stem", np.zeros((20, 40), np.float32)), "(20, 40)"),
    "layer_dataset_int": (lambda f: _replace(f, "layers/stem", np.zeros((24, 40), np.int32)), "int32"),
    "layer_dataset_1d": (lambda f: _replace(f, "layers/stem", np.zeros(24, np.float32)), "(24,)"),
    "view_dataset_missing": (lambda f: f.__delitem__("views/layers/stem"), "dataset 'views/layers/stem' is missing"),
    "view_dataset_2d": (lambda f: _replace(f, "views/embeddings", np.zeros((24, 32), np.float32)), "(24, 32)"),
    "unlisted_layer": (lambda f: f.__setitem__("layers/evil", np.zeros((24, 4), np.float32)), "'layers/evil'"),
}


@pytest.mark.parametrize("attack", sorted(ATTR_ATTACKS))
def test_open_refuses_layers_and_views_that_disagree(views_cache, tmp_path, attack) -> None:
    from featbank.errors import CacheError

    path = _copy(views_cache, tmp_path)
    mutate, words = ATTR_ATTACKS[attack]
    with h5py.File(path, "r+") as f:
        mutate(f)
    with pytest.raises(CacheError) as e:
        featbank.open_cache(path)
    msg = str(e.value)
    assert words in msg and str(path) in msg and "is damaged" in msg
    res = CliRunner().invoke(cli, ["fit", str(path), "-q"])  # the CLI: exit 2, no traceback
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_a_layer_mapped_onto_a_foreign_file_is_refused(views_cache, tmp_path) -> None:
    from featbank.errors import CacheError

    path = _copy(views_cache, tmp_path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as g:
        g["x"] = np.ones((24, 40), np.float32)
    with h5py.File(path, "r+") as f:
        del f["layers/stem"]
        layout = h5py.VirtualLayout(shape=(24, 40), dtype=np.float32)
        layout[:] = h5py.VirtualSource(str(other), "x", shape=(24, 40))
        f["layers"].create_virtual_dataset("stem", layout)
    with pytest.raises(CacheError, match="'layers/stem' maps rows onto"):
        featbank.open_cache(path)


@pytest.mark.parametrize(("name", "value", "read"), [
    ("layers/stage1", np.nan, dict(layers="stage1")),
    ("layers/stem", np.inf, dict(layers="all")),
    ("views/embeddings", -np.inf, dict(layers="final", view=1)),
    ("views/layers/stage1", np.nan, dict(layers="stem,stage1", view=0)),
    ("layers/stem", 1e30, dict(layers="stem")),
])
def test_nan_inf_or_extreme_values_in_a_layer_are_refused_on_read(views_cache, tmp_path, name, value, read) -> None:
    from featbank.errors import CacheError

    path = _copy(views_cache, tmp_path)
    row = 5
    if name.startswith("views/"):
        # (N, K, D): put the value in the view that is read
        k = read.get("view", 0)
        part = next(path.with_name(path.name + ".parts").glob("part-*.h5"))
        with h5py.File(part, "r+") as f:
            block = f[name][row]
            block[k, 3] = value
            f[name][row] = block
        _republish(path)
    else:
        _edit_part(path, name, row, value)
    with featbank.open_cache(path) as c:  # opening stays cheap: values are checked as rows are read
        assert np.isfinite(c.load_embeddings()).all()
        with pytest.raises(CacheError) as e:
            c.load_features(**read)
        assert f"dataset '{name}'" in str(e.value) and f"row {row}" in str(e.value) and c.paths[row] in str(e.value)
        ok = np.setdiff1d(np.arange(len(c)), [row])
        assert np.isfinite(c.load_features(ok, **read)).all()  # the other rows read fine
        with pytest.raises(CacheError):
            for _ in c.iter_feature_chunks(np.arange(len(c)), 4, **read):
                pass


@pytest.mark.slow
def test_views_do_not_depend_on_processes_workers_or_batch_size(image_folder, tmp_path) -> None:
    kw = dict(TINY, layers="stage1", views=2, augment="crops", view_seed=4)
    one, two, workers = tmp_path / "one.h5", tmp_path / "two.h5", tmp_path / "workers.h5"
    featbank.extract(image_folder, one, **kw)
    featbank.extract(image_folder, two, **{**kw, "procs": 2, "shard_size": 8, "batch_size": 3})
    featbank.extract(image_folder, workers, **{**kw, "num_workers": 2, "batch_size": 7})
    for other in (two, workers):
        a, b = _datasets(one), _datasets(other)
        assert np.array_equal(a["paths"], b["paths"])
        for name in ("embeddings", "layers/stage1", "views/embeddings", "views/layers/stage1"):
            np.testing.assert_allclose(a[name], b[name], atol=1e-6, rtol=1e-6, err_msg=name)  # batch size: last bits
