"""load_image on every awkward case, and preprocess_image against torchvision, pixel for pixel."""

from __future__ import annotations

import io
import os
import resource
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from featbank.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageReadError,
    PreprocessConfig,
    load_and_preprocess,
    load_image,
    preprocess_image,
)
from featbank.sources import scan_folder

from _imagecorpus import BOMB_SIDE, make_bad_image_corpus, noise_rgb, png_bytes

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_bad_image_corpus(root)


def _load(path: Path, **kwargs: int) -> Image.Image:
    # Any warning that escapes load_image fails the test.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_image(path, **kwargs)


def _pixels(corpus: tuple[Path, dict[str, str]], name: str) -> np.ndarray:
    img = _load(corpus[0] / name)
    assert img.mode == "RGB"
    return np.asarray(img)


# --------------------------------------------------------------------------- the corpus


def test_corpus_is_cheap_and_deterministic(tmp_path: Path) -> None:
    start = time.perf_counter()
    first = make_bad_image_corpus(tmp_path / "a")
    assert time.perf_counter() - start < 1.0
    second = make_bad_image_corpus(tmp_path / "b", classes=["x", "y"])
    assert sorted(first.values()) == sorted(second.values())
    assert {p.split("/", 1)[1] for p in second} == set(first)
    for rel in first:
        if rel != "unreadable.png" or IS_ROOT:
            assert (tmp_path / "a" / rel).read_bytes() == (
                tmp_path / "b" / next(p for p in second if p.endswith("/" + rel))
            ).read_bytes(), rel


def test_corpus_keys_are_exactly_what_scan_folder_indexes(
    corpus: tuple[Path, dict[str, str]],
) -> None:
    root, expected = corpus
    index = scan_folder(root)
    assert index.paths == sorted(expected)
    assert index.ignored == []


def test_corpus_with_classes_gives_each_class_a_readable_image(tmp_path: Path) -> None:
    classes = ["a", "b", "c"]
    expected = make_bad_image_corpus(tmp_path, classes=classes)
    index = scan_folder(tmp_path, require_labels=True)
    assert index.classes == classes
    assert index.paths == sorted(expected)
    for c in classes:
        assert any(v == "ok" and p.startswith(c + "/") for p, v in expected.items())


def test_every_corpus_case_is_converted_or_refused(corpus: tuple[Path, dict[str, str]]) -> None:
    root, expected = corpus
    outcome = {}
    for rel in expected:
        try:
            img = _load(root / rel)
        except ImageReadError as e:
            assert e.reason and len(e.reason) < 200, rel
            outcome[rel] = "skip"
        else:
            assert img.mode == "RGB", rel
            assert np.asarray(img).dtype == np.uint8
            outcome[rel] = "ok"
    assert outcome == expected


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("empty.png", "empty file"),
        ("truncated.png", "truncated"),
        ("truncated.jpg", "truncated"),
        ("text.jpg", "not an image"),
        ("bomb.png", "decompression bomb"),
    ],
)
def test_refusal_reasons(corpus: tuple[Path, dict[str, str]], name: str, reason: str) -> None:
    with pytest.raises(ImageReadError, match=reason):
        _load(corpus[0] / name)


def test_truncated_files_are_refused_not_padded(corpus: tuple[Path, dict[str, str]]) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for name in ("truncated.png", "truncated.jpg"):
        with pytest.raises(ImageReadError, match="truncated"):
            _load(corpus[0] / name)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --------------------------------------------------------------------------- conversions


def test_grey_bilevel_and_grey_alpha(corpus: tuple[Path, dict[str, str]]) -> None:
    assert (_pixels(corpus, "grey.png") == 77).all()
    assert _pixels(corpus, "grey.png").shape == (6, 8, 3)
    bilevel = _pixels(corpus, "bilevel.png")
    assert bilevel[0, 0].tolist() == [255, 255, 255] and bilevel[0, 1].tolist() == [0, 0, 0]
    assert (_pixels(corpus, "grey_alpha.png") == 100).all()


