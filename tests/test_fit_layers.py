"""fit on a cache with layers and views: --layers auto|SPEC, views split by image, TTA, evaluate, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import featbank
from featbank.cli.main import cli
from featbank.errors import ConfigError
from featbank.fitting._layers import FeatureTable, resolve_layers
from featbank.fitting._rows import split_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def test_views_never_straddle_the_split(layered) -> None:
    """By construction: the split is made on images, then training images bring all their views."""
    from featbank.fitting.probe import _Plan, _Rows
    from featbank.heads import HeadSpec

    _, path = layered
    with featbank.open_cache(path) as c:
        train, val, test, src = split_rows(c, 0.25, 0)
        table = FeatureTable(c, ("stage1", "final"))
        plan = _Plan(HeadSpec("linear"), _Rows(train, val, test, src, None), None, 0.25, True, table, "auto")
        n = c.n_samples
        fit_rows = plan.expand(train)
        # every training image with its plain view and both augmented views, nothing else
        assert len(fit_rows) == 3 * len(train)
        assert set(table.images_of(fit_rows)) == set(train)
        assert not set(table.images_of(fit_rows)) & (set(val) | set(test))
        # validation rows are plain (slot 0); their views are only read for the TTA choice
        assert val.max() < n
        for k, rows in enumerate(plan.view_rows(val)):
            assert np.array_equal(table.images_of(rows), np.sort(val)) and rows.min() >= (k + 1) * n
        # the virtual rows read back the right view of the right image
        X = table.load_embeddings(plan.view_rows(val[:3])[1])
        assert np.array_equal(X, c.load_features(np.sort(val[:3]), ("stage1", "final"), view=1))
        # without training views only the plain rows train
        assert np.array_equal(FeatureTable(c, ("final",), train_views=False).expand(train), np.sort(train))


@pytest.mark.slow
def test_fit_layers_auto_stores_and_reports_its_choice(layered, tmp_path) -> None:
    _, path = layered
    res = featbank.fit(path, "linear", layers="auto", out=tmp_path / "m")
    feats = json.loads((tmp_path / "m" / "manifest.json").read_text())["features"]
    sel = feats["selection"]
    assert feats["layers"] == sel["layers"] and feats["layers"][-1] == "final"
    assert set(sel["rounds"][0]["candidates"]) == {"stem", "stage1", "stage2"}  # every other layer scored
    assert sel["rounds"][-1]["added"] is None  # it stopped because nothing improved validation
    assert feats["layer_dims"] == {t: {"stem": 40, "stage1": 80, "stage2": 160, "final": 32}[t] for t in feats["layers"]}
    assert "--layers auto chose" in res.summary() and "round 1" in res.summary()
    bundle = featbank.load_bundle(tmp_path / "m")
    assert bundle.features.layers == tuple(feats["layers"])


@pytest.mark.slow
def test_fit_layers_spec_and_tta_and_evaluate_reports_both(layered, tmp_path) -> None:
    _, path = layered
    res = featbank.fit(path, "linear", layers="stage1-final", tta="on", out=tmp_path / "m")
    feats = res.metrics["features"]
    assert feats["layers"] == ["stage1", "stage2", "final"] and feats["tta"] is True and feats["views_used"] == 2
    ev = featbank.evaluate(tmp_path / "m", path)
    assert ev.tta is not None and ev.tta["used"] and ev.tta["n_views"] == 2
    assert ev.metrics["top1"] == pytest.approx(ev.tta["tta"]["top1"])
    assert "Without TTA" in ev.summary()
    assert feats["tta_choice"]["eval_tta_top1"] == pytest.approx(ev.tta["tta"]["top1"])


def test_bad_layers_are_refused(layered) -> None:
    _, path = layered
    with featbank.open_cache(path) as c:
        assert resolve_layers("all", c) == ("stem", "stage1", "stage2", "final")
        assert resolve_layers("final,stage1", c) == ("stage1", "final")
        assert resolve_layers("auto", c) is None
        for bad in ("stage9", "", "stage2-stem", "stage1,,final"):
            with pytest.raises(ConfigError):
                resolve_layers(bad, c)
    res = CliRunner().invoke(cli, ["fit", str(path), "--layers", "stage9"])
    assert res.exit_code == 2, res.output
    assert "stage9" in res.output and "stem, stage1, stage2, final" in res.output
    res = CliRunner().invoke(cli, ["fit", str(path), "--tta", "sometimes"])
    assert res.exit_code == 2


def test_tta_on_needs_views(tiny_cache) -> None:
    with pytest.raises(ConfigError, match="needs augmented views"):
        featbank.fit(tiny_cache, "linear", tta="on", save=False)


@pytest.mark.slow
def test_multi_layer_head_exports_as_one_graph_with_parity(layered, tmp_path, monkeypatch) -> None:
    from featbank.runtime import OnnxClassifier

    monkeypatch.setenv("FEATBANK_CACHE_DIR", str(tmp_path / "fc"))
    data, path = layered
    featbank.fit(path, "linear", layers="stage1,stage2,final", tta="on", out=tmp_path / "m")
    report = featbank.export_model(tmp_path / "m", tmp_path / "m.onnx", check_images=data / "test")
    assert report.parity["passed"] and report.parity["max_abs_diff"] < 1e-4 and report.route == "torch"
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx"))
    assert [i.name for i in graph.graph.input] == ["images"]  # the taps are inside: images in, probabilities out
    images = sorted((data / "test").rglob("*.*"))
    onnx_p = OnnxClassifier(tmp_path / "m.onnx").predict_proba(images)
    py = featbank.predict(tmp_path / "m", images, top_k=3)
    py_p = np.array([[dict(p.top_k)[c] for c in ("cat", "dog", "fox")] for p in py])
    np.testing.assert_allclose(onnx_p, py_p, atol=1e-4)
