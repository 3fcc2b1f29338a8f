"""featbank.runtime: the torch-free ONNX runtime, image conversion, refusals, and the Node.js snippet."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

try:  # tests/ may or may not be a package
    from .conftest import make_image_folder
except ImportError:
    from conftest import make_image_folder

from featbank.errors import BundleError, DatasetError

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "scripts" / "node"

# Blocks torch for everything imported after it, as on a service that installed only the runtime.
BLOCK_TORCH = """
import sys
class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _BlockTorch())
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, onnx_cache_dir: Path) -> tuple[Path, Path]:
    """(model.onnx, image folder): a real export of a linear head on test_tiny."""
    try:
        from .conftest import cache_dir_env
        from .test_export import make_bundle
    except ImportError:
        from test_export import make_bundle

        from conftest import cache_dir_env

    import featbank
    from featbank.heads import LinearHead

    root = tmp_path_factory.mktemp("runtime")
    data = make_image_folder(root / "data", n_per_class=5, seed=7)
    with cache_dir_env(onnx_cache_dir):
        bundle = make_bundle(root, data, LinearHead(C=1.0), name="rt-linear")
        return featbank.export_model(bundle, root / "rt.onnx").path, data


def _odd_images(d: Path) -> list[Path]:
    """One image per awkward mode and size."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    files = {
        "grey.png": Image.fromarray(rgb[:, :, 0], "L"),
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[:, :, :1]]), "RGBA"),
        "palette.gif": Image.fromarray(rgb).convert("P"),
        "sixteen.png": Image.fromarray(rgb[:, :, 1].astype(np.uint16) * 257),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "tiny.png": Image.fromarray(rgb[:3, :5]),
        "tall.jpg": Image.fromarray(np.repeat(rgb, 8, axis=0)[:, :20]),
    }
    out = []
    for name, img in files.items():
        img.save(d / name)
        out.append(d / name)
    return out


@pytest.mark.slow
def test_runtime_imports_and_predicts_without_torch(exported: tuple[Path, Path], tmp_path: Path) -> None:
    import featbank

    model, data = exported
    paths = sorted(str(p) for p in data.rglob("*.*"))[:6] + [str(p) for p in _odd_images(tmp_path / "odd")]
    code = BLOCK_TORCH + f"""
