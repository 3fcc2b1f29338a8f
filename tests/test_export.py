"""featbank export: bundle -> one ONNX graph, parity with PyTorch, metadata, refusals, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

try:  # tests/ may or may not be a package
    from .conftest import cache_dir_env, make_image_folder
except ImportError:
    from conftest import cache_dir_env, make_image_folder

import featbank
from featbank.errors import BundleError, ConfigError, ExportError

REPO = Path(__file__).resolve().parents[1]
# Every test here exports a real ONNX graph or runs a real process: the whole module is slow.
pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------
# Bundles made the way `featbank fit` makes them (real cache, real head, save_bundle)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def shared_onnx_cache(onnx_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One FEATBANK_CACHE_DIR for all tests here, so the embedder ONNX is exported once."""
    monkeypatch.setenv("FEATBANK_CACHE_DIR", str(onnx_cache_dir))
    return onnx_cache_dir


def make_bundle(root: Path, data: Path, head: object, *, backbone: str = "test_tiny",
                name: str = "bundle", val_every: int = 3, exclude_class: int | None = None) -> Path:
    """Extract ``data``, fit ``head`` on the embeddings, write a bundle; every 3rd image is 'validation'."""
    from featbank.bundles import save_bundle, serialize_sklearn
    from featbank.heads import LinearHead, MLPHead, head_state

    cache = featbank.extract(data, root / f"{name}.h5", backbone=backbone, engine="onnxruntime", num_workers=0,
                             progress=False)
    fc = featbank.open_cache(cache.path)
    X = fc.load_embeddings(np.ones(fc.n_samples, bool))
    y = fc.labels
    val = np.arange(fc.n_samples) % val_every == 0
    train = ~val if val_every > 1 else np.ones_like(val)  # val_every=1: fit and check on everything
    if exclude_class is not None:
        train &= y != exclude_class
    head.fit(X[train], y[train])
    manifest = {
        "kind": "head",
        "classes": list(fc.classes),
        "backbone": {k: fc.metadata[k] for k in ("backbone", "weights", "weights_sha256", "transform", "embed_dim")},
        "cache_key": fc.cache_key,
        "validation": {"root": str(fc.root), "paths": [p for p, v in zip(fc.paths, val, strict=True) if v]},
    }
    if isinstance(head, (LinearHead, MLPHead)):
        from safetensors.numpy import save

        tensors, info = head_state(head)
        htype = "linear" if isinstance(head, LinearHead) else "mlp"
        manifest["head"] = {"type": htype, "estimator": type(head).__name__, **info, "file": "head.safetensors"}
        files = {"head.safetensors": save(tensors)}
    else:
        fname, data_bytes, _ = serialize_sklearn(head)
        est = head.steps[-1][1] if hasattr(head, "steps") else head
        manifest["head"] = {"type": "sklearn", "estimator": type(est).__name__, "file": fname,
                            "classes_seen": [int(c) for c in np.unique(y[train])]}
        files = {fname: data_bytes}
    return save_bundle(root / "models" / name, manifest, files)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export-module")


@pytest.fixture(scope="module")
def data_dir(module_tmp: Path) -> Path:
    return make_image_folder(module_tmp / "data", n_per_class=7, size=(40, 52))


@pytest.fixture(scope="module")
def linear_bundle(module_tmp: Path, data_dir: Path, onnx_cache_dir: Path) -> Path:
    from featbank.heads import LinearHead

    with cache_dir_env(onnx_cache_dir):
        return make_bundle(module_tmp, data_dir, LinearHead(C=1.0), name="tiny-linear")


@pytest.fixture(scope="module")
def linear_export(linear_bundle: Path, module_tmp: Path, onnx_cache_dir: Path) -> Path:
    with cache_dir_env(onnx_cache_dir):
        return featbank.export_model(linear_bundle, module_tmp / "out" / "linear.onnx").path


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


