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
from featbank.extraction._views import DIHEDRAL_ORDER, FeatureOptions, make_views
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


def test_views_are_deterministic_per_path_view_and_seed() -> None:
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    crops = FeatureOptions(views=3, augment="crops", view_seed=7)
    a = make_views(img, "cat/a.png", crops)
    assert a.shape == (3, 32, 32, 3)
    assert np.array_equal(a, make_views(img, "cat/a.png", crops))
    assert not np.array_equal(a, make_views(img, "cat/b.png", crops))
    assert not np.array_equal(a, make_views(img, "cat/a.png", FeatureOptions(views=3, augment="crops", view_seed=8)))
    assert not np.array_equal(a[0], a[1])
    d = make_views(img, "x", FeatureOptions(views=7, augment="dihedral"))
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
    (dict(layers="stem", engine="onnxruntime"), ["torch engine"]),
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
    assert report.n_reused + report.n_embedded == 18
    ref = tmp_path / "ref.h5"
    featbank.extract(data, ref, **{**kw, "batch_size": 5})
    _assert_same(out, ref)
