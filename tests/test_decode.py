"""`extract --decode gpu`: JPEGs decoded and resized as tensors (torchvision's CPU decoder here), against Pillow.

Real photos (scikit-image's astronaut, chelsea, coffee) saved with PIL as JPEG at several sizes and
aspect ratios, greyscale, EXIF-rotated, progressive and CMYK, beside PNGs and corrupt files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps
from skimage import data as skdata

import featbank
from featbank.backbones import load_backbone
from featbank.cache import FeatureCache
from featbank.cache._schema import compute_cache_key
from featbank.cli.main import cli
from featbank.errors import CacheKeyMismatch, ConfigError
from featbank.extraction._decode import _orient, preprocess_tensor, read_jpeg, resolve_decode
from featbank.images import PreprocessConfig, load_image, preprocess_image

TINY = dict(backbone="test_tiny", engine="torch", num_workers=0, progress=False)
PHOTOS = ("astronaut", "chelsea", "coffee")
SIZES = ((120, 90), (97, 211), (300, 300), (640, 160))


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)())


def save_jpeg(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90, **kw)
    return path


def rotated_jpeg(path: Path, orientation: int = 6) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save_jpeg(photo("chelsea").resize((150, 100)), path, exif=exif)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of JPEGs (sizes, grey, EXIF-rotated, progressive, CMYK), PNGs, and three corrupt JPEGs."""
    root = tmp_path_factory.mktemp("photos")
    for cls, name in zip(("a", "b", "a"), PHOTOS):
        img = photo(name)
        for w, h in SIZES:
            save_jpeg(img.resize((w, h)), root / cls / f"{name}-{w}x{h}.jpg")
        save_jpeg(img.convert("L").resize((200, 150)), root / cls / f"{name}-grey.jpg")
        img.resize((90, 120)).save(root / cls / f"{name}.png")
    rotated_jpeg(root / "b" / "rot6.jpg", 6)
    rotated_jpeg(root / "b" / "rot8.jpg", 8)
    save_jpeg(photo("coffee").resize((160, 120)), root / "b" / "progressive.jpg", progressive=True)
    photo("coffee").resize((160, 120)).convert("CMYK").save(root / "b" / "cmyk.jpg")
    whole = (root / "b" / "rot6.jpg").read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "b" / "not-a-jpeg.jpg").write_bytes(b"hello, I am text\xff\xd9")
    # A sound header but a bogus Huffman table: the batch decode refuses it, Pillow too (main-process fallback).
    i = whole.index(b"\xff\xc4")
    (root / "b" / "bad-huffman.jpg").write_bytes(whole[: i + 4] + bytes([0x33] * 20) + whole[i + 24:])
    return root


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def run_both(root: Path, tmp: Path, **kw) -> dict[str, tuple]:
    out = {}
    for mode in ("pillow", "gpu"):
        report = featbank.extract(root, tmp / f"{mode}.h5", decode=mode, **kw)
        with FeatureCache(tmp / f"{mode}.h5") as c:
            out[mode] = (list(c.paths), c.load_embeddings(), report.skipped, c.metadata.get("decode"), c.cache_key)
    return out


