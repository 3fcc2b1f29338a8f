"""Hostile ONNX files: every file featbank reads is validated; export never leaves junk or a traceback.

The corpus is built here: a real model (test_tiny backbone + linear head, real `featbank export`),
then copies whose featbank metadata is tampered with the onnx package. Each copy goes through the
real CLI (`featbank predict`) and must give exit 2 with a message naming the file, the field and
the value, while the untampered model beside it still predicts.
"""

from __future__ import annotations

import contextlib
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
from PIL import Image

try:  # tests/ may or may not be a package
    from .conftest import make_image_folder
except ImportError:
    from conftest import make_image_folder

import featbank
from featbank.cli.main import cli

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _cache_dir_env(path: Path):
    old = os.environ.get("FEATBANK_CACHE_DIR")
    os.environ["FEATBANK_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FEATBANK_CACHE_DIR", None)
        else:
            os.environ["FEATBANK_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, onnx_cache_dir: Path) -> dict[str, Path]:
    """A real bundle, its real export and a folder of images, made once for the module."""
    root = tmp_path_factory.mktemp("hostile-onnx")
    data = make_image_folder(root / "data", n_per_class=5, size=(40, 44))
    with _cache_dir_env(onnx_cache_dir):
        cache = featbank.extract(data, root / "c.h5", backbone="test_tiny", engine="onnxruntime", num_workers=0,
                                 progress=False)
        bundle = featbank.fit(cache.path, "linear", out=root / "models", name="lin").path
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
    ("classes-huge", {"classes": json.dumps([f"c{i}" for i in range(100_001)])}, ["classes", "100001"]),
    ("classes-missing", {"classes": None}, ["not a featbank model", "classes"]),
    ("format-version", {"featbank_onnx": "2"}, ["format '2'", "reads format '1'"]),
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
