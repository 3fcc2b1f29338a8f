"""Hostile ONNX files: every file featbank reads is validated; export never leaves junk or a traceback.

The corpus is built here: a real model (test_tiny backbone + linear head, real `featbank export`),
then copies whose featbank metadata is tampered with the onnx package. Each copy goes through the
real CLI (`featbank predict`) and must give exit 2 with a message naming the file, the field and
the value, while the untampered model beside it still predicts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

try:  # tests/ may or may not be a package
    from .conftest import cache_dir_env, make_image_folder
except ImportError:
    from conftest import cache_dir_env, make_image_folder

import featbank
from featbank.cli.main import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, onnx_cache_dir: Path) -> dict[str, Path]:
    """A real bundle, its real export and a folder of images, made once for the module."""
    root = tmp_path_factory.mktemp("hostile-onnx")
    data = make_image_folder(root / "data", n_per_class=5, size=(40, 44))
    with cache_dir_env(onnx_cache_dir):
        cache = featbank.extract(data, root / "c.h5", backbone="test_tiny", engine="onnxruntime", num_workers=0,
                                 progress=False)
        bundle = featbank.fit(cache.path, "linear", out=root / "models" / "lin").path
        model = featbank.export_model(bundle, root / "good" / "k.onnx").path
    return {"root": root, "data": data, "bundle": Path(bundle), "model": model}


@pytest.fixture
def shared_cache(onnx_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEATBANK_CACHE_DIR", str(onnx_cache_dir))
    return onnx_cache_dir


def tamper(src: Path, dst: Path, changes: dict[str, Any]) -> Path:
    """Copy ``src`` with metadata changed: ``key`` -> raw string, ``preprocessing.x`` -> JSON value,
    ``None`` deletes the key."""
    model = onnx.load(str(src))
    meta = {p.key: p.value for p in model.metadata_props}
    pre = json.loads(meta["preprocessing"])
    for key, value in changes.items():
        if key.startswith("preprocessing."):
            sub = key.split(".", 1)[1]
            if value is None:
                pre.pop(sub, None)
            else:
                pre[sub] = value
            meta["preprocessing"] = json.dumps(pre)
        elif value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    del model.metadata_props[:]
    for k, v in meta.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


# (case id, metadata changes, words the message must contain: field and value)
METADATA_ATTACKS = [
    ("resize-60000", {"preprocessing.resize_size": 60000}, ["resize_size", "60000", "4096"]),
    ("resize-huge", {"preprocessing.resize_size": 10**15}, ["resize_size", str(10**15)]),
    ("resize-zero", {"preprocessing.resize_size": 0}, ["resize_size", "0"]),
    ("resize-string", {"preprocessing.resize_size": "36"}, ["resize_size", "'36'", "integer"]),
    ("resize-float", {"preprocessing.resize_size": 36.5}, ["resize_size", "36.5"]),
    ("resize-bool", {"preprocessing.resize_size": True}, ["resize_size", "True"]),
    ("input-zero", {"preprocessing.input_size": [0, 0]}, ["input_size", "0"]),
    ("input-negative", {"preprocessing.input_size": [-32, 32]}, ["input_size", "-32"]),
    ("input-huge", {"preprocessing.input_size": [100000, 100000]}, ["input_size", "100000"]),
    ("input-one-value", {"preprocessing.input_size": [32]}, ["input_size", "[32]", "[height, width]"]),
    ("input-not-graph", {"preprocessing.input_size": [64, 64]}, ["'images'", "64", "input_size"]),
    ("mean-text", {"preprocessing.mean": ["a", "b", "c"]}, ["mean", "'a'"]),
    ("mean-two", {"preprocessing.mean": [0.5, 0.5]}, ["mean", "[0.5, 0.5]", "3 numbers"]),
    ("mean-range", {"preprocessing.mean": [5, 5, 5]}, ["mean", "[5, 5, 5]"]),
    ("std-zero", {"preprocessing.std": [0, 0, 0]}, ["std", "[0, 0, 0]"]),
    ("std-nan", {"preprocessing.std": [float("nan"), 0.2, 0.2]}, ["std", "nan"]),
    ("interp-unknown", {"preprocessing.interpolation": "evil"}, ["interpolation", "'evil'", "bilinear"]),
    ("pre-missing-key", {"preprocessing.resize_size": None}, ["preprocessing", "lacks resize_size"]),
    ("pre-bad-json", {"preprocessing": "{not json"}, ["preprocessing", "{not json", "JSON"]),
    ("pre-not-object", {"preprocessing": "[1, 2]"}, ["preprocessing", "[1, 2]", "object"]),
    ("classes-shorter", {"classes": '["cat", "dog"]'}, ["'probabilities'", "2 classes", "[N, 2]"]),
    ("classes-longer", {"classes": '["cat", "dog", "fox", "owl"]'}, ["'probabilities'", "4 classes"]),
    ("classes-one", {"classes": '["cat"]'}, ["classes", "['cat']", "2 to"]),
    ("classes-bad-json", {"classes": '["cat", "dog"'}, ["classes", '["cat", "dog"', "JSON"]),
    ("classes-number", {"classes": "5"}, ["classes", "5", "list"]),
    ("classes-string", {"classes": '"abc"'}, ["classes", "'abc'", "list"]),
    ("classes-not-names", {"classes": "[1, 2, 3]"}, ["classes", "[1, 2, 3]", "names"]),
    ("classes-duplicate", {"classes": '["cat", "cat", "dog"]'}, ["classes", "unique", "cat"]),
    ("classes-empty-name", {"classes": '["cat", "", "dog"]'}, ["classes", "non-empty"]),
    ("classes-escape", {"classes": json.dumps(["cat", "\x1b[2Jdog", "fox"])}, ["classes", "\\x1b[2Jdog", "control"]),
    ("classes-huge", {"classes": json.dumps([f"c{i}" for i in range(100_001)])}, ["classes", "100001"]),
    ("classes-missing", {"classes": None}, ["not a featbank model", "classes"]),
    ("format-version", {"featbank_onnx": "2"}, ["format '2'", "reads format '1'"]),
    # The input kind and the image conventions (export --input raw, ONNX metadata Image.* keys)
    ("input-unknown", {"input": "jpeg"}, ["'input'", "'jpeg'", "preprocessed"]),
    ("input-raw-fixed-size", {"input": "raw"}, ["'images'", "input: raw", "any height and width"]),
    ("input-embeddings", {"input": "embeddings"}, ["head alone", "embeddings"]),
    ("pixel-format-bgr", {"Image.BitmapPixelFormat": "Bgr8"}, ["Image.BitmapPixelFormat", "'Bgr8'", "'Rgb8'"]),
    ("gamma-linear", {"Image.ColorSpaceGamma": "Linear"}, ["Image.ColorSpaceGamma", "'Linear'", "'SRGB'"]),
    ("range-normalized", {"Image.NominalPixelRange": "Normalized_0_1"}, ["Image.NominalPixelRange", "Normalized_0_1"]),
    ("version-negative", {"model_version": "-3"}, ["model_version", "'-3'", "positive integer"]),
    ("version-leading-zero", {"model_version": "007"}, ["model_version", "'007'"]),
    ("version-huge", {"model_version": "9" * 30}, ["model_version", "9" * 30]),
    ("version-unicode-digit", {"model_version": "\u0663"}, ["model_version", "positive integer"]),
]


@pytest.mark.parametrize("changes,words", [pytest.param(c, w, id=i) for i, c, w in METADATA_ATTACKS])
def test_tampered_metadata_is_refused_by_predict(corpus: dict[str, Path], tmp_path: Path, changes: dict,
                                                 words: list[str]) -> None:
    bad = tamper(corpus["model"], tmp_path / "bad.onnx", changes)
    image = next((corpus["data"] / "cat").iterdir())
    r = CliRunner().invoke(cli, ["predict", str(bad), str(image)])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output and str(bad) in r.output, r.output
    for word in words:
        assert word in r.output, (word, r.output)
    # The untouched model beside it is unaffected.
    ok = CliRunner().invoke(cli, ["predict", str(corpus["model"]), str(image)])
    assert ok.exit_code == 0 and "\tcat\t" in ok.output, ok.output


def test_valid_model_predicts_valid_image_beside_a_broken_one(corpus: dict[str, Path], tmp_path: Path) -> None:
    image = next((corpus["data"] / "dog").iterdir())
    broken = tmp_path / "broken.png"
    broken.write_bytes(image.read_bytes()[:40])
    r = CliRunner().invoke(cli, ["predict", str(corpus["model"]), str(image), str(broken)])
    assert r.exit_code == 0, r.output
    assert f"{image}\tdog\t" in r.output and f"{broken}\tERROR" in r.output


def test_declared_symbolic_class_axis_is_still_checked(corpus: dict[str, Path], tmp_path: Path) -> None:
    """Declaring the class axis symbolic does not hide the graph's real width (onnxruntime infers it)."""
    model = onnx.load(str(corpus["model"]))
    out = next(o for o in model.graph.output if o.name == "probabilities")
    out.type.tensor_type.shape.dim[1].dim_param = "classes"
    meta = {p.key: p for p in model.metadata_props}
    meta["classes"].value = '["cat", "dog"]'
    bad = tmp_path / "symbolic.onnx"
    onnx.save(model, str(bad))
    image = next((corpus["data"] / "cat").iterdir())
    r = CliRunner().invoke(cli, ["predict", str(bad), str(image)])
    assert r.exit_code == 2 and "'probabilities' is tensor(float) ['batch', 3]" in r.output, r.output
    assert "2 classes" in r.output


