"""scripts/prepare_data.py builds real image folders from the installed data packages."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from featbank.images import load_image
from featbank.sources import SPLIT_NAMES, scan_folder

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_data.py"


@pytest.fixture(scope="module")
def prep() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_data"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_digits(prep: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits"
    assert prep.main(["digits", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: prepared, 1797 images" in printed and "  0: 178" in printed
    index = scan_folder(out, require_labels=True)
    assert index.layout == "imagefolder"
    assert index.classes == [str(d) for d in range(10)]
    assert len(index) == 1797
    assert np.bincount(index.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    first = np.asarray(load_image(out / "0" / "0000.png"))
    from sklearn.datasets import load_digits

    expected = np.rint(load_digits().images[0] * 255 / 16).astype(np.uint8)
    assert (first[..., 0] == expected).all() and first.shape == (8, 8, 3)

    marker = json.loads((out / prep.MARKER).read_text())
    assert marker["args"]["dataset"] == "digits" and marker["n_images"] == 1797
    mtime = (out / "0" / "0000.png").stat().st_mtime_ns
    start = time.perf_counter()
    assert prep.main(["digits", str(out)]) == 0
    assert time.perf_counter() - start < 0.5
    assert "already prepared" in capsys.readouterr().out
    assert (out / "0" / "0000.png").stat().st_mtime_ns == mtime


def test_elpv_limit_four_classes(
    prep: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "elpv"
    assert prep.main(["elpv", str(out), "--limit", "40"]) == 0
    printed = capsys.readouterr().out
    assert "prepared, 40 images" in printed and "p000:" in printed
    index = scan_folder(out, require_labels=True)
    assert index.classes == ["p000", "p033", "p067", "p100"]
    assert len(index) == 40
    # Stratified: each class within one image of its share of the full set (1508, 295, 106, 715 of 2624).
    shares = 40 * np.array([1508, 295, 106, 715]) / 2624
    assert np.abs(np.bincount(index.labels) - shares).max() < 1
    probability = {Path(rel).stem: p for rel, p, _ in prep.read_elpv_labels(prep.elpv_data_dir())}
    for rel, label in zip(index.paths, index.labels):
        assert prep._elpv_class(probability[Path(rel).stem], 4) == index.classes[label]
    img = load_image(out / index.paths[0])
    assert img.size == (300, 300)

    assert prep.main(["elpv", str(out), "--limit", "40"]) == 0
    assert "already prepared" in capsys.readouterr().out


@pytest.mark.slow
def test_elpv_two_classes_split_and_jpeg(prep: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "elpv2"
    result = prep.build_elpv(out, n_classes=2, split="70-30", seed=1, limit=60, jpeg_fraction=0.5)
    assert not result.already_prepared
    index = scan_folder(out)
    assert index.layout == "splits"
    assert index.classes == ["defective", "functional"]
    assert len(index) == 60
    assert [int((index.splits == SPLIT_NAMES.index(s)).sum()) for s in ("train", "test")] == [
        42,
        18,
    ]
    assert sum(result.counts.values()) == 60 and set(result.counts) == {
        "train/defective", "train/functional", "test/defective", "test/functional"
    }  # fmt: skip
    jpegs = [p for p in index.paths if p.endswith(".jpg")]
    assert len(jpegs) == 30
    for rel in (jpegs[0], next(p for p in index.paths if p.endswith(".png"))):
        assert load_image(out / rel).size == (300, 300)
    again = prep.build_elpv(
        tmp_path / "again", n_classes=2, split="70-30", seed=1, limit=60, jpeg_fraction=0.5
    )
    assert _files(again.out) == _files(out)
    other = prep.build_elpv(
        tmp_path / "other", n_classes=2, split="70-30", seed=2, limit=60, jpeg_fraction=0.5
    )
    assert _files(other.out) != _files(out)


def test_elpv_two_and_four_classes_share_the_test_images(prep: ModuleType, tmp_path: Path) -> None:
    four = prep.build_elpv(tmp_path / "e4", n_classes=4, split="70-30", seed=0, limit=80)
    two = prep.build_elpv(tmp_path / "e2", n_classes=2, split="70-30", seed=0, limit=80)

    def test_stems(out: Path) -> set[str]:
        return {Path(p).stem for p in (out / "test").rglob("*.png")}

    assert len(test_stems(four.out)) == 24 and test_stems(four.out) == test_stems(two.out)


def test_an_older_script_version_rebuilds_without_force(prep: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "lfw"
    assert prep.main(["lfw", str(out)]) == 0
    marker = out / prep.MARKER
    data = json.loads(marker.read_text())
    data["version"] = prep.PREPARE_VERSION - 1
    marker.write_text(json.dumps(data))
    result = prep.build_lfw(out)
    assert not result.already_prepared
    assert json.loads(marker.read_text())["version"] == prep.PREPARE_VERSION


def test_other_arguments_need_force(
    prep: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lfw"
    assert prep.main(["lfw", str(out)]) == 0
    assert scan_folder(out).classes == ["face", "non_face"]
    assert np.bincount(scan_folder(out).labels).tolist() == [100, 100]
    capsys.readouterr()
    assert prep.main(["lfw", str(out), "--split", "70-30"]) == 2
    err = capsys.readouterr().err
    assert "prepared with other arguments" in err and "--force" in err
    assert scan_folder(out).layout == "imagefolder"  # untouched
    assert prep.main(["lfw", str(out), "--split", "70-30", "--force"]) == 0
    assert scan_folder(out).layout == "splits"
    assert not list(tmp_path.glob(".lfw.partial-*"))


def test_refuses_a_folder_it_did_not_make(
    prep: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert prep.main(["digits", str(out), "--force"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_a_failed_build_leaves_nothing(prep: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "broken"
    good = np.zeros((4, 4), dtype=np.uint8)
    items = [prep.Item(f"{i}", "a", good) for i in range(3)] + [
        prep.Item("bad", "a", np.zeros((2, 2, 7)))
    ]
    with pytest.raises(TypeError):
        prep._prepare(out, {"dataset": "test"}, lambda: items)
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_stale_partial_of_a_dead_process_is_removed(prep: ModuleType, tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".photos.partial-{int(dead.stdout)}"
    (stale / "x").mkdir(parents=True)
    prep.build_photos(tmp_path / "photos")
    assert not stale.exists()


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(
    prep: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 30)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, 28, 28))
        _write_idx(source / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels)
    out = tmp_path / "fmnist"
    assert (
        prep.main(
            [
                "fashion-mnist",
                str(out),
                "--source",
                str(source),
                "--n-train",
                "20",
                "--n-test",
                "10",
            ]
        )
        == 0
    )
    index = scan_folder(out)
    assert index.layout == "splits"
    assert index.classes == list(prep.FASHION_MNIST_CLASSES)
    assert [int((index.splits == SPLIT_NAMES.index(s)).sum()) for s in ("train", "test")] == [
        20,
        10,
    ]
    assert np.bincount(index.labels).tolist() == [3] * 10
    assert load_image(out / index.paths[0]).size == (28, 28)

    capsys.readouterr()
    assert (
        prep.main(["fashion-mnist", str(tmp_path / "x"), "--source", str(tmp_path / "missing")])
        == 2
    )
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_arguments(
    prep: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert prep.main(["elpv", str(tmp_path / "e"), "--limit", "3"]) == 2
    assert "--limit must be at least the number of classes (4); got 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prep.main(["elpv", str(tmp_path / "e"), "--jpeg-fraction", "1.5"])
    with pytest.raises(SystemExit):
        prep.main(["elpv", str(tmp_path / "e"), "--classes", "3"])
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_photos_in_a_real_process(tmp_path: Path) -> None:
    out = tmp_path / "photos"
    cmd = [sys.executable, str(SCRIPT), "photos", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert f"{out}: prepared, 4 images" in first.stdout
    index = scan_folder(out)
    assert index.layout == "flat"
    assert index.paths == ["astronaut.png", "chelsea.png", "coffee.png", "rocket.png"]
    assert load_image(out / "coffee.png").size == (600, 400)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "already prepared" in second.stdout