def _parity(path: Path) -> dict:
    return json.loads(path.with_name(path.stem + ".parity.json").read_text())


def test_linear_round_trip_parity_and_graph(linear_export: Path, linear_bundle: Path) -> None:
    p = _parity(linear_export)
    assert p["passed"] and p["checked"] and p["image_source"] == "validation"
    assert p["n_images"] == 7 and p["batch_sizes"] == [1, 7]
    assert p["max_abs_diff"] <= 1e-4 and p["top1_agreement"] == 1.0
    sess = ort.InferenceSession(str(linear_export), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [32, 32, 3]
    assert isinstance(inp.shape[0], str)  # dynamic batch axis
    outs = {o.name: o for o in sess.get_outputs()}
    assert list(outs) == ["probabilities", "label"]
    assert outs["probabilities"].type == "tensor(float)" and outs["label"].type == "tensor(int64)"
    # Every batch size, including ones the check did not use.
    rng = np.random.default_rng(0)
    for n in (1, 3, 16):
        x = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
        probs, label = sess.run(None, {"images": x})
        assert probs.shape == (n, 3) and probs.dtype == np.float32 and label.shape == (n,)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(label, probs.argmax(1))


def test_metadata_readable_by_plain_onnxruntime(linear_export: Path, linear_bundle: Path) -> None:
    from featbank.bundles import load_bundle

    meta = ort.InferenceSession(str(linear_export), providers=["CPUExecutionProvider"]).get_modelmeta()
    m = meta.custom_metadata_map
    b = load_bundle(linear_bundle)
    assert m["featbank_onnx"] == "1"
    assert json.loads(m["classes"]) == ["cat", "dog", "fox"]
    pre = json.loads(m["preprocessing"])
    assert pre["input_size"] == [32, 32] and pre["resize_size"] == 36 and pre["interpolation"] == "bilinear"
    assert pre["layout"] == "NHWC uint8 RGB" and len(pre["mean"]) == 3 and len(pre["std"]) == 3
    assert m["backbone"] == "test_tiny" and m["weights_sha256"] == b.backbone["weights_sha256"]
    assert m["cache_key"] == b.cache_key and m["bundle_id"] == b.bundle_id
    assert m["featbank_version"] == featbank.__version__
    assert meta.producer_name == "featbank"


def test_runtime_matches_bundle_on_raw_images(linear_export: Path, linear_bundle: Path, data_dir: Path) -> None:
    """The light runtime (resize + crop + graph) equals torch embedder + Bundle.predict_proba."""
    import torch

    from featbank.backbones import load_backbone
    from featbank.bundles import load_bundle
    from featbank.images import load_and_preprocess

    clf = featbank.OnnxClassifier(linear_export)
    paths = sorted(data_dir.rglob("*.*"))[:9]
    bundle = load_bundle(linear_bundle)
    bb = load_backbone("test_tiny")
    x = np.stack([load_and_preprocess(p, bb.preprocess) for p in paths])
    with torch.inference_mode():
        ref = bundle.predict_proba(bb.embedder()(torch.from_numpy(x)).numpy())
    got = clf.predict_proba(paths, batch_size=4)
    assert np.abs(got - ref).max() < 1e-4
    preds = clf.predict(paths)
    assert [p.index for p in preds] == list(ref.argmax(1))
    assert [p.label for p in preds] == [bundle.classes[i] for i in ref.argmax(1)]


def test_mlp_head_round_trip(module_tmp: Path, data_dir: Path, shared_onnx_cache: Path) -> None:
    from featbank.heads import MLPHead

    head = MLPHead(hidden_sizes=(16,), max_epochs=5, random_state=0)
    bundle = make_bundle(module_tmp, data_dir, head, name="tiny-mlp")
    report = featbank.export_model(bundle, module_tmp / "out" / "mlp.onnx")
    assert report.parity["passed"] and report.parity["max_abs_diff"] <= 1e-4
    assert report.route == "torch+compose"


@pytest.mark.parametrize("kind", ["random_forest", "random_forest_sqrt", "logistic_binary_columns"])
def test_sklearn_heads_round_trip(kind: str, module_tmp: Path, tmp_path: Path, shared_onnx_cache: Path) -> None:
    """A non-linear head through skl2onnx (after featbank's own preprocessing nodes: L2, or the signed square
    root and standardisation), and a linear sklearn head whose classes are a subset."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from featbank.heads import SignedSqrt, make_sklearn_head

    if kind.startswith("random_forest"):
        data = make_image_folder(tmp_path / "data", n_per_class=6, seed=3)
        head = make_sklearn_head("RandomForestClassifier", {"n_estimators": 7, "max_depth": 4}, l2_normalize=True)
        if kind == "random_forest_sqrt":
            head = Pipeline([("sqrt", SignedSqrt()), ("scale", StandardScaler()),
                             ("clf", RandomForestClassifier(n_estimators=7, max_depth=4, random_state=0))])
        route = "skl2onnx+compose"
    else:
        # Class "dog" has no training images: the head sees 2 classes, the bundle has 3 columns.
        data = make_image_folder(tmp_path / "data", n_per_class=6, seed=4)
        head = make_sklearn_head("LogisticRegression", {"C": 0.5})
        route = "torch+compose"
    bundle = make_bundle(tmp_path, data, head, name=kind, exclude_class=None if kind.startswith("random_forest") else 1)
    report = featbank.export_model(bundle, tmp_path / f"{kind}.onnx")
    assert report.route == route
    assert report.parity["passed"], report.parity
    assert report.parity["max_abs_diff"] <= 1e-4 and report.parity["top1_agreement"] == 1.0
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["probabilities", "label"]
    probs, label = sess.run(None, {"images": np.zeros((5, 32, 32, 3), np.uint8)})
    assert probs.shape == (5, 3) and label.dtype == np.int64


def test_finetuned_bundle_round_trip(tmp_path: Path, shared_onnx_cache: Path) -> None:
    import featbank.finetuning as finetune

    data = make_image_folder(tmp_path / "data", n_per_class=6, splits=("train", "val"))
    out = finetune.finetune(data, tmp_path / "models" / "ft", backbone="test_tiny", epochs=1, progress=False)
    bundle = getattr(out, "path", out)
    report = featbank.export_model(bundle, tmp_path / "ft.onnx", check_images=data / "val")
    assert report.route == "torch"
    assert report.parity["passed"] and report.parity["max_abs_diff"] <= 1e-4
    assert featbank.OnnxClassifier(report.path).classes == ["cat", "dog", "fox"]


def test_real_efficientnet_lite0_round_trip(tmp_path: Path, shared_onnx_cache: Path) -> None:
    """The real Lite0 weights on 8 real photos (skimage) and crops of them."""
    skdata = pytest.importorskip("skimage.data")
    from featbank.heads import LinearHead

    data = tmp_path / "photos"
    photos = {"cat": skdata.chelsea(), "coffee": skdata.coffee(), "person": skdata.astronaut(),
              "rocket": skdata.rocket()}
    for name, arr in photos.items():
        (data / name).mkdir(parents=True)
        Image.fromarray(arr).save(data / name / "full.png")
        h, w = arr.shape[:2]
        Image.fromarray(arr[h // 8: h - h // 6, w // 6: w - w // 8]).save(data / name / "crop.jpg")
    bundle = make_bundle(tmp_path, data, LinearHead(C=1.0), backbone="efficientnet_lite0", name="lite0", val_every=1)
    report = featbank.export_model(bundle, tmp_path / "lite0.onnx")
    p = report.parity
    assert p["passed"] and p["n_images"] == 8 and p["max_abs_diff"] <= 1e-4 and p["top1_agreement"] == 1.0
    clf = featbank.OnnxClassifier(report.path)
    assert clf.input_size == (224, 224) and clf.preprocess_config.interpolation == "bicubic"
    preds = clf.predict([data / c / "full.png" for c in sorted(photos)])
    assert [p.label for p in preds] == sorted(photos)  # fitted on these: it must get them right


# --------------------------------------------------------------------------------------------
# Refusals: clear message, nothing at --out
# --------------------------------------------------------------------------------------------


def test_parity_failure_leaves_nothing(linear_bundle: Path, tmp_path: Path, shared_onnx_cache: Path) -> None:
    out = tmp_path / "strict.onnx"
    with pytest.raises(ExportError, match="does not match PyTorch"):
        featbank.export_model(linear_bundle, out, atol=0.0)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_and_incomplete_bundles(linear_bundle: Path, tmp_path: Path, shared_onnx_cache: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(linear_bundle, broken)
    (broken / "head.safetensors").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="sha256"):
        featbank.export_model(broken, tmp_path / "a.onnx")
    (broken / "head.safetensors").unlink()
    with pytest.raises(BundleError, match="incomplete"):
        featbank.export_model(broken, tmp_path / "a.onnx")
    with pytest.raises(BundleError, match="does not exist"):
        featbank.export_model(tmp_path / "nope", tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_no_check_images_is_a_clear_error(linear_bundle: Path, tmp_path: Path, shared_onnx_cache: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(linear_bundle, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["validation"]["root"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="--check-images"):
        featbank.export_model(moved, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="does not exist"):
        featbank.export_model(moved, tmp_path / "m.onnx", check_images=tmp_path / "missing")
    assert not (tmp_path / "m.onnx").exists()


def test_opset_choice(linear_bundle: Path, tmp_path: Path, shared_onnx_cache: Path) -> None:
    with pytest.raises(ConfigError, match="between 18"):
        featbank.export_model(linear_bundle, tmp_path / "o.onnx", opset=13)
    report = featbank.export_model(linear_bundle, tmp_path / "o.onnx", opset=18)
    assert report.opset == 18 and report.parity["passed"]


def test_unexportable_head_says_which_and_why(tmp_path: Path, shared_onnx_cache: Path) -> None:
    from featbank.heads import make_sklearn_head

    data = make_image_folder(tmp_path / "data", n_per_class=4)
    head = make_sklearn_head("SVC", {"kernel": "rbf"})
    bundle = make_bundle(tmp_path, data, head, name="svc")
    with pytest.raises(ExportError, match=r"SVC .*cannot be exported.*predict_proba"):
        featbank.export_model(bundle, tmp_path / "svc.onnx")
    assert not (tmp_path / "svc.onnx").exists()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_export_and_errors(linear_bundle: Path, data_dir: Path, tmp_path: Path, shared_onnx_cache: Path) -> None:
    from featbank.cli.main import cli

    runner = CliRunner()
    out = tmp_path / "cli.onnx"
    r = runner.invoke(cli, ["export", str(linear_bundle), "--out", str(out), "--check-images", str(data_dir / "cat")])
    assert r.exit_code == 0, r.output
    assert "top-1 agreement 100.0%" in r.output and out.is_file()
    assert _parity(out)["image_source"] == "check-images"
    r = runner.invoke(cli, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(cli, ["export", str(linear_bundle), "--out", str(tmp_path / "y.onnx"), "--atol", "0"])
    assert r.exit_code == 2 and "does not match PyTorch" in r.output and not (tmp_path / "y.onnx").exists()
    r = runner.invoke(cli, ["export", str(linear_bundle), "--out", str(tmp_path / "y.onnx"), "--no-check"])
    assert r.exit_code == 0 and "skipped" in r.output
    assert _parity(tmp_path / "y.onnx") == {"checked": False, "passed": None, "reason": "--no-check"}


def test_cli_export_subprocess_exit_code(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a bundle")
    r = subprocess.run([sys.executable, "-m", "featbank.cli.main", "export", str(tmp_path / "model.onnx")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a model bundle folder" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
