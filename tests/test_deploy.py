"""export --input raw / --quantize int8 / --triton / --head-only, and the runtime that feeds a raw graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

try:  # tests/ may or may not be a package
    from .conftest import cache_dir_env, make_image_folder
except ImportError:
    from conftest import cache_dir_env, make_image_folder

import featbank
from featbank.errors import BundleError, ConfigError, DatasetError

# Every test here exports a real ONNX graph: the whole module is slow.
pytestmark = pytest.mark.slow


def _fit_bundle(root: Path, name: str = "m") -> Path:
    """A bundle fitted by featbank.fit on a real cache with train and test splits (records its cache)."""
    data = make_image_folder(root / "data", n_per_class=10, size=(40, 56), seed=3, splits=("train", "test"))
    cache = featbank.extract(data, root / "c.h5", backbone="test_tiny", engine="onnxruntime", num_workers=0,
                             progress=False)
    return Path(featbank.fit(cache.path, "linear", out=root / "models" / name).path)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, onnx_cache_dir: Path) -> dict[str, Path]:
    """One bundle exported as preprocessed, raw, head-only; with the Triton repository of the raw one."""
    root = tmp_path_factory.mktemp("deploy")
    with cache_dir_env(onnx_cache_dir):
        bundle = _fit_bundle(root)
        pre = featbank.export_model(bundle, root / "pre.onnx").path
        raw = featbank.export_model(bundle, root / "raw.onnx", input_kind="raw", triton=root / "triton",
                                    model_version=3).path
        head = featbank.export_model(bundle, root / "head.onnx", head_only=True)
    return {"root": root, "bundle": bundle, "pre": pre, "raw": raw, "head": head.path, "data": root / "data",
            "head_summary": head.summary()}


def _odd_images(d: Path) -> list[Path]:
    """Real image files of awkward sizes and modes (made from one smooth picture)."""
    d.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:240, 0:320]
    rgb = np.dstack([xx * 255 // 320, yy * 255 // 240, (xx + yy) * 255 // 560]).astype(np.uint8)
    base = Image.fromarray(rgb)
    files = {
        "grey.png": base.convert("L"),
        "rgba.png": base.convert("RGBA"),
        "tiny.png": base.resize((6, 4)),
        "wide.jpg": base.resize((1500, 16)),
        "tall.png": base.resize((20, 1900)),
        "big.jpg": base.resize((2400, 1800)),
        "cmyk.jpg": base.convert("CMYK"),
    }
    for name, img in files.items():
        img.save(d / name)
    return [d / n for n in files]


def test_raw_export_parity_file_and_metadata(deployed: dict[str, Path]) -> None:
    parity = json.loads(deployed["raw"].with_suffix(".parity.json").read_text())
    raw = parity["raw"]
    assert raw["passed"] and raw["top1_agreement"] >= 0.99 and raw["n_cases"] >= 10
    assert raw["max_abs_diff"] == max(c["max_abs_diff"] for c in raw["cases"])
    assert {"tiny 7x5", "wide 100:1", "tall 1:90", "grey as RGB", "huge 3000x2000"} <= {c["case"] for c in raw["cases"]}
    assert raw["pixel_max_diff"] <= raw["pixel_tolerance"]
    meta = {p.key: p.value for p in onnx.load(str(deployed["raw"])).metadata_props}
    assert meta["input"] == "raw" and meta["model_version"] == "3"
    assert meta["Image.BitmapPixelFormat"] == "Rgb8" and meta["Image.ColorSpaceGamma"] == "SRGB"
    assert meta["Image.NominalPixelRange"] == "NominalRange_0_255"
    assert onnx.load(str(deployed["raw"])).model_version == 3
    pre_meta = {p.key: p.value for p in onnx.load(str(deployed["pre"])).metadata_props}
    assert pre_meta["input"] == "preprocessed"
    x = ort.InferenceSession(str(deployed["raw"])).get_inputs()[0]
    assert x.name == "images" and x.type == "tensor(uint8)" and x.shape[3] == 3 and not isinstance(x.shape[1], int)


def test_raw_graph_through_onnx_classifier_matches_preprocessed(deployed: dict[str, Path], tmp_path: Path) -> None:
    pre, raw = featbank.OnnxClassifier(deployed["pre"]), featbank.OnnxClassifier(deployed["raw"])
    assert raw.input_kind == "raw" and pre.input_kind == "preprocessed"
    files = _odd_images(tmp_path) + sorted(deployed["data"].rglob("*.png"))[:6]
    p_pre, p_raw = pre.predict_proba(files), raw.predict_proba(files)
    assert p_raw.shape == (len(files), pre.n_classes)
    assert (p_raw.argmax(1) == p_pre.argmax(1)).mean() >= 0.99
    assert np.abs(p_raw - p_pre).max() < 0.02
    # preprocess gives the decoded RGB pixels at their own size; equal-size images share a batch
    assert raw.preprocess(files[2]).shape == (4, 6, 3)
    same = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(deployed["data"].rglob("*.png"))[:4]]
    probs, label = raw.run(np.stack(same))
    assert np.abs(probs - raw.predict_proba(same, batch_size=1)).max() < 1e-5 and label.dtype == np.int64


def test_raw_bad_inputs_get_an_error_each_and_the_others_are_classified(deployed: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    clf = featbank.OnnxClassifier(deployed["raw"])
    (tmp_path / "notes.png").write_bytes(b"not an image at all")
    good = sorted(deployed["data"].rglob("*.png"))[0]
    items = [tmp_path / "notes.png", np.zeros((0, 5, 3), np.uint8), np.zeros((1, 20000, 3), np.uint8), good,
             np.zeros((8, 8, 3), np.complex64), np.zeros((8, 8, 5), np.uint8)]
    out = clf.proba_or_error(items)
    assert [isinstance(o, str) for o in out] == [True, True, True, False, True, True]
    assert "notes.png" in out[0] and "(0, 5, 3)" in out[1] and "complex64" in out[4]
    assert "(1, 20000, 3)" in out[2] and "aspect ratio" in out[2]
    assert np.abs(out[3] - clf.predict_proba([good])[0]).max() < 1e-6
    with pytest.raises(DatasetError, match="aspect ratio"):
        clf.predict_proba([np.zeros((1, 20000, 3), np.uint8)])
    with pytest.raises(DatasetError, match=r"uint8 of shape \(N, H, W, 3\)"):
        clf.run(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(DatasetError, match=r"uint8 of shape \(N, H, W, 3\)"):
        clf.run(np.zeros((1, 8, 8, 4), np.uint8))
    with pytest.raises(DatasetError, match="aspect ratio"):
        clf.run(np.zeros((1, 1, 20000, 3), np.uint8))
    # featbank predict on a raw .onnx: the bad file gets its line, the good one its label
    from featbank.cli.main import cli

    r = CliRunner().invoke(cli, ["predict", str(deployed["raw"]), str(tmp_path / "notes.png"), str(good)])
    assert r.exit_code == 0, r.output
    assert "notes.png\tERROR\t" in r.output and f"{good}\t{clf.predict([good])[0].label}\t" in r.output


def test_raw_refused_for_a_windowed_bundle(deployed: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from featbank.cli.main import cli

    copy = tmp_path / "windowed"
    shutil.copytree(deployed["bundle"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["backbone"]["transform"]["window"] = "lung"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    r = CliRunner().invoke(cli, ["export", str(copy), "--input", "raw", "--out", str(tmp_path / "w.onnx")])
    assert r.exit_code == 2, r.output
    assert "window 'lung'" in r.output and "not in the graph" in r.output and "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not (tmp_path / "w.onnx").exists()


def test_triton_repository_parses_with_tritons_schema(deployed: dict[str, Path]) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    folder = deployed["root"] / "triton" / "raw"
    cfg = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "raw" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size >= 1
    assert (folder / "3" / "model.onnx").read_bytes() == deployed["raw"].read_bytes()
    sess = ort.InferenceSession(str(folder / "3" / "model.onnx"))
    (x,) = cfg.input
    assert x.name == sess.get_inputs()[0].name and x.data_type == model_config_pb2.TYPE_UINT8
    assert list(x.dims) == [-1, -1, 3]
    outs = {o.name: o for o in cfg.output}
    clf = featbank.OnnxClassifier(deployed["raw"])
    assert list(outs["probabilities"].dims) == [clf.n_classes] and outs["probabilities"].data_type == model_config_pb2.TYPE_FP32
    assert outs["probabilities"].label_filename == "labels.txt"
    assert outs["label"].data_type == model_config_pb2.TYPE_INT64 and list(outs["label"].reshape.shape) == []
    assert (folder / "labels.txt").read_text().splitlines() == clf.classes
    assert cfg.HasField("dynamic_batching") and len(cfg.instance_group) == 1
    with pytest.raises(text_format.ParseError):  # the schema catches what Triton would refuse
        text_format.Parse((folder / "config.pbtxt").read_text().replace("max_batch_size", "max_batchsize"),
                          model_config_pb2.ModelConfig())


def test_head_only_graph_equals_the_bundle_head(deployed: dict[str, Path]) -> None:
    from featbank.bundles import load_bundle

    bundle = load_bundle(deployed["bundle"])
    sess = ort.InferenceSession(str(deployed["head"]))
    (x,) = sess.get_inputs()
    assert x.name == "embeddings" and x.type == "tensor(float)" and x.shape[1] == bundle.feature_dim
    emb = np.random.default_rng(0).normal(0, 1, (9, bundle.feature_dim)).astype(np.float32)
    probs, label = sess.run(["probabilities", "label"], {"embeddings": emb})
    assert np.abs(probs - bundle.predict_proba(emb)).max() < 1e-4 and np.array_equal(label, probs.argmax(1))
    meta = {p.key: p.value for p in onnx.load(str(deployed["head"])).metadata_props}
    feats = json.loads(meta["features"])
    assert meta["input"] == "embeddings" and feats["layers"] == ["final"] and feats["dim"] == bundle.feature_dim
    assert feats["standardisation"]["standardize"] is True and feats["backbone"] == "test_tiny"
    parity = json.loads(deployed["head"].with_suffix(".parity.json").read_text())
    assert parity["passed"] and parity["n_images"] >= 1 and parity["image_source"] == "validation"
    assert f"Parity check on {parity['n_images']} image(s) (validation)" in deployed["head_summary"]
    with pytest.raises(BundleError, match="head alone"):
        featbank.OnnxClassifier(deployed["head"])


def test_quantize_int8_measures_and_refuses(deployed: dict[str, Path], tmp_path: Path, onnx_cache_dir: Path) -> None:
    from featbank.cli.main import cli

    with cache_dir_env(onnx_cache_dir):
        rep = featbank.export_model(deployed["bundle"], tmp_path / "q.onnx", quantize="int8", max_drop=100,
                                    input_kind="raw")
    q = rep.quantization
    assert q["n_calibration"] == 30 and q["n_test"] == 30 and 0 <= q["int8_top1"] <= 1
    assert q["drop_points"] == pytest.approx(100 * (q["fp32_top1"] - q["int8_top1"]))
    meta = {p.key: p.value for p in onnx.load(str(rep.path)).metadata_props}
    assert json.loads(meta["quantization"]) == q and meta["input"] == "raw"
    ops = {n.op_type for n in onnx.load(str(rep.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert featbank.OnnxClassifier(rep.path).predict_proba(sorted(deployed["data"].rglob("*.png"))[:2]).shape[0] == 2
    # no calibration images: exit 2, nothing written
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["export", str(deployed["bundle"]), "--quantize", "int8", "--calibration",
                                 str(tmp_path / "empty"), "--out", str(tmp_path / "e.onnx")])
    assert r.exit_code == 2 and "No images to calibrate" in r.output and not (tmp_path / "e.onnx").exists()


def test_quantize_refused_beyond_max_drop(deployed: dict[str, Path], tmp_path: Path, onnx_cache_dir: Path) -> None:
    # Calibrating on flat black images gives the activations no range: the int8 model collapses.
    black = tmp_path / "black"
    black.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 56)).save(black / f"b{i}.png")
    with cache_dir_env(onnx_cache_dir), pytest.raises(ConfigError, match="more than --max-drop 0"):
        featbank.export_model(deployed["bundle"], tmp_path / "bad.onnx", quantize="int8", calibration=black,
                              max_drop=0)
    assert not (tmp_path / "bad.onnx").exists() and not list(tmp_path.glob("bad*"))


def test_metadata_conventions_are_validated_on_load(deployed: dict[str, Path], tmp_path: Path) -> None:
    for key, value, field in [("Image.BitmapPixelFormat", "Bgr8", "Image.BitmapPixelFormat"),
                              ("Image.NominalPixelRange", "Normalized_0_1", "Image.NominalPixelRange"),
                              ("model_version", "-1", "model_version"), ("model_version", "01", "model_version"),
                              ("input", "jpeg", "input")]:
        model = onnx.load(str(deployed["raw"]))
        for p in model.metadata_props:
            if p.key == key:
                p.value = value
        if key not in {p.key for p in model.metadata_props}:
            e = model.metadata_props.add()
            e.key, e.value = key, value
        onnx.save(model, str(tmp_path / "m.onnx"))
        with pytest.raises(BundleError, match=f"invalid featbank metadata field '{field}'"):
            featbank.OnnxClassifier(tmp_path / "m.onnx")
    # a raw-labelled graph whose input has a fixed size is refused (the preprocessed graph, relabelled)
    model = onnx.load(str(deployed["pre"]))
    for p in model.metadata_props:
        if p.key == "input":
            p.value = "raw"
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(BundleError, match="input: raw"):
        featbank.OnnxClassifier(tmp_path / "m.onnx")


def test_node_example_classifies_png_and_jpeg_files(deployed: dict[str, Path], tmp_path: Path) -> None:
    import subprocess

    try:
        from .test_runtime import NODE_DIR, _node_ready
    except ImportError:
        from test_runtime import NODE_DIR, _node_ready
    why = _node_ready()
    if why:
        pytest.skip(f"Node.js example not run: {why}")
    clf = featbank.OnnxClassifier(deployed["raw"])
    pngs = _odd_images(tmp_path / "odd")
    pngs = [p for p in pngs if p.suffix == ".png"] + sorted(deployed["data"].rglob("*.png"))[:3]
    jpgs = [p for p in _odd_images(tmp_path / "odd") if p.suffix == ".jpg" and p.stem != "cmyk"]
    jpgs += sorted(deployed["data"].rglob("*.jpg"))[:3]
    (tmp_path / "notes.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    strip = tmp_path / "strip.png"
    Image.new("RGB", (20000, 1)).save(strip)
    files = pngs + jpgs + [tmp_path / "notes.png", strip]
    r = subprocess.run(["node", str(NODE_DIR / "classify.mjs"), str(deployed["raw"]), *map(str, files)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["classes"] == clf.classes
    preds = {p["file"]: p for p in out["predictions"]}
    assert "aspect ratio" in preds[str(strip)]["error"] and "notes.png" in preds[str(tmp_path / "notes.png")]["error"]
    tol = json.loads(deployed["raw"].with_suffix(".parity.json").read_text())["atol"]
    for f in pngs + jpgs:  # the same decoded pixels (sharp decodes JPEG with libjpeg-turbo, as Pillow does)
        assert np.abs(np.array(preds[str(f)]["probabilities"]) - clf.predict_proba([f])[0]).max() <= tol, f
    r = subprocess.run(["node", str(NODE_DIR / "classify.mjs"), str(deployed["pre"]), str(pngs[0])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--input raw" in r.stderr
