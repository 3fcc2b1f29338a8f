"""DICOM input and the window rule: pydicom's own test files, hand-made CT slices, hostile headers.

Every DICOM file pydicom ships (its wheel's test data) either becomes an image equal to pydicom's
own modality + VOI pipeline mapped to 8 bits by an independent computation, or is skipped with a
reason naming what is missing. The window arithmetic is checked against pydicom's
``apply_windowing``; the window travels from extract to the cache key, the bundle and predict.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pydicom = pytest.importorskip("pydicom", minversion="3.0")

from _dicom import ct_slice, write_dicom  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing, pixel_array  # noqa: E402

import featbank  # noqa: E402
from featbank.cli.main import cli  # noqa: E402
from featbank.errors import CacheKeyMismatch, ConfigError  # noqa: E402
from featbank.images import ImageReadError, PreprocessConfig, load_image  # noqa: E402
from featbank.sources import scan_folder  # noqa: E402
from featbank.windowing import WINDOW_PRESETS, parse_window, range_to_uint8, window_to_uint8  # noqa: E402

#: What a skip reason of a pydicom test file may say: each names what is missing or wrong.
SKIP_REASONS = ("no pixel data", "decoder plugin", "cannot decode DICOM pixel data", "truncated DICOM pixel data",
                "not a whole number", "not an image (format not recognised)", "not a readable DICOM")


def _testdata_files() -> list[Path]:
    from pydicom.data import get_testdata_files

    return sorted(Path(f) for f in get_testdata_files() if os.path.isfile(f))


# ------------------------------------------------------------------------------------------------
# The window rule
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, spec, cw", [
    ("none", "none", None), ("AUTO", "auto", None), ("lung", "lung", (-600, 1500)),
    ("soft-tissue", "soft-tissue", (50, 400)), ("bone", "bone", (400, 1800)), ("brain", "brain", (40, 80)),
    ("40,400", "40,400", (40, 400)), (" -600.0 , 1500 ", "-600,1500", (-600, 1500)), ("1.5,2.25", "1.5,2.25", (1.5, 2.25)),
])
def test_window_rules_parse_to_a_canonical_string(text, spec, cw):
    w = parse_window(text)
    assert w.spec == spec
    assert (None if w.center is None else (w.center, w.width)) == cw
    assert parse_window(w.spec) == w  # the stored string reads back the same


@pytest.mark.parametrize("text", ["lungs", "40", "40,0", "40,0.5", "a,b", "40,400,3", "nan,400", "40,inf", ""])
def test_a_window_that_cannot_be_parsed_says_what_to_type(text):
    with pytest.raises(ConfigError, match=r"none, auto, a preset \(lung = -600,1500"):
        parse_window(text)


def test_extract_with_a_bad_window_is_exit_2_with_what_to_type(tmp_path):
    res = CliRunner().invoke(cli, ["extract", str(tmp_path), "--window", "lungs"])
    assert res.exit_code == 2
    assert "Unknown window 'lungs'" in res.output and "soft-tissue = 50,400" in res.output and "C,W" in res.output


@pytest.mark.parametrize("center, width", [(*WINDOW_PRESETS[k],) for k in sorted(WINDOW_PRESETS)] + [(0.0, 1.0), (7.5, 2.0)])
def test_window_to_uint8_is_dicoms_linear_function(center, width):
    """Against pydicom's apply_windowing with an 8-bit unsigned output range (0..255), an independent implementation."""
    x = np.concatenate([np.linspace(-3000, 3000, 20001), [center - 0.5, center, center + 0.5, center - width / 2]])
    probe = Dataset()
    probe.PhotometricInterpretation, probe.BitsStored, probe.PixelRepresentation = "MONOCHROME2", 8, 0
    probe.WindowCenter, probe.WindowWidth = center, width
    expected = np.clip(np.rint(apply_windowing(x.copy(), probe)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(window_to_uint8(x, center, width), expected)


def test_range_to_uint8_maps_lo_to_0_and_hi_to_255():
    x = np.array([-5.0, 0.0, 40.0, 100.0, 200.0, np.nan])
    np.testing.assert_array_equal(range_to_uint8(x, 0, 100), [0, 0, 102, 255, 255, 0])
    np.testing.assert_array_equal(range_to_uint8(x[:4], 100, 0), [255, 255, 153, 0])  # a negative rescale slope
    np.testing.assert_array_equal(range_to_uint8(np.array([1.0, 2.0]), 1, 1), [0, 255])  # a flat image


def test_sixteen_bit_png_windows(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(1000, 3000, (40, 50)).astype(np.uint16)
    arr[0, 0], arr[0, 1] = 0, 65535  # outliers that a percentile range ignores
    Image.fromarray(arr).save(tmp_path / "x.png")
    none = np.asarray(load_image(tmp_path / "x.png", keep_grey=True))
    np.testing.assert_array_equal(none, np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8))  # unchanged default
    lo, hi = np.percentile(arr, [0.5, 99.5])
    auto = np.asarray(load_image(tmp_path / "x.png", keep_grey=True, window="auto"))
    np.testing.assert_array_equal(auto, np.clip(np.rint((arr - lo) * 255 / (hi - lo)), 0, 255).astype(np.uint8))
    fixed = np.asarray(load_image(tmp_path / "x.png", keep_grey=True, window="2000,1000"))
    np.testing.assert_array_equal(fixed, window_to_uint8(arr, 2000, 1000))
    assert auto.std() > 5 * none.std()  # the plain rescale is the nearly uniform grey a window fixes
    rgb = np.full((8, 8, 3), 77, np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "c.png", window="lung")), rgb)  # 8-bit: untouched