def test_files_that_are_not_models(corpus: dict[str, Path], tmp_path: Path) -> None:
    image = next((corpus["data"] / "cat").iterdir())
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(corpus["model"].read_bytes()[:5000])
    text = tmp_path / "text.onnx"
    text.write_text("hello")
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    for bad, words in ((truncated, "Cannot load"), (text, "Cannot load"), (folder, "is a folder, not an ONNX model file")):
        r = CliRunner().invoke(cli, ["predict", str(bad), str(image)])
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output


def test_external_data_outside_the_model_folder_is_refused(corpus: dict[str, Path], tmp_path: Path) -> None:
    """An initializer stored as 'external data' pointing out of the folder must never be read."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"S" * 4096)
    model = onnx.load(str(corpus["model"]))
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    n = len(init.raw_data)
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for loc in ("../secret.bin", str(secret)):
        del init.external_data[:]
        for k, v in (("location", loc), ("offset", "0"), ("length", str(n))):
            e = init.external_data.add()
            e.key, e.value = k, v
        bad = tmp_path / "m" / "ext.onnx"
        bad.parent.mkdir(exist_ok=True)
        bad.write_bytes(model.SerializeToString())
        image = next((corpus["data"] / "cat").iterdir())
        r = CliRunner().invoke(cli, ["predict", str(bad), str(image)])
        assert r.exit_code == 2 and "Cannot load" in r.output, r.output


def test_subprocess_exit_code_and_no_traceback(corpus: dict[str, Path], tmp_path: Path) -> None:
    bad = tamper(corpus["model"], tmp_path / "big.onnx", {"preprocessing.resize_size": 60000})
    image = next((corpus["data"] / "cat").iterdir())
    r = subprocess.run([sys.executable, "-m", "featbank.cli.main", "predict", str(bad), str(image)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert "resize_size" in r.stderr and "60000" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------
# The embedder graph cached under $FEATBANK_CACHE_DIR/onnx: verified on use, rebuilt when broken
# --------------------------------------------------------------------------------------------


def _embeddings(cache_path: Path) -> np.ndarray:
    fc = featbank.open_cache(cache_path)
    return fc.load_embeddings(np.ones(fc.n_samples, bool))


@pytest.mark.slow  # real processes and ONNX exports: ~10-20 s on a free CPU
@pytest.mark.own_onnx_cache  # it breaks the cached graph
def test_broken_embedder_onnx_is_rebuilt_by_extract_and_export(tmp_path: Path) -> None:
    """FEATBANK_CACHE_DIR is this test's own (conftest): the graph is built here from nothing."""
    from featbank.errors import OnnxCacheRebuiltWarning
    from featbank.extraction._engines import check_embedder_onnx, onnx_cache_path

    data = make_image_folder(tmp_path / "data", n_per_class=3, size=(36, 40))
    kw = dict(backbone="test_tiny", engine="onnxruntime", num_workers=0, progress=False)
    fresh = _embeddings(featbank.extract(data, tmp_path / "a.h5", **kw).path)
    graph = onnx_cache_path(featbank.load_backbone("test_tiny").identity())
    assert graph.is_file() and check_embedder_onnx(graph) is None
    good = graph.read_bytes()

    graph.write_bytes(good[: len(good) // 2])  # truncated: today extract silently fell back to torch
    with pytest.warns(OnnxCacheRebuiltWarning, match="truncated"):
        report = featbank.extract(data, tmp_path / "b.h5", **kw)
    assert report.engine == "onnxruntime"  # not the silent fall back to torch
    np.testing.assert_array_equal(_embeddings(report.path), fresh)
    assert check_embedder_onnx(graph) is None and graph.stat().st_size == len(good)

    corrupt = bytearray(good)
    corrupt[len(good) // 2: len(good) // 2 + 64] = b"\xff" * 64  # same size, other bytes
    graph.write_bytes(bytes(corrupt))
    bundle = featbank.fit(tmp_path / "a.h5", "linear", out=tmp_path / "models" / "lin").path
    with pytest.warns(OnnxCacheRebuiltWarning, match="sha256 differs"):
        report = featbank.export_model(bundle, tmp_path / "k.onnx")
    assert report.parity["passed"] and check_embedder_onnx(graph) is None

    graph.with_name(graph.name + ".json").unlink()  # no record (an older featbank, a killed run)
    with pytest.warns(OnnxCacheRebuiltWarning, match="no record"):
        featbank.extract(data, tmp_path / "c.h5", **kw)
    assert check_embedder_onnx(graph) is None
    assert not [p for p in graph.parent.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------------------------
# export's output: checked before the work, exit 2 with the path and the reason, old file intact
# --------------------------------------------------------------------------------------------


@pytest.mark.own_onnx_cache  # it checks that no graph was built
def test_export_refuses_unusable_outputs_before_the_work(corpus: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("my notes")
    old = tmp_path / "old.onnx"
    shutil.copy(corpus["model"], old)
    cases = [
        (tmp_path / "notes.txt" / "k.onnx", "notes.txt' is a file, not a folder"),
        (Path("/proc/k.onnx"), "Cannot write the ONNX model under '/proc'"),
        (Path("/dev/null"), "is not a regular file"),
        (corpus["bundle"] / "manifest.json", "is inside the bundle folder"),  # would overwrite the bundle
        (tmp_path / ("k" * 250 + ".onnx"), "File name too long"),
    ]
    for out, words in cases:
        r = CliRunner().invoke(cli, ["export", str(corpus["bundle"]), "--out", str(out)])
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(cli, ["export", str(old)])
    assert r.exit_code == 2 and "already an exported model" in r.output and f"featbank predict {old}" in r.output
    # Refused before the slow part: this test's own FEATBANK_CACHE_DIR got no embedder graph.
    assert not (Path(os.environ["FEATBANK_CACHE_DIR"]) / "onnx").exists()
    assert (tmp_path / "notes.txt").read_text() == "my notes" and old.read_bytes() == corpus["model"].read_bytes()
    assert json.loads((corpus["bundle"] / "manifest.json").read_text())["kind"] == "head"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "old.onnx"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_export_into_read_only_folder_says_so(corpus: dict[str, Path], tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = CliRunner().invoke(cli, ["export", str(corpus["bundle"]), "--out", str(ro / "k.onnx")])
    finally:
        ro.chmod(0o755)
    assert r.exit_code == 2 and "permission denied" in r.output and "opset" not in r.output, r.output


def _export_cmd(bundle: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "featbank.cli.main", "export", str(bundle), "--out", str(out), *extra]


@pytest.mark.slow  # real processes and ONNX exports: ~10-20 s on a free CPU
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE stands in for a full disk")
def test_disk_full_during_export_keeps_the_old_file(corpus: dict[str, Path], tmp_path: Path,
                                                    shared_cache: Path) -> None:
    import resource

    out = tmp_path / "k.onnx"
    shutil.copy(corpus["model"], out)
    before = out.read_bytes()
    limit = len(before) // 2  # the embedder graph is cached already; the new model cannot be written

    def small_disk() -> None:  # Python ignores SIGXFSZ, so writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run(_export_cmd(corpus["bundle"], out), capture_output=True, text=True, timeout=600, cwd=REPO,
                       preexec_fn=small_disk)
    assert r.returncode == 2, r.stderr
    assert str(out) in r.stderr and "File too large" in r.stderr and "unchanged" in r.stderr
    assert "Traceback" not in r.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.onnx"]


@pytest.mark.slow  # real processes and ONNX exports: ~10-20 s on a free CPU
def test_killed_export_leaves_temporaries_that_the_next_export_removes(corpus: dict[str, Path], tmp_path: Path,
                                                                       shared_cache: Path) -> None:
    out = tmp_path / "k.onnx"
    shutil.copy(corpus["model"], out)
    before = out.read_bytes()
    orphans: list[Path] = []
    for _ in range(5):  # the temporary lives for the parity check; catch it there and SIGKILL
        proc = subprocess.Popen(_export_cmd(corpus["bundle"], out, "--check-images", str(corpus["data"])),
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if [p for p in tmp_path.iterdir() if p.name.startswith(".k.onnx.tmp-")]:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
        orphans = [p for p in tmp_path.iterdir() if p.name.startswith(".k.onnx.tmp-")]
        if orphans:
            break
    assert orphans, "the export finished before it could be killed five times"
    assert out.read_bytes() == before  # the killed run never touched the published file
    r = CliRunner().invoke(cli, ["export", str(corpus["bundle"]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], list(tmp_path.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.onnx", "k.parity.json"]


# --------------------------------------------------------------------------------------------
# Messages that say what works
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # fits and exports seven heads
def test_svc_refusal_suggests_only_heads_that_export(tmp_path: Path, shared_cache: Path) -> None:
    import re

    from featbank.errors import ExportError

    # Enough images per class for CalibratedClassifierCV's default 5-fold calibration.
    data = make_image_folder(tmp_path / "data", n_per_class=9, size=(36, 40))
    cache = featbank.extract(data, tmp_path / "c.h5", backbone="test_tiny", engine="onnxruntime", num_workers=0,
                             progress=False).path
    svc = featbank.fit(cache, "SVC", out=tmp_path / "models" / "svc").path
    with pytest.raises(ExportError) as info:
        featbank.export_model(svc, tmp_path / "svc.onnx")
    message = str(info.value)
    assert "logistic|" not in message and "CalibratedClassifierCV(SVC())" not in message
    suggestions = re.findall(r"--head (\w+(?: --param \w+=\w+)?)", message)
    suggestions += re.search(r"\(or --head ([^)]*)\)", message).group(1).split(", ")
    assert {"linear", "mlp", "SVC --param probability=True", "CalibratedClassifierCV"} <= set(suggestions)
    for i, head in enumerate(dict.fromkeys(suggestions)):
        args = ["fit", str(cache), "--head", *head.split(), "-o", str(tmp_path / "models" / f"h{i}")]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, (head, r.output)
        r = CliRunner().invoke(cli, ["export", str(tmp_path / "models" / f"h{i}"), "--out", str(tmp_path / f"h{i}.onnx")])
        assert r.exit_code == 0 and "top-1 agreement 100.0%" in r.output, (head, r.output)


@pytest.mark.slow  # one real export
def test_export_writes_through_a_symlink_and_keeps_the_mode(corpus: dict[str, Path], tmp_path: Path,
                                                          shared_cache: Path) -> None:
    target = tmp_path / "deploy" / "k.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old model")
    target.chmod(0o640)
    link = tmp_path / "current.onnx"
    link.symlink_to(target)
    r = CliRunner().invoke(cli, ["export", str(corpus["bundle"]), "--out", str(link)])
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and target.read_bytes() != b"old model"
    assert featbank.OnnxClassifier(link).classes == ["cat", "dog", "fox"]
    assert target.stat().st_mode & 0o777 == 0o640


def test_graph_that_fails_when_run_is_exit_2(corpus: dict[str, Path], tmp_path: Path) -> None:
    """A graph that loads and matches its metadata but fails inside onnxruntime: no traceback."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["f", "shape"], ["probabilities"]),  # 3072 values into [1, 3]: fails
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])],
        [numpy_helper.from_array(np.array([1, 3], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    good = onnx.load(str(corpus["model"]))
    for p in good.metadata_props:
        e = model.metadata_props.add()
        e.key, e.value = p.key, p.value
    bad = tmp_path / "fails.onnx"
    onnx.save(model, str(bad))
    image = next((corpus["data"] / "cat").iterdir())
    r = CliRunner().invoke(cli, ["predict", str(bad), str(image)])
    assert r.exit_code == 2 and "failed to run" in r.output and str(bad) in r.output, r.output
