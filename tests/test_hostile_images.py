"""Images with extreme aspect ratios: refused with a reason, memory bounded, never stopping a batch.

A 118-byte 1x20000 PNG used to make predict peak at 5.5 GB and extract at 8.2 GB (its short side
resized to 256 px gives a 256x5120000 image); 1x100000 ended in MemoryError and the valid image of
the same predict call got no output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featbank
from featbank.cli.main import cli
from featbank.images import (
    MAX_ASPECT_RATIO,
    MAX_RESIZED_PIXELS,
    ImageReadError,
    PreprocessConfig,
    load_and_preprocess,
    load_image,
    preprocess_image,
)

from conftest import make_image_folder

CFG = PreprocessConfig((224, 224), 256, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
STRIPS = {"tall_1x20000.png": (1, 20_000), "wide_100000x1.png": (100_000, 1), "tall_3x1000.png": (3, 1000)}


def _write_strips(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, size in STRIPS.items():
        Image.new("L", size, 200).save(folder / name)
        out.append(folder / name)
    return out


@pytest.mark.parametrize("name", sorted(STRIPS))
def test_extreme_aspect_is_refused_from_the_header(name: str, tmp_path: Path) -> None:
    (path,) = [p for p in _write_strips(tmp_path) if p.name == name]
    with pytest.raises(ImageReadError, match="extreme aspect ratio") as e:
        load_image(path)
    assert f"{MAX_ASPECT_RATIO}:1" in e.value.reason
    w, h = STRIPS[name]
    img = Image.new("RGB", (w, h))
    with pytest.raises(ImageReadError, match="extreme aspect ratio"):  # images handed over in memory too
        preprocess_image(img, CFG)


def test_bounds_are_inclusive_and_resize_target_is_capped(tmp_path: Path) -> None:
    ok = tmp_path / "ok.png"
    Image.new("RGB", (2, 2 * MAX_ASPECT_RATIO)).save(ok)
    assert load_and_preprocess(ok, CFG).shape == (224, 224, 3)
    huge = PreprocessConfig((224, 224), 60_000, "bilinear", (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ImageReadError, match=f"resize target too large.*limit {MAX_RESIZED_PIXELS}"):
        preprocess_image(Image.new("RGB", (10, 20)), huge)


def test_peak_memory_stays_bounded_in_a_subprocess(tmp_path: Path) -> None:
    """ru_maxrss of a fresh process decoding 1x100000 and 1x20000 strips (was 1.5-5.5 GB)."""
    paths = _write_strips(tmp_path)
    code = (
        "import resource, sys\n"
        "from featbank.images import PreprocessConfig, load_and_preprocess, ImageReadError\n"
        "cfg = PreprocessConfig((224, 224), 256, 'bicubic', (0.5,)*3, (0.5,)*3)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        load_and_preprocess(p, cfg)\n"
        "    except ImageReadError:\n"
        "        pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    grown_mb = int(r.stdout.strip()) / 1024  # ru_maxrss is in KiB on Linux
    assert grown_mb < 100, f"decoding the strips grew the process by {grown_mb:.0f} MB"


def test_extract_skips_them_with_a_reason(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_per_class=3)
    _write_strips(data / "a")
    rep = featbank.extract(data, tmp_path / "c.h5", backbone="test_tiny", engine="torch", num_workers=0,
                           progress=False)
    reasons = dict(rep.skipped)
    assert set(reasons) == {"a/tall_1x20000.png", "a/wide_100000x1.png", "a/tall_3x1000.png"}
    assert all("extreme aspect ratio" in r for r in reasons.values())
    with featbank.open_cache(rep.path) as c:
        assert c.n_samples == 6 and dict(c.skipped) == reasons


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, onnx_cache_dir: Path) -> tuple[Path, Path, Path]:
    """(bundle, exported .onnx, image folder) of a linear head on test_tiny."""
    from test_export import make_bundle

    from featbank.heads import LinearHead

    from conftest import cache_dir_env

    root = tmp_path_factory.mktemp("hostile-images")
    data = make_image_folder(root / "data", n_per_class=4, seed=3)
    with cache_dir_env(onnx_cache_dir):
        bundle = make_bundle(root, data, LinearHead(C=1.0), name="hi-linear")
        onnx = featbank.export_model(bundle, root / "hi.onnx").path
    return bundle, onnx, data


@pytest.mark.parametrize("kind", ["bundle", "onnx"])
def test_predict_keeps_going_past_them(kind: str, models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    bundle, onnx, data = models
    model = bundle if kind == "bundle" else onnx
    good = sorted((data / "dog").glob("*.png"))[0]
    strips = _write_strips(tmp_path / "strips")
    images = [strips[0], good, *strips[1:]]
    from featbank.inference import predict

    preds = predict(model, images, batch_size=2, device="cpu")
    assert [p.path for p in preds] == [str(p) for p in images]
    by_path = {p.path: p for p in preds}
    assert by_path[str(good)].error is None and by_path[str(good)].label in ("cat", "dog", "fox")
    for s in strips:
        assert by_path[str(s)].label is None and "extreme aspect ratio" in by_path[str(s)].error
    r = CliRunner().invoke(cli, ["predict", str(model), *map(str, images), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert [g["error"] is None for g in got] == [False, True, False, False]
    r = CliRunner().invoke(cli, ["predict", str(model), *map(str, images), "--device", "cpu"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 0 and len(lines) == 4 and lines[0].split("\t")[1] == "ERROR" and "aspect" in lines[0]


def test_onnx_classifier_names_the_image(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from featbank.errors import DatasetError

    clf = featbank.OnnxClassifier(models[1])
    with pytest.raises(DatasetError, match="extreme aspect ratio"):
        clf.preprocess(np.zeros((1, 5000, 3), np.uint8))