# ------------------------------------------------------------------------------------------
# The tensor path, pixel by pixel
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_turns_as_pillow(orientation) -> None:
    arr = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    img = Image.fromarray(arr)
    img.getexif()[0x0112] = orientation
    img.info["exif"] = img.getexif().tobytes()
    want = np.asarray(ImageOps.exif_transpose(img))
    got = _orient(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29 deprecates decode_jpeg
@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("size", SIZES)
def test_tensor_preprocess_matches_pillow(tmp_path, name, size) -> None:
    """Same shape and crop window as the Pillow path; the resampling differs by a level or two."""
    from torchvision.io import ImageReadMode, decode_jpeg

    path = save_jpeg(photo(name).resize(size), tmp_path / "x.jpg")
    for cfg in (PreprocessConfig((224, 224), 256, "bicubic", (0.5,) * 3, (0.5,) * 3),
                PreprocessConfig((32, 32), 36, "bilinear", (0.5,) * 3, (0.5,) * 3),
                PreprocessConfig((64, 48), 40, "bilinear", (0.5,) * 3, (0.5,) * 3)):  # crop > resize: zero padding
        want = preprocess_image(load_image(path), cfg)
        raw, orientation = read_jpeg(path, cfg)
        img = decode_jpeg(torch.from_numpy(raw.copy()), mode=ImageReadMode.RGB)
        got = preprocess_tensor(img, cfg, orientation).numpy()
        assert got.shape == want.shape == (*cfg.input_size, 3)
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.mean() < 2.0, (cfg, diff.mean())
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


def test_read_jpeg_sends_everything_else_to_pillow(photo_folder) -> None:
    cfg = PreprocessConfig((32, 32), 36, "bilinear", (0.5,) * 3, (0.5,) * 3)
    for name in ("astronaut.png", "../b/cmyk.jpg", "../b/truncated.jpg", "../b/not-a-jpeg.jpg", "missing.jpg"):
        assert read_jpeg(photo_folder / "a" / name, cfg) is None, name
    assert read_jpeg(photo_folder / "a", cfg) is None  # a directory
    raw, orientation = read_jpeg(photo_folder / "b" / "rot6.jpg", cfg)
    assert orientation == 6 and raw.dtype == np.uint8 and bytes(raw[:2]) == b"\xff\xd8"
    assert read_jpeg(photo_folder / "a" / "astronaut-grey.jpg", cfg)[1] == 1
    assert read_jpeg(photo_folder / "b" / "bad-huffman.jpg", cfg) is not None  # the header is sound: the device tries
    strip = save_jpeg(Image.new("RGB", (1010, 10)), photo_folder.parent / "strip" / "s.jpg")  # 101:1
    assert read_jpeg(strip, cfg) is None


# ------------------------------------------------------------------------------------------
# extract --decode gpu on the CPU: same rows, same skips and reasons, embeddings within cosine 0.999
# ------------------------------------------------------------------------------------------


def test_gpu_decode_matches_pillow_tiny(photo_folder, tmp_path, one_thread) -> None:
    runs = run_both(photo_folder, tmp_path, **TINY, batch_size=8)
    (pa, ea, sa, da, ka), (pb, eb, sb, db, kb) = runs["pillow"], runs["gpu"]
    assert pa == pb and len(pa) == 3 * (len(SIZES) + 2) + 4
    assert sa == sb and [p for p, _ in sa] == ["b/bad-huffman.jpg", "b/not-a-jpeg.jpg", "b/truncated.jpg"]
    assert dict(sb)["b/bad-huffman.jpg"].startswith("truncated or corrupt")
    assert dict(sb)["b/not-a-jpeg.jpg"] == "not an image (format not recognised)"
    assert dict(sb)["b/truncated.jpg"].startswith("truncated or corrupt")
    cos = cosines(ea, eb)
    assert cos.min() > 0.999, dict(zip(pa, cos))
    png = [i for i, p in enumerate(pa) if p.endswith((".png", "cmyk.jpg"))]
    np.testing.assert_allclose(ea[png], eb[png], rtol=1e-5, atol=1e-5)  # the Pillow fallback: same pixels
    assert (da, db) == ("pillow", "gpu") and ka != kb


def test_cache_key_differs_and_old_keys_stay() -> None:
    ident = load_backbone("test_tiny").identity()
    plain = compute_cache_key(ident, "float32", "float32")
    assert compute_cache_key(ident, "float32", "float32", None, "pillow") == plain
    assert compute_cache_key(ident, "float32", "float32", None, "gpu") != plain


def test_rerun_with_the_other_decoder_is_refused(photo_folder, tmp_path) -> None:
    out = tmp_path / "c.h5"
    featbank.extract(photo_folder, out, decode="pillow", **TINY)
    before = out.read_bytes()
    with pytest.raises(CacheKeyMismatch, match="decode: cache has 'pillow', asked for 'gpu'"):
        featbank.extract(photo_folder, out, decode="gpu", **TINY)
    assert out.read_bytes() == before
    r = featbank.extract(photo_folder, out, decode="auto", **TINY)  # auto on the CPU is pillow: up to date
    assert r.up_to_date
    args = ["extract", str(photo_folder), "--out", str(out), "-b", "test_tiny", "--engine", "torch",
            "--num-workers", "0", "-q"]
    res = CliRunner().invoke(cli, [*args, "--decode", "gpu"])
    assert res.exit_code == 2 and "decode: cache has 'pillow'" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, [*args, "--decode", "gpu", "--overwrite"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, [*args, "--decode", "pillow"])
    assert res.exit_code == 2 and "decode: cache has 'gpu', asked for 'pillow'" in res.output


def test_gpu_decode_refuses_what_it_does_not_support(photo_folder, tmp_path) -> None:
    out = tmp_path / "c.h5"
    args = ["extract", str(photo_folder), "--out", str(out), "-b", "test_tiny", "--decode", "gpu", "-q"]
    for extra, says in ((["--layers", "stem,final"], "--layers or --views"),
                        (["--views", "1", "--augment", "hflip"], "--layers or --views")):
        res = CliRunner().invoke(cli, [*args, *extra])
        assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output
    assert not out.exists()
    with pytest.raises(ConfigError, match="WebDataset"):
        resolve_decode("gpu", "cpu", webdataset=True)
    with pytest.raises(ConfigError, match="'decode' parameter"):
        resolve_decode("nvjpeg", "cpu")
    assert resolve_decode("auto", "cpu") == "pillow"
    assert resolve_decode("auto", "cuda", webdataset=True) == "pillow"


def test_gpu_decode_with_decode_workers(photo_folder, tmp_path) -> None:
    """Workers read bytes (and decode the fallbacks); the same cache as without workers."""
    a = featbank.extract(photo_folder, tmp_path / "w0.h5", decode="gpu", **TINY)
    b = featbank.extract(photo_folder, tmp_path / "w2.h5", decode="gpu", **{**TINY, "num_workers": 2})
    assert a.skipped == b.skipped and a.n_embedded == b.n_embedded > 0
    with FeatureCache(tmp_path / "w0.h5") as c0, FeatureCache(tmp_path / "w2.h5") as c2:
        np.testing.assert_allclose(c0.load_embeddings(), c2.load_embeddings(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# The real EfficientNet-Lite0 weights (slow)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_decode_cosine_lite0(photo_folder, tmp_path, capsys) -> None:
    runs = run_both(photo_folder, tmp_path, backbone="efficientnet_lite0", num_workers=0, progress=False,
                    batch_size=16)
    (pa, ea, sa, *_), (pb, eb, sb, *_) = runs["pillow"], runs["gpu"]
    assert pa == pb and sa == sb
    cos = cosines(ea, eb)
    with capsys.disabled():
        print(f"\nEfficientNet-Lite0, --decode gpu (CPU tensor path) vs pillow over {len(cos)} images: "
              f"min cosine {cos.min():.5f}, median {np.median(cos):.5f}")
    assert cos.min() >= 0.999, dict(zip(pa, cos))


def digits_folder(root: Path) -> Path:
    """sklearn's 8x8 digits as 96x96 greyscale JPEGs, 10 classes, train/test split folders."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:30] for c in range(10)])
    for n, i in enumerate(keep):
        split = "test" if n % 30 >= 20 else "train"
        img = Image.fromarray(np.uint8(x[i].reshape(8, 8) * 255 / 16)).resize((96, 96), Image.Resampling.BILINEAR)
        save_jpeg(img.convert("RGB"), root / split / str(y[i]) / f"{i}.jpg")
    return root


@pytest.mark.slow
def test_probe_top1_is_the_same(tmp_path, capsys) -> None:
    from sklearn.linear_model import LogisticRegression

    root = digits_folder(tmp_path / "digits")
    top1 = {}
    for mode in ("pillow", "gpu"):
        featbank.extract(root, tmp_path / f"{mode}.h5", backbone="efficientnet_lite0", decode=mode, num_workers=0,
                         progress=False, batch_size=50)
        with FeatureCache(tmp_path / f"{mode}.h5") as c:
            x, y = c.load_embeddings(), np.asarray(c.labels)
            tr, te = c.split_mask("train"), c.split_mask("test")
        clf = LogisticRegression(max_iter=2000).fit(x[tr], y[tr])
        top1[mode] = float((clf.predict(x[te]) == y[te]).mean())
    with capsys.disabled():
        print(f"\ndigits probe top-1 on {int(te.sum())} test images: pillow {top1['pillow']:.3f}, gpu {top1['gpu']:.3f}")
    assert top1["pillow"] > 0.5 and top1["gpu"] == top1["pillow"]



def test_a_bomb_header_is_refused_before_decoding(tmp_path) -> None:
    """A JPEG whose header claims 20000 x 20000 pixels goes to the Pillow path, which refuses it from the header."""
    from featbank.images import ImageReadError, load_and_preprocess

    small = save_jpeg(photo("coffee").resize((64, 48)), tmp_path / "small.jpg").read_bytes()
    i = small.index(b"\xff\xc0") + 5  # SOF0: length (2), precision (1), then height and width
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(small[:i] + (20000).to_bytes(2, "big") * 2 + small[i + 4:])
    cfg = PreprocessConfig((32, 32), 36, "bilinear", (0.5,) * 3, (0.5,) * 3)
    assert read_jpeg(bomb, cfg) is None
    with pytest.raises(ImageReadError, match="too large"):
        load_and_preprocess(bomb, cfg)