def test_alpha_is_dropped_like_torchvision(corpus: tuple[Path, dict[str, str]]) -> None:
    # Fully transparent (10, 20, 30): convert('RGB') keeps the colour, which is what models saw in training.
    assert (_pixels(corpus, "rgba.png") == [10, 20, 30]).all()


def test_palette_with_transparency_converts_without_warning(
    corpus: tuple[Path, dict[str, str]],
) -> None:
    path = corpus[0] / "palette_transparency.png"
    with Image.open(path) as raw:
        assert raw.mode == "P" and isinstance(raw.info["transparency"], bytes)
        # The warning this case is about is real: Pillow gives it on a plain convert('RGB').
        with pytest.warns(UserWarning, match="Transparency"):
            raw.convert("RGB")
        # preprocess_image converts by itself, outside load_image's warning filter.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = preprocess_image(
                raw, PreprocessConfig((8, 8), 8, "bilinear", (0, 0, 0), (1, 1, 1))
            )
    px = _pixels(corpus, "palette_transparency.png")
    assert (px[:, :4] == [255, 0, 0]).all() and (px[:, 4:] == [0, 255, 0]).all()
    assert (out == px).all()


def test_cmyk_jpeg_is_converted(corpus: tuple[Path, dict[str, str]]) -> None:
    with Image.open(corpus[0] / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    px = _pixels(corpus, "cmyk.jpg").astype(int)
    assert np.abs(px - [255, 0, 0]).max() <= 3


def test_sixteen_bit_grey_is_scaled_not_clipped(corpus: tuple[Path, dict[str, str]]) -> None:
    with Image.open(corpus[0] / "grey16.png") as raw:
        assert raw.mode.startswith("I")
    px = _pixels(corpus, "grey16.png")
    assert px.shape == (2, 4, 3)
    assert px[0, :, 0].tolist() == [0, 1, 128, 255]  # 0, 257, 32768, 65535 divided by 257
    assert (px[..., 0] == px[..., 2]).all()


def test_sixteen_bit_rgb(corpus: tuple[Path, dict[str, str]]) -> None:
    px = _pixels(corpus, "rgb16.png")
    assert px[0].tolist() == [[255, 128, 0], [0, 1, 255]]


def test_float_tiff_is_scaled(corpus: tuple[Path, dict[str, str]]) -> None:
    with Image.open(corpus[0] / "float.tif") as raw:
        assert raw.mode == "F"
    assert (_pixels(corpus, "float.tif") == 128).all()


def test_exif_orientation_moves_the_pixels(corpus: tuple[Path, dict[str, str]]) -> None:
    path = corpus[0] / "exif_rotated.jpg"
    with Image.open(path) as raw:
        assert raw.size == (32, 16) and raw.getexif()[0x0112] == 6
        stored = np.asarray(raw.convert("RGB")).astype(int)
    assert np.abs(stored[4, 4] - [255, 0, 0]).max() < 40  # red block top left as stored
    px = _pixels(corpus, "exif_rotated.jpg").astype(int)
    assert px.shape == (32, 16, 3)  # 16 wide, 32 high once upright
    assert np.abs(px[4, 12] - [255, 0, 0]).max() < 40  # now top right
    assert np.abs(px[4, 4] - [255, 255, 255]).max() < 40
    assert np.abs(px[28, 4] - [255, 255, 255]).max() < 40


def test_one_pixel_image_loads_and_preprocesses(corpus: tuple[Path, dict[str, str]]) -> None:
    img = _load(corpus[0] / "one_pixel.png")
    assert img.size == (1, 1)
    cfg = PreprocessConfig((224, 224), 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
    out = preprocess_image(img, cfg)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert (out == [7, 8, 9]).all()
    assert (load_and_preprocess(corpus[0] / "one_pixel.png", cfg) == out).all()


def test_unicode_name(corpus: tuple[Path, dict[str, str]]) -> None:
    assert (_pixels(corpus, "café_日本.png") == [1, 2, 3]).all()
    assert (_pixels(corpus, "UPPER.PNG") == [200, 100, 50]).all()


def test_animated_gif_gives_first_frame(corpus: tuple[Path, dict[str, str]]) -> None:
    with Image.open(corpus[0] / "animation.gif") as raw:
        assert raw.n_frames == 3
    assert (_pixels(corpus, "animation.gif") == [255, 0, 0]).all()


def test_plain_rgb_round_trips(corpus: tuple[Path, dict[str, str]]) -> None:
    assert (_pixels(corpus, "rgb.png") == noise_rgb(24, 32, seed=1)).all()


def test_lossless_formats_for_every_extension(tmp_path: Path) -> None:
    pixels = noise_rgb(5, 7, seed=4)
    formats = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM"}
    for ext, fmt in formats.items():
        assert ext in IMAGE_EXTENSIONS
        path = tmp_path / f"x{ext}"
        Image.fromarray(pixels).save(path, format=fmt)
        assert (np.asarray(_load(path)) == pixels).all(), ext


# --------------------------------------------------------------------------- refusals


def test_bomb_is_refused_from_the_header_fast_and_small(
    corpus: tuple[Path, dict[str, str]],
) -> None:
    path = corpus[0] / "bomb.png"
    data = path.read_bytes()
    assert data[12:16] == b"IHDR" and struct.unpack(">II", data[16:24]) == (BOMB_SIDE, BOMB_SIDE)
    assert len(data) < 1_000_000  # a genuine 400-megapixel PNG, complete, in a small file
    limit_before = Image.MAX_IMAGE_PIXELS
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match="too large"):
        _load(path)
    assert time.perf_counter() - start < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100 * 1024
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_own_limit_holds_when_pillow_limit_is_switched_off(
    corpus: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some programs set Image.MAX_IMAGE_PIXELS = None globally; load_image must not rely on it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match=f"too large: {BOMB_SIDE}x{BOMB_SIDE}"):
        _load(corpus[0] / "bomb.png")
    assert time.perf_counter() - start < 0.5


def test_max_pixels_is_checked_before_decoding(tmp_path: Path) -> None:
    # The header says 100x100 but the pixel data is cut off: a decode would fail with "truncated",
    # so a "too large" answer proves the size was checked first.
    rows = [bytes(r) for r in noise_rgb(100, 100, seed=6)[..., 0]]
    data = png_bytes(100, 100, 8, 0, rows)
    path = tmp_path / "big.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"100x100 = 10000 pixels exceeds the limit of 9999"):
        _load(path, max_pixels=9999)
    with pytest.raises(ImageReadError, match="truncated"):
        _load(path)
    assert DEFAULT_MAX_PIXELS > 10000


def test_no_global_state_is_changed(corpus: tuple[Path, dict[str, str]]) -> None:
    filters = list(warnings.filters)
    limit = Image.MAX_IMAGE_PIXELS
    for rel in corpus[1]:
        try:
            load_image(corpus[0] / rel, max_pixels=1000)
        except ImageReadError:
            pass
    assert warnings.filters == filters
    assert Image.MAX_IMAGE_PIXELS == limit
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_directory_named_like_an_image(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").mkdir()
    with pytest.raises(ImageReadError, match="directory"):
        _load(tmp_path / "x.jpg")


def test_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ImageReadError, match="not found"):
        _load(tmp_path / "gone.png")


def test_symlinked_file_is_fine(tmp_path: Path) -> None:
    Image.new("RGB", (3, 3), (4, 5, 6)).save(tmp_path / "real.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    assert (np.asarray(_load(tmp_path / "link.png")) == [4, 5, 6]).all()


def test_file_that_vanishes_between_scan_and_load(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (3, 3)).save(tmp_path / c / "img.png")
    index = scan_folder(tmp_path)
    (tmp_path / index.paths[0]).unlink()
    with pytest.raises(ImageReadError, match="not found"):
        _load(index.root / index.paths[0])
    assert _load(index.root / index.paths[1]).size == (3, 3)


def test_unreadable_file(tmp_path: Path) -> None:
    if IS_ROOT:
        pytest.skip("root reads files whatever their mode")
    path = tmp_path / "locked.png"
    Image.new("RGB", (3, 3)).save(path)
    path.chmod(0)
    with pytest.raises(ImageReadError, match="permission denied"):
        _load(path)


def test_random_corruptions_never_raise_anything_else(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sources = {}
    for fmt, ext in (
        ("PNG", ".png"),
        ("JPEG", ".jpg"),
        ("GIF", ".gif"),
        ("TIFF", ".tif"),
        ("BMP", ".bmp"),
    ):
        buf = io.BytesIO()
        Image.fromarray(noise_rgb(16, 16, seed=5)).save(buf, format=fmt)
        sources[ext] = buf.getvalue()
    n_ok = n_skip = 0
    for i in range(150):
        ext = list(sources)[i % len(sources)]
        data = bytearray(sources[ext])
        if i % 3 == 0:
            data = data[: rng.integers(1, len(data))]
        else:
            for pos in rng.integers(0, len(data), size=1 + i % 8):
                data[pos] = rng.integers(0, 256)
        path = tmp_path / f"c{i}{ext}"
        path.write_bytes(bytes(data))
        try:
            img = _load(path)
        except ImageReadError:
            n_skip += 1
        else:
            assert img.mode == "RGB"
            n_ok += 1
    assert n_skip > 0 and n_ok > 0


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    "size", [(300, 300), (517, 233), (1, 1), (233, 517), (224, 224), (256, 255)]
)
@pytest.mark.parametrize(
    ("input_size", "resize_size"),
    [((224, 224), 256), ((224, 224), 224), ((192, 160), 200), ((240, 240), 200)],
)
def test_preprocess_matches_torchvision(
    size: tuple[int, int], interpolation: str, input_size: tuple[int, int], resize_size: int
) -> None:
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    w, h = size
    img = Image.fromarray(noise_rgb(h, w, seed=w * 1000 + h))
    mode = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[
        interpolation
    ]
    reference = transforms.Compose(
        [transforms.Resize(resize_size, interpolation=mode), transforms.CenterCrop(input_size)]
    )
    expected = np.asarray(reference(img))
    cfg = PreprocessConfig(
        input_size, resize_size, interpolation, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    )
    out = preprocess_image(img, cfg)
    assert out.shape == (*input_size, 3) and out.dtype == np.uint8
    assert np.array_equal(out, expected)


def test_torchvision_transform_is_the_same_transform() -> None:
    cfg = PreprocessConfig((224, 224), 256, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    img = Image.fromarray(noise_rgb(300, 411, seed=3))
    got = cfg.torchvision_transform()(img).numpy()
    ours = (preprocess_image(img, cfg).astype(np.float32) / 255 - np.array(cfg.mean, np.float32)) / np.array(
        cfg.std, np.float32
    )
    np.testing.assert_allclose(got, ours.transpose(2, 0, 1), atol=1e-6)


def test_preprocess_converts_other_modes() -> None:
    cfg = PreprocessConfig((4, 4), 4, "bilinear", (0, 0, 0), (1, 1, 1))
    grey16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert (preprocess_image(grey16, cfg) == 255).all()
    assert (preprocess_image(Image.new("L", (4, 4), 9), cfg) == 9).all()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(300, 300), (517, 233), (1, 1), (20, 30)])
def test_grey_fast_path_is_bit_identical_to_converting_first(tmp_path, interpolation, size):
    """load_and_preprocess keeps grey images single-channel through the resize: same bytes."""
    from featbank.images import PreprocessConfig, load_and_preprocess, preprocess_image

    arr = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    path = tmp_path / "grey.png"
    Image.fromarray(arr, "L").save(path)
    cfg = PreprocessConfig((224, 224), 256, interpolation, (0.5,) * 3, (0.5,) * 3)
    fast = load_and_preprocess(path, cfg)
    reference = preprocess_image(Image.fromarray(arr, "L").convert("RGB"), cfg)
    assert fast.shape == (224, 224, 3)
    np.testing.assert_array_equal(fast, reference)
