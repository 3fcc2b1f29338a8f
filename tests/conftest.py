"""Shared fixtures: an isolated featbank cache dir, tiny real image folders, real caches."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
                        request: pytest.FixtureRequest) -> Path:
    """Every test writes default caches under its own folder, never ~/.cache.

    The backbones' ONNX graphs (``onnx/``, keyed by identity and checked by sha256; extract and
    predict build them, seconds each) are shared by the session's tests, unless a test is marked
    ``own_onnx_cache``: one that breaks a cached graph, or checks which graphs a run built.
    """
    d = tmp_path_factory.mktemp("featbank-cache")
    monkeypatch.setenv("FEATBANK_CACHE_DIR", str(d))
    if request.node.get_closest_marker("own_onnx_cache") is None:
        shared = request.getfixturevalue("onnx_cache_dir") / "onnx"  # where FEATBANK_CACHE_DIR=onnx_cache_dir has them
        shared.mkdir(exist_ok=True)
        (d / "onnx").symlink_to(shared, target_is_directory=True)
    return d


@pytest.fixture
def one_thread():
    """Tiny torch problems: one intra-op thread avoids spin-waiting on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def onnx_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-shared")


@contextlib.contextmanager
def cache_dir_env(path: Path) -> Iterator[None]:
    """FEATBANK_CACHE_DIR=path for module-scoped fixtures (monkeypatch is function-scoped)."""
    old = os.environ.get("FEATBANK_CACHE_DIR")
    os.environ["FEATBANK_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FEATBANK_CACHE_DIR", None)
        else:
            os.environ["FEATBANK_CACHE_DIR"] = old


def make_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    n_per_class: int = 8,
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
    splits: tuple[str, ...] | None = None,
) -> Path:
    """Real PNG/JPEG files whose colour depends on the class, so heads can learn something."""
    rng = np.random.default_rng(seed)
    base = {c: rng.integers(0, 255, 3) for c in classes}
    for split in splits or (None,):
        for c in classes:
            d = root / split / c if split else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                noise = rng.normal(0, 25, (size[0], size[1], 3))
                arr = np.clip(base[c] + noise, 0, 255).astype(np.uint8)
                ext = ".png" if i % 2 == 0 else ".jpg"
                Image.fromarray(arr).save(d / f"{c}_{i:03d}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """An ImageFolder with 3 colour-coded classes x 8 images (PNG and JPEG)."""
    return make_image_folder(tmp_path / "data")


@pytest.fixture
def tiny_cache(image_folder: Path, tmp_path: Path) -> Path:
    """A real cache of ``image_folder`` made by featbank.extract with the test_tiny backbone."""
    import featbank

    out = tmp_path / "cache.h5"
    featbank.extract(image_folder, out, backbone="test_tiny", engine="torch", num_workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def layered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data folder with train/test splits, a test_tiny cache of every layer with 2 dihedral views)."""
    import featbank

    root = tmp_path_factory.mktemp("layers")
    data = make_image_folder(root / "data", n_per_class=8, splits=("train", "test"))
    out = root / "layers.h5"
    featbank.extract(data, out, backbone="test_tiny", engine="torch", num_workers=0, progress=False, layers="all",
                     views=2, augment="dihedral")
    return data, out


def extract_job(out: Path, data: Path | str | None = None, **options):
    """The resolved run (``ExtractJob``) of an extract into ``out`` with ``options``, for tests that drive
    ``featbank.extraction.units.prepare`` and the launchers directly."""
    from featbank.extraction import ExtractConfig
    from featbank.extraction.job import resolve_job

    return resolve_job(ExtractConfig(str(data if data is not None else Path(out).parent), str(out), **options))