# ------------------------------------------------------------------------------------------------
# pydicom's own test files
# ------------------------------------------------------------------------------------------------


def _pydicom_pipeline(path: Path) -> np.ndarray:
    """pydicom's modality + VOI pipeline (middle frame), mapped to 8 bits here, without featbank."""
    ds = pydicom.dcmread(path, force=True)
    frames = int(ds.get("NumberOfFrames") or 1)
    arr = pixel_array(ds, index=frames // 2)
    pi = ds.PhotometricInterpretation
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return rgb if rgb.dtype == np.uint8 else np.clip(np.rint(rgb / 257.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3:
        top = 2 ** int(ds.BitsStored) - 1
        return arr if arr.dtype == np.uint8 else np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    values = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        out = apply_voi_lut(values, ds)
        if "VOILUTSequence" in ds:
            lo, hi = 0.0, 2.0 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1
        else:  # the output range of pydicom's windowing: what it gives far below and far above the window
            lo, hi = apply_windowing(np.array([-1e15, 1e15]), ds)
    else:
        out, (lo, hi) = values, np.percentile(values, [0.5, 99.5])
    out = np.clip(np.rint((np.asarray(out, np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return 255 - out if pi == "MONOCHROME1" else out


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's own notes on odd test files (padding, VR)
def test_every_pydicom_test_file_decodes_as_pydicom_does_or_is_skipped_with_its_reason():
    files = _testdata_files()
    decoded, skipped = [], {}
    for path in files:
        try:
            img = load_image(path, keep_grey=True, window="auto")
        except ImageReadError as e:
            skipped[path.name] = e.reason
            continue
        got = np.asarray(img)
        want = _pydicom_pipeline(path)
        assert got.shape == want.shape, path.name
        diff = np.abs(got.astype(int) - want.astype(int))
        # The same arithmetic by two routes: at most one grey level apart where a value falls on .5.
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (path.name, diff.max(), (diff == 0).mean())
        decoded.append(path.name)
    assert len(decoded) >= 60, decoded  # CT, MR, RGB, YBR, palette, RLE, JPEG, JPEG 2000, big endian, multi-frame
    for name in ("CT_small.dcm", "MR_small_bigendian.dcm", "examples_palette.dcm", "SC_ybr_full_422_uncompressed.dcm",
                 "examples_ybr_color.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "rtdose.dcm", "image_dfl.dcm"):
        assert name in decoded, (name, skipped.get(name))
    for name, reason in skipped.items():
        assert any(s in reason for s in SKIP_REASONS), (name, reason)
        if name.endswith(".dcm") and "not an image" in reason:
            raise AssertionError(f"{name}: a .dcm file must be read as DICOM, not as a picture ({reason})")
    assert "truncated DICOM pixel data" in skipped["MR_truncated.dcm"]
    # a JPEG 2000 stream that claims 3.8e12 pixels: the decoder's own bomb limit holds, and the reason says so
    assert "decompression bomb" in skipped["JPEG2000-embedded-sequence-delimiter.dcm"]
    assert "no pixel data" in skipped["rtplan.dcm"] and "RT Plan Storage" in skipped["rtplan.dcm"]
    missing = [r for r in skipped.values() if "decoder plugin" in r]
    assert missing and all("pylibjpeg" in r or "gdcm" in r for r in missing)


def test_monochrome1_is_inverted_and_the_file_window_is_used(tmp_path):
    """pydicom's CR files (MONOCHROME1, rescaled, with a window): dense is bright after featbank reads them."""
    path = next(p for p in _testdata_files() if p.name == "6154")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    img = np.asarray(load_image(path, keep_grey=True, window="auto")).astype(int)
    m2 = tmp_path / "m2.dcm"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(m2)
    np.testing.assert_array_equal(img, 255 - np.asarray(load_image(m2, keep_grey=True, window="auto")).astype(int))


def test_auto_applies_the_files_voi_lut_sequence(tmp_path):
    """None of pydicom's installed files has a VOI LUT Sequence: one written here (12-bit entries, a gamma curve)."""
    from pydicom.sequence import Sequence

    stored = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    path = write_dicom(tmp_path / "voi.dcm", stored, bits_stored=12, center=100, width=50)  # the LUT wins, as pydicom
    lut = np.rint(4095 * (np.arange(4096) / 4095) ** 0.5).astype(np.uint16)
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 12])  # LUTDescriptor: entries, first value mapped, bits
    item.add_new(0x00283006, "US", lut.tolist())  # LUTData
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(path)
    got = np.asarray(load_image(path, keep_grey=True, window="auto"))
    np.testing.assert_array_equal(got, np.rint(lut[stored] * (255 / 4095)).astype(np.uint8))


def test_ct_presets_window_hounsfield_units(tmp_path):
    stored = ct_slice(48)
    path = write_dicom(tmp_path / "ct.dcm", stored, slope=1, intercept=-1024, bits_stored=12)
    hu = stored.astype(np.float64) - 1024
    images = {}
    for name in ("lung", "soft-tissue", "bone", "brain", "-100,300"):
        w = parse_window(name)
        images[name] = np.asarray(load_image(path, keep_grey=True, window=name))
        np.testing.assert_array_equal(images[name], window_to_uint8(hu, w.center, w.width))
    assert len({im.tobytes() for im in images.values()}) == len(images)  # every window gives another picture
    none = np.asarray(load_image(path, keep_grey=True))  # the 12-bit range -1024..3071 HU onto 0..255
    np.testing.assert_array_equal(none, range_to_uint8(hu, -1024, 3071))


def test_a_multi_frame_file_gives_its_middle_frame(tmp_path):
    frames = np.stack([np.full((6, 8), 10 * k, np.uint8) for k in range(5)])
    path = write_dicom(tmp_path / "cine.dcm", frames)
    assert np.unique(np.asarray(load_image(path, keep_grey=True))).tolist() == [20]


def test_rgb_dicom_keeps_its_colours(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (10, 12, 3)).astype(np.uint8)
    path = write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")
    np.testing.assert_array_equal(np.asarray(load_image(path, window="lung")), rgb)


# ------------------------------------------------------------------------------------------------
# Hostile files: skipped with their reason, before any large allocation
# ------------------------------------------------------------------------------------------------


def _reason(path: Path, **kw) -> str:
    with pytest.raises(ImageReadError) as e:
        load_image(path, **kw)
    return e.value.reason


def test_a_dicom_file_without_pixel_data_is_skipped(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", ct_slice(8), with_pixels=False)
    assert _reason(path).startswith("no pixel data: a DICOM file without an image (CT Image Storage)")


def test_lying_rows_and_columns_are_refused_from_the_header(tmp_path):
    big = write_dicom(tmp_path / "big.dcm", ct_slice(8), rows=60000, columns=60000)
    assert "too large: the DICOM header says 60000x60000 pixels x 1 frame(s)" in _reason(big)
    small_lie = write_dicom(tmp_path / "lie.dcm", ct_slice(8), rows=100, columns=100)
    assert "truncated DICOM pixel data: 128 bytes, the header" in _reason(small_lie) and "needs 20000" in _reason(small_lie)
    strip = write_dicom(tmp_path / "strip.dcm", np.zeros((1, 8), np.uint16), rows=1, columns=20000,
                        pixel_data=bytes(40000))
    assert "extreme aspect ratio" in _reason(strip)


def test_a_billion_frames_is_refused_before_reading_pixel_data(tmp_path):
    import tracemalloc

    path = write_dicom(tmp_path / "frames.dcm", ct_slice(16), frames=10**9)
    tracemalloc.start()
    t0 = time.perf_counter()
    reason = _reason(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "x 1000000000 frame(s)" in reason and "over the limit of 178956970" in reason
    assert time.perf_counter() - t0 < 2 and peak < 20 << 20


def test_a_compressed_bomb_header_is_refused_before_decoding(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    path = write_dicom(tmp_path / "bomb.dcm", ct_slice(8), rows=30000, columns=30000, transfer_syntax=RLELossless,
                       pixel_data=encapsulate([b"\0" * 64]))
    assert "too large" in _reason(path) and "decompression bomb" in _reason(path)


def test_truncated_and_garbage_dicom_files(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", ct_slice(32), slope=1, intercept=-1024)
    data = good.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 500])
    assert _reason(cut).startswith(("truncated DICOM pixel data", "truncated or corrupt DICOM"))
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(128) + b"DICM" + os.urandom(300))
    assert _reason(junk)  # a reason, not a traceback
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\x89PNG not really")
    assert _reason(fake)
    big = write_dicom(tmp_path / "big.dcm", np.zeros((1024, 1024), np.uint16))  # pixel data over the deferral size
    big.write_bytes(big.read_bytes()[:-500])
    assert _reason(big)
    long = write_dicom(tmp_path / "long.dcm", np.zeros((8, 8), np.uint16), pixel_data=bytes(128 * 40))
    assert "over twice the 128 its header" in _reason(long)
    garbage_frames = write_dicom(tmp_path / "frames.dcm", ct_slice(8), frames=1)
    tag = b"\x28\x00\x08\x00IS\x02\x001 "  # (0028,0008) NumberOfFrames, explicit VR little endian
    garbage_frames.write_bytes(garbage_frames.read_bytes().replace(tag, tag[:-2] + b"1A"))
    assert _reason(garbage_frames) == "DICOM attribute NumberOfFrames is '1A', not a whole number"


def test_without_pydicom_a_dicom_file_is_skipped_saying_what_to_install(tmp_path):
    """A real process in which pydicom cannot be imported (as without the extra)."""
    import subprocess
    import sys

    path = write_dicom(tmp_path / "ct.dcm", ct_slice(8))
    code = ("import sys; sys.modules['pydicom'] = None\n"
            "from featbank.images import ImageReadError, load_image\n"
            f"try:\n    load_image({str(path)!r})\nexcept ImageReadError as e:\n    print(e.reason)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "a DICOM file needs pydicom >= 3: pip install 'featbank[dicom]'"


def test_a_dicom_without_a_preamble_is_read_by_its_name(tmp_path):
    path = write_dicom(tmp_path / "raw.dcm", ct_slice(16), preamble=False, slope=1, intercept=-1024)
    assert path.read_bytes()[128:132] != b"DICM"
    hu = ct_slice(16).astype(float) - 1024
    np.testing.assert_array_equal(np.asarray(load_image(path, keep_grey=True, window="lung")), window_to_uint8(hu, -600, 1500))


# ------------------------------------------------------------------------------------------------
# Folders, manifests, tars; the window in the cache key, the bundle and predict
# ------------------------------------------------------------------------------------------------


def _ct_folder(root: Path) -> Path:
    """Two classes of CT slices: .dcm files and extensionless / UID-named files with the preamble."""
    rng = np.random.default_rng(0)
    for c, shift in (("air", -400), ("bone", 400)):
        (root / c).mkdir(parents=True)
        for i in range(4):
            stored = np.clip(ct_slice(24).astype(int) + shift + rng.integers(-30, 30, (24, 24)), 0, 4095).astype(np.uint16)
            name = (f"{c}{i}.dcm", f"IM{i:06d}", f"1.2.840.{i}", f"{c}{i}.dicom")[i]
            write_dicom(root / c / name, stored, slope=1, intercept=-1024, bits_stored=12)
    (root / "air" / "notes").write_text("not a DICOM file")
    return root


def test_folder_scan_finds_dicom_files_with_and_without_an_extension(tmp_path):
    index = scan_folder(_ct_folder(tmp_path / "data"))
    assert len(index) == 8 and index.classes == ["air", "bone"]
    assert {"air/IM000001", "air/1.2.840.2", "bone/bone3.dicom"} <= set(index.paths)
    assert index.ignored == ["air/notes"]


@pytest.mark.slow
def test_extract_keys_the_window_and_fit_predict_export_use_it(tmp_path):
    data = _ct_folder(tmp_path / "data")
    out = tmp_path / "ct.h5"
    rep = featbank.extract(data, out, backbone="test_tiny", engine="torch", num_workers=0, progress=False, window="lung")
    assert rep.n_images == 8 and not rep.skipped
    with featbank.open_cache(out) as cache:
        assert cache.metadata["transform"]["window"] == "lung"
        lung_key = cache.cache_key
    with pytest.raises(CacheKeyMismatch, match="'window': 'lung'"):
        featbank.extract(data, out, backbone="test_tiny", engine="torch", num_workers=0, progress=False, window="bone")
    plain = tmp_path / "plain.h5"
    featbank.extract(data, plain, backbone="test_tiny", engine="torch", num_workers=0, progress=False)
    with featbank.open_cache(plain) as cache:
        assert "window" not in cache.metadata["transform"] and cache.cache_key != lung_key
        plain_emb = cache.load_embeddings()
    with featbank.open_cache(out) as cache:
        assert not np.allclose(cache.load_embeddings(), plain_emb)

    bundle_dir = tmp_path / "model"
    featbank.fit(out, "linear", out=bundle_dir, device="cpu")
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["backbone"]["transform"]["window"] == "lung"
    bundle = featbank.load_bundle(bundle_dir)
    assert bundle.load_backbone().preprocess.window == "lung"
    files = [data / "air" / "IM000001", data / "bone" / "bone0.dcm"]
    preds = featbank.predict(bundle_dir, files, device="cpu")
    assert [p.error for p in preds] == [None, None]
    res = CliRunner().invoke(cli, ["predict", str(bundle_dir), str(files[0]), "--device", "cpu"])
    assert res.exit_code == 0 and "IM000001" in res.output, res.output
    # predict reads the file with the bundle's window: its probabilities are the ones of the cached embedding.
    with featbank.open_cache(out) as cache:
        rows = [cache.paths.index("air/IM000001"), cache.paths.index("bone/bone0.dcm")]
        want = bundle.predict_proba(cache.load_embeddings(np.array(rows)))
    np.testing.assert_allclose([p.probability for p in preds], want.max(axis=1), atol=1e-4)

    # export: the window is in the ONNX metadata, the parity check reads the DICOM files with it, and the light
    # runtime applies it to a DICOM file exactly as predict does.
    report = featbank.export_model(bundle_dir, tmp_path / "ct.onnx", check_images=data)
    assert json.loads(report.metadata["preprocessing"])["window"] == "lung"
    assert report.parity is not None and report.parity["n_images"] == 8
    clf = featbank.OnnxClassifier(report.path)
    assert clf.preprocess_config.window == "lung"
    onnx_preds = clf.predict([str(f) for f in files])
    np.testing.assert_allclose([p.probability for p in onnx_preds], [p.probability for p in preds], atol=1e-4)


def test_manifest_and_webdataset_rows_read_dicom(tmp_path):
    data = _ct_folder(tmp_path / "data")
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(
        f"data/{c}/{n},{c}\n" for c in ("air", "bone") for n in sorted(os.listdir(data / c)) if n != "notes"))
    rep = featbank.extract(tmp_path / "m.csv", tmp_path / "m.h5", backbone="test_tiny", engine="torch", num_workers=0,
                           progress=False, window="auto")
    assert rep.n_images == 8 and not rep.skipped
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w") as tf:
        for i, (c, name) in enumerate([("air", "air0.dcm"), ("bone", "bone0.dcm"), ("air", "IM000001")]):
            for member, payload in ((f"s{i}.dcm", (data / c / name).read_bytes()), (f"s{i}.txt", c.encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    rep = featbank.extract(shards, tmp_path / "w.h5", backbone="test_tiny", engine="torch", num_workers=0,
                           progress=False, label_from="txt", window="auto")
    assert rep.n_images == 3 and not rep.skipped


def test_onnx_metadata_window_is_parsed_and_checked(tmp_path):
    from featbank.errors import BundleError
    from featbank.runtime import FORMAT_KEY, FORMAT_VERSION, parse_metadata

    pre = PreprocessConfig((8, 8), 8, "bilinear", (0.5,) * 3, (0.5,) * 3, "lung").to_dict()
    meta = {FORMAT_KEY: FORMAT_VERSION, "classes": json.dumps(["a", "b"]), "preprocessing": json.dumps(pre)}
    assert parse_metadata("m.onnx", meta)[1].window == "lung"
    del pre["window"]
    meta["preprocessing"] = json.dumps(pre)
    assert parse_metadata("m.onnx", meta)[1].window == "none"  # a model exported before windows existed
    pre["window"] = "lungs"
    meta["preprocessing"] = json.dumps(pre)
    with pytest.raises(BundleError, match="preprocessing.window"):
        parse_metadata("m.onnx", meta)

