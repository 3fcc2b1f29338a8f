"""featbank.inference: one predict / evaluate path for bundles and exported .onnx files alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featbank
from featbank.cli.main import cli
from featbank.errors import CacheError
from featbank.inference import evaluate, predict, predict_proba

from conftest import cache_dir_env, make_image_folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, onnx_cache_dir: Path) -> tuple[Path, Path, Path, Path]:
    """(bundle, its .onnx export, the image folder, the cache the bundle was fitted on)."""
    from test_export import make_bundle

    from featbank.heads import LinearHead

    root = tmp_path_factory.mktemp("inference")
    data = make_image_folder(root / "data", n_per_class=4, seed=5)
    with cache_dir_env(onnx_cache_dir):
        bundle = make_bundle(root, data, LinearHead(C=1.0), name="inf")
        onnx = featbank.export_model(bundle, root / "inf.onnx").path
    return bundle, onnx, data, root / "inf.h5"


@pytest.mark.slow
def test_predict_proba_is_one_path_for_bundles_and_onnx(models: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    bundle, onnx, data, _ = models
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    a = predict_proba(bundle, [data, broken], device="cpu")
    b = predict_proba(onnx, [data, broken])
    assert a.paths == b.paths and a.paths[-1] == broken and len(a.paths) == 13
    assert a.classes == b.classes == ["cat", "dog", "fox"]
    assert a.ok.tolist() == b.ok.tolist() == [True] * 12 + [False]
    assert np.isnan(a.proba[-1]).all() and "not an image" in a.errors[-1] and "not an image" in b.errors[-1]
    np.testing.assert_allclose(a.proba[:-1], b.proba[:-1], atol=1e-4)  # the export's parity tolerance
    np.testing.assert_allclose(a.proba[:-1].sum(1), 1.0, atol=1e-6)
    preds = predict(bundle, [data, broken], top_k=2, device="cpu")
    assert [p.label for p in preds[:-1]] == [a.classes[i] for i in a.proba[:-1].argmax(1)]
    assert all(len(p.top_k) == 2 for p in preds[:-1]) and preds[-1].label is None and preds[-1].error == a.errors[-1]


@pytest.mark.slow
def test_evaluate_an_onnx_model_reads_the_cache_images(models: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    bundle, onnx, data, cache = models
    on_embeddings = evaluate(bundle, cache, split="all")
    on_images = evaluate(onnx, cache, split="all")
    assert on_images.metrics["n_samples"] == on_embeddings.metrics["n_samples"] == 12
    assert on_images.metrics["top1"] == pytest.approx(on_embeddings.metrics["top1"])
    r = CliRunner().invoke(cli, ["evaluate", str(onnx), str(cache), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["metrics"]["top1"] == pytest.approx(on_images.metrics["top1"])
    # An image of the split gone from disk: refused, saying which and what to do.
    copy = shutil.copytree(data, tmp_path / "data")
    moved = featbank.extract(copy, tmp_path / "c.h5", backbone="test_tiny", engine="torch", num_workers=0,
                             progress=False).path
    gone = sorted((copy / "fox").glob("*.png"))[0]
    gone.unlink()
    with pytest.raises(CacheError, match="1 of the 12 images .* could not be read") as e:
        evaluate(onnx, moved)
    assert gone.name in str(e.value)
    r = CliRunner().invoke(cli, ["evaluate", str(onnx), str(moved)])
    assert r.exit_code == 2 and "could not be read" in r.output and "Traceback" not in r.output
