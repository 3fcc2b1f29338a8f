"""``fit --pool-views``: one row per image, the mean and the max of its features over its views.

Real test_tiny caches with hflip / dihedral / crops views, real fits, bundles, onnxruntime sessions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featbank
from featbank.cli.main import cli
from featbank.errors import BundleError, ConfigError
from featbank.fitting._layers import FeatureTable, pool_views
from featbank.fitting._rows import split_rows

try:
    from ._hostile import copy_bundle, rewrite
except ImportError:  # pragma: no cover - pytest without rootdir package
    from _hostile import copy_bundle, rewrite  # type: ignore[no-redef]

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ("cat", "dog", "fox")


@pytest.fixture(scope="module")
def pooled(layered, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """conftest's data folder and cache (every layer, 2 dihedral views), and a bundle fitted on pooled views."""
    data, cache = layered
    out = tmp_path_factory.mktemp("pool") / "m"
    featbank.fit(cache, "linear", layers="stage1,final", pool_views=True, out=out)
    return {"data": data, "cache": cache, "bundle": out}


def test_pooled_rows_are_the_mean_and_max_over_every_view(pooled) -> None:
    with featbank.open_cache(pooled["cache"]) as c:
        layers = ("stage1", "final")
        table = FeatureTable(c, layers, train_views=True, pooled=True)
        train, val, test, _ = split_rows(c, 0.25, 0)
        # one row per image: nothing expanded, no TTA, twice the width
        assert table.n_samples == c.n_samples and table.n_tta_views == 0 and not table.train_views
        assert np.array_equal(table.expand(train), np.sort(train))
        assert table.embed_dim == 2 * (c.layer_dims["stage1"] + c.layer_dims["final"])
        rows = np.sort(np.concatenate([val, test[:2]]))
        views = np.stack([c.load_features(rows, layers)] + [c.load_features(rows, layers, view=k) for k in range(2)])
        got = table.load_embeddings(rows)
        np.testing.assert_array_equal(got, np.concatenate([views.mean(0), views.max(0)], axis=1))
        # the views really differ, so the max is not the mean
        assert np.abs(got[:, : table.embed_dim // 2] - got[:, table.embed_dim // 2:]).max() > 1e-3
    assert pool_views([np.array([[1.0, 4.0]]), np.array([[3.0, 0.0]])]).tolist() == [[2.0, 2.0, 3.0, 4.0]]


def test_predict_makes_each_view_exactly_as_extraction_stored_it() -> None:
    """The flips and quarter turns of the exported graph are extraction's, view by view (pooling hides the order)."""
    import torch

    from featbank.features import DIHEDRAL_ORDER, FeatureSpec, _dihedral, view_transforms

    spec = FeatureSpec(n_views=7, augment="dihedral")  # all seven dihedral views
    backbone = featbank.load_backbone("test_tiny")
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    views = view_transforms(spec, backbone.preprocess.input_size)
    assert len(views) == 7
    for k, view in enumerate(views):
        want = _dihedral(img, *DIHEDRAL_ORDER[k])
        np.testing.assert_array_equal(view(torch.from_numpy(img)[None]).numpy()[0], want)


def test_pooled_bundle_records_the_pool_and_evaluate_reproduces_fit(pooled) -> None:
    m = json.loads((pooled["bundle"] / "manifest.json").read_text())
    feats = m["features"]
    assert feats["view_pool"] == "mean+max" and feats["n_views"] == 2 and feats["augment"] == "dihedral"
    assert feats["tta"] is False and feats["views_used"] == 0
    bundle = featbank.load_bundle(pooled["bundle"])
    assert bundle.features.dim == 2 * sum(feats["layer_dims"].values())
    ev = featbank.evaluate(pooled["bundle"], pooled["cache"])
    assert ev.tta is None
    assert ev.metrics["top1"] == pytest.approx(m["metrics"]["test"]["top1"])
    assert "pooled (mean+max" in featbank.fit(pooled["cache"], "linear", pool_views=True, save=False).summary()


def test_predict_runs_extracts_engine_on_the_views(pooled, tmp_path, monkeypatch) -> None:
    """predict embeds an image and its views with extract's engine (auto: onnxruntime over the cached ONNX
    graph on CPU; torch when asked), then pools them as fit did: both give the cache rows' probabilities."""
    from featbank.inference import predict_proba

    monkeypatch.setenv("FEATBANK_CACHE_DIR", str(tmp_path / "fc"))
    bundle = featbank.load_bundle(pooled["bundle"])
    with featbank.open_cache(pooled["cache"]) as c:
        rows = np.flatnonzero(c.split_mask("test"))
        layers = bundle.features.layers
        X = pool_views([c.load_features(rows, layers)] + [c.load_features(rows, layers, view=k) for k in range(2)])
        images = [c.abspath(c.paths[r]) for r in rows]
    from_cache = bundle.predict_proba(X)
    graphs = lambda: sorted((tmp_path / "fc").rglob("*.onnx"))  # noqa: E731
    on_torch = predict_proba(pooled["bundle"], images, device="cpu", engine="torch", batch_size=5)
    assert graphs() == []  # torch builds no graph
    on_auto = predict_proba(pooled["bundle"], images, device="cpu")
    assert len(graphs()) == 1  # auto on CPU: the taps' graph, exported once and cached as extract caches it
    on_ort = predict_proba(pooled["bundle"], images, device="cpu", engine="onnxruntime")
    assert len(graphs()) == 1
    np.testing.assert_array_equal(on_ort.proba, on_auto.proba)
    for got in (on_torch, on_auto):
        assert got.ok.all() and got.classes == list(CLASSES)
        np.testing.assert_allclose(got.proba, from_cache, atol=1e-4)
    r = CliRunner().invoke(cli, ["predict", str(pooled["bundle"]), *map(str, images), "--engine", "onnxruntime"])
    assert r.exit_code == 0, r.output
    assert [line.split("\t")[1] for line in r.output.splitlines()] == [CLASSES[i] for i in on_ort.proba.argmax(1)]
    r = CliRunner().invoke(cli, ["predict", str(pooled["bundle"]), str(images[0]), "--engine", "tensorrt"])
    assert r.exit_code == 2 and "'tensorrt' is not one of 'auto', 'torch', 'onnxruntime'" in r.output


@pytest.mark.slow
def test_predict_makes_the_views_of_new_images_and_export_keeps_parity(pooled, tmp_path, monkeypatch) -> None:
    """predict and the ONNX graph turn and flip a new image themselves: they agree with the cache's views."""
    from featbank.runtime import OnnxClassifier

    monkeypatch.setenv("FEATBANK_CACHE_DIR", str(tmp_path / "fc"))
    data, cache = pooled["data"], pooled["cache"]
    bundle = featbank.load_bundle(pooled["bundle"])
    with featbank.open_cache(cache) as c:
        rows = np.flatnonzero(c.split_mask("test"))
        layers = bundle.features.layers
        X = pool_views([c.load_features(rows, layers)] + [c.load_features(rows, layers, view=k) for k in range(2)])
        images = [c.abspath(c.paths[r]) for r in rows]
    from_cache = bundle.predict_proba(X)
    py = featbank.predict(pooled["bundle"], images, top_k=3)
    py_p = np.array([[dict(p.top_k)[k] for k in CLASSES] for p in py])
    np.testing.assert_allclose(py_p, from_cache, atol=1e-4)
    report = featbank.export_model(pooled["bundle"], tmp_path / "m.onnx", check_images=data / "test")
    assert report.parity["passed"] and report.route == "torch"
    np.testing.assert_allclose(OnnxClassifier(tmp_path / "m.onnx").predict_proba(images), py_p, atol=1e-4)
    meta = json.loads(OnnxClassifier(tmp_path / "m.onnx").metadata["features"])
    assert meta["view_pool"] == "mean+max" and meta["n_views"] == 2


@pytest.mark.slow
def test_pooled_svc_exports_through_skl2onnx_with_parity(pooled, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEATBANK_CACHE_DIR", str(tmp_path / "fc"))
    featbank.fit(pooled["cache"], "SVC", params={"C": 1.0, "probability": True}, layers="stage2,final", pool_views=True,
                 out=tmp_path / "s")
    report = featbank.export_model(tmp_path / "s", tmp_path / "s.onnx", check_images=pooled["data"] / "test")
    assert report.parity["passed"] and report.route == "skl2onnx+compose"


def test_pooled_rows_stream_from_disk_like_they_fit_in_memory(pooled) -> None:
    mem = featbank.fit(pooled["cache"], "linear", params={"C": 0.05}, layers="stage1,final", pool_views=True, save=False)
    stream = featbank.fit(pooled["cache"], "linear", params={"C": 0.05}, layers="stage1,final", pool_views=True,
                          save=False, max_memory="20KB")
    assert stream.streaming and not mem.streaming
    assert stream.headline["top1"] == pytest.approx(mem.headline["top1"], abs=0.05)
    with featbank.open_cache(pooled["cache"]) as c:
        X = FeatureTable(c, ("stage1", "final"), pooled=True).load_embeddings(np.arange(c.n_samples))
    np.testing.assert_allclose(stream.estimator.predict_proba(X), mem.estimator.predict_proba(X), atol=2e-3)


def test_pool_views_is_refused_where_it_cannot_work(pooled, tiny_cache, tmp_path) -> None:
    with pytest.raises(ConfigError, match="--pool-views needs hflip or dihedral views.*no augmented views"):
        featbank.fit(tiny_cache, "linear", pool_views=True, save=False)
    with pytest.raises(ConfigError, match="exclude each other"):
        featbank.fit(pooled["cache"], "linear", pool_views=True, tta="on", save=False)
    crops = tmp_path / "crops.h5"
    featbank.extract(pooled["data"], crops, backbone="test_tiny", engine="torch", num_workers=0, progress=False,
                     views=2, augment="crops")
    with pytest.raises(ConfigError, match="holds 2 crops view"):
        featbank.fit(crops, "linear", pool_views=True, save=False)
    res = CliRunner().invoke(cli, ["fit", str(tiny_cache), "--pool-views"])
    assert res.exit_code == 2 and "--pool-views needs" in res.output and "Traceback" not in res.output


def test_a_plain_bundle_edited_to_pool_or_to_many_tta_views_is_refused(layered, tmp_path) -> None:
    _, cache = layered
    featbank.fit(cache, "linear", layers="final", tta="on", out=tmp_path / "tta")
    pooling = rewrite(copy_bundle(tmp_path / "tta", tmp_path / "p"), lambda m: m["features"].update(view_pool="mean+max",
                                                                                                      tta=False))
    with pytest.raises(BundleError, match="reads 32 features but the manifest describes 64"):
        featbank.load_bundle(pooling).load_head()
    nine = rewrite(copy_bundle(tmp_path / "tta", tmp_path / "n"), lambda m: m["features"].update(n_views=9))
    with pytest.raises(BundleError, match="at most 7 dihedral views"):
        featbank.load_bundle(nine)


def test_evaluate_refuses_a_cache_with_fewer_views_than_the_pool_even_without_a_cache_key(pooled, tmp_path) -> None:
    """The cache key covers the views, so a cache with one view is refused before its rows are read."""
    fewer = tmp_path / "d1.h5"  # the bundle pools 2 dihedral views
    featbank.extract(pooled["data"], fewer, backbone="test_tiny", engine="torch", num_workers=0, progress=False,
                     layers="all", views=1, augment="dihedral")
    with pytest.raises(BundleError, match="cache key"):
        featbank.evaluate(pooled["bundle"], fewer)
    keyless = rewrite(copy_bundle(pooled["bundle"], tmp_path / "k"), lambda m: m.update(cache_key=None))
    with pytest.raises(BundleError, match="pools 2 dihedral view"):
        featbank.evaluate(keyless, fewer)


@pytest.mark.parametrize("edit, field", [
    (lambda f: f.update(view_pool="mean+max; import os"), "features.view_pool"),
    (lambda f: f.update(view_pool=["mean+max"]), "features.view_pool"),
    (lambda f: f.update(augment="crops"), "features.augment"),
    (lambda f: f.update(n_views=0), "features.n_views"),
    (lambda f: f.update(n_views=8), "features.n_views"),
    (lambda f: f.update(augment="hflip", n_views=2), "features.n_views"),
    (lambda f: f.update(tta=True), "features.tta"),
    (lambda f: f.pop("view_pool"), "reads 224 features but the manifest describes 112"),
])
def test_a_hostile_pool_in_the_manifest_is_refused_on_load(pooled, tmp_path, edit, field) -> None:
    bad = rewrite(copy_bundle(pooled["bundle"], tmp_path / "bad"), lambda m: edit(m["features"]))
    with pytest.raises(BundleError, match=field.replace(".", r"\.")):
        featbank.load_bundle(bad).load_head()
    res = CliRunner().invoke(cli, ["evaluate", str(bad), str(pooled["cache"])])
    assert res.exit_code == 2 and field in res.output and "Traceback" not in res.output


def test_lp_ft_refuses_a_probe_on_pooled_views(pooled) -> None:
    """finetune --init-head needs a head on the plain final embedding; a pooled one reads twice that width."""
    from featbank.finetuning._model import head_from_probe

    with pytest.raises(BundleError, match="pooled mean\\+max over views.*--no-refit"):
        head_from_probe(pooled["bundle"], featbank.load_backbone("test_tiny"), list(CLASSES))