import json
import featbank.runtime as rt
clf = rt.OnnxClassifier({str(model)!r})
probs = clf.predict_proba({paths!r}, batch_size=4)
bad = [m for m in sys.modules if m == "torch" or m.startswith(("torch.", "featbank.backbones", "featbank.extraction"))]
print(json.dumps({{"probs": probs.tolist(), "bad": bad, "labels": [p.label for p in clf.predict({paths!r})]}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bad"] == []
    ref = featbank.OnnxClassifier(model).predict_proba(paths)
    np.testing.assert_allclose(np.array(out["probs"]), ref, atol=1e-6)
    assert len(out["labels"]) == len(paths) and set(out["labels"]) <= {"cat", "dog", "fox"}


@pytest.mark.slow
def test_any_mode_size_and_array_input(exported: tuple[Path, Path], tmp_path: Path) -> None:
    import featbank

    model, data = exported
    clf = featbank.OnnxClassifier(model)
    assert clf.classes == ["cat", "dog", "fox"] and clf.input_size == (32, 32)
    odd = _odd_images(tmp_path)
    probs = clf.predict_proba(odd)
    assert probs.shape == (len(odd), 3) and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # Paths, PIL images and arrays of the same pixels give the same answer.
    path = sorted(data.rglob("*.png"))[0]
    img = Image.open(path).convert("RGB")
    arr = np.asarray(img)
    variants = [path, str(path), img, arr, arr.astype(np.float32) / 255.0, arr.astype(np.uint16) * 257]
    p = clf.predict_proba(variants)
    np.testing.assert_allclose(p, np.repeat(p[:1], len(variants), axis=0), atol=1e-6)
    grey = np.asarray(img.convert("L"))
    np.testing.assert_allclose(clf.predict_proba([grey, grey[:, :, None], img.convert("L")]),
                               np.repeat(clf.predict_proba([img.convert("L")]), 3, axis=0), atol=1e-6)
    pred = clf.predict(path)[0]
    assert pred.label == clf.classes[pred.index] and 0 < pred.probability <= 1
    assert clf.predict_proba([]).shape == (0, 3)


@pytest.mark.slow
def test_bad_images_and_inputs(exported: tuple[Path, Path], tmp_path: Path) -> None:
    import featbank

    clf = featbank.OnnxClassifier(exported[0])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match="broken.png"):
        clf.predict_proba([tmp_path / "broken.png"])
    with pytest.raises(DatasetError, match="missing.jpg"):
        clf.predict([tmp_path / "missing.jpg"])
    with pytest.raises(DatasetError, match="shape"):
        clf.predict_proba([np.zeros((4, 4, 2), np.uint8)])
    with pytest.raises(DatasetError, match="PIL.Image or a numpy array"):
        clf.predict_proba([42])
    with pytest.raises(DatasetError, match=r"uint8 of shape \(N, 32, 32, 3\)"):
        clf.run(np.zeros((2, 32, 32, 3), np.float32))
    probs, label = clf.run(np.zeros((3, 32, 32, 3), np.uint8))
    assert probs.shape == (3, 3) and label.dtype == np.int64


def _plain_onnx(path: Path, meta: dict[str, str] | None = None) -> Path:
    x = helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 32, 32, 3])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, ["N", 32, 32, 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["images"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (meta or {}).items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(model, str(path))
    return path


def test_refuses_files_that_are_not_featbank_models(tmp_path: Path) -> None:
    from featbank.runtime import OnnxClassifier

    with pytest.raises(BundleError, match="not a featbank model.*featbank export"):
        OnnxClassifier(_plain_onnx(tmp_path / "plain.onnx"))
    newer = _plain_onnx(tmp_path / "newer.onnx", {"featbank_onnx": "2", "classes": "[]", "preprocessing": "{}"})
    with pytest.raises(BundleError, match="format '2'"):
        OnnxClassifier(newer)
    odd = _plain_onnx(tmp_path / "odd.onnx", {"featbank_onnx": "1", "classes": '["a", "b"]', "preprocessing": json.dumps(
        {"input_size": [32, 32], "resize_size": 36, "interpolation": "bilinear", "mean": [0, 0, 0], "std": [1, 1, 1]})})
    with pytest.raises(BundleError, match="outputs"):
        OnnxClassifier(odd)
    (tmp_path / "junk.onnx").write_bytes(b"this is not protobuf")
    with pytest.raises(BundleError, match="Cannot load"):
        OnnxClassifier(tmp_path / "junk.onnx")
    with pytest.raises(BundleError, match="does not exist"):
        OnnxClassifier(tmp_path / "missing.onnx")


@pytest.mark.slow
def test_cli_predict_onnx_uses_runtime(exported: tuple[Path, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from featbank.cli.main import cli

    if "predict" not in cli.commands:
        pytest.skip("featbank predict is not registered yet")
    model, data = exported
    img = sorted(data.rglob("*.png"))[0]
    r = CliRunner().invoke(cli, ["predict", str(_plain_onnx(tmp_path / "plain.onnx")), str(img)])
    assert r.exit_code == 2 and "not a featbank model" in r.output
    r = CliRunner().invoke(cli, ["predict", str(model), str(img), "--json"])
    assert r.exit_code == 0, r.output
    import featbank

    want = featbank.OnnxClassifier(model).predict([img])[0]
    got = json.loads(r.output)[0]
    assert got["label"] == want.label and abs(got["probability"] - want.probability) < 1e-6


def _node_ready() -> str | None:
    """None when node + onnxruntime-node are usable, else why not."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm are not installed"
    if not all((NODE_DIR / "node_modules" / dep).is_dir() for dep in ("onnxruntime-node", "pngjs", "sharp")):
        r = subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            return f"'npm install --ignore-scripts' (onnxruntime-node, pngjs, sharp) failed: {r.stderr.strip()[-300:]}"
    return None


@pytest.mark.slow
def test_node_snippet_matches_python(exported: tuple[Path, Path], tmp_path: Path) -> None:
    why = _node_ready()
    if why:
        pytest.skip(f"Node.js snippet not run: {why}")
    import featbank

    model, data = exported
    clf = featbank.OnnxClassifier(model)
    paths = sorted(data.rglob("*.*"))[:5]
    batch = np.stack([clf.preprocess(p) for p in paths])
    np.save(tmp_path / "batch.npy", batch)
    raw = tmp_path / "one.rgb"
    raw.write_bytes(batch[0].tobytes())
    r = subprocess.run(["node", str(NODE_DIR / "predict.mjs"), str(model), str(tmp_path / "batch.npy")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["classes"] == clf.classes and out["backbone"] == "test_tiny"
    node_probs = np.array([p["probabilities"] for p in out["predictions"]])
    py_probs = clf.predict_proba(paths)
    assert np.abs(node_probs - py_probs).max() < 1e-5
    assert [p["label"] for p in out["predictions"]] == [p.label for p in clf.predict(paths)]
    r = subprocess.run(["node", str(NODE_DIR / "predict.mjs"), str(model), str(raw)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["predictions"][0]["index"] == int(py_probs[0].argmax())
    r = subprocess.run(["node", str(NODE_DIR / "predict.mjs"), str(_plain_onnx(tmp_path / "plain.onnx")), str(raw)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a featbank ONNX model" in r.stderr
