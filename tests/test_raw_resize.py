"""The preprocessing graph of `export --input raw` against featbank's Pillow pipeline, pixel by pixel."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from featbank.errors import ConfigError
from featbank.export._raw import RAW_PIXEL_TOLERANCE, check_raw_interpolation, preprocess_graph
from featbank.images import PreprocessConfig, preprocess_image

MEAN = (0.5, 0.5, 0.5)
CONFIGS = {
    "bicubic-224": PreprocessConfig((224, 224), 256, "bicubic", MEAN, MEAN),
    "bilinear-32": PreprocessConfig((32, 32), 36, "bilinear", MEAN, MEAN),
    "pad-crop-larger": PreprocessConfig((40, 48), 30, "bicubic", MEAN, MEAN),  # torchvision pads with zeros
    "non-square": PreprocessConfig((64, 96), 72, "bilinear", MEAN, MEAN),
}
SIZES = [(7, 5), (1, 1), (300, 300), (640, 360), (2000, 20), (16, 1440), (256, 400), (36, 36), (37, 35)]


def _picture(w: int, h: int) -> Image.Image:
    """A smooth picture with edges (what photos are), at any size."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127 + 120 * np.sin(xx / max(w, 1) * 7) * np.cos(yy / max(h, 1) * 5)
    g = np.where((xx // max(w // 6, 1) + yy // max(h // 4, 1)) % 2 == 0, 40, 210)
    b = 255 * xx / max(w - 1, 1)
    return Image.fromarray(np.dstack([r, g, b]).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_graph_equals_pillow_within_tolerance(name: str) -> None:
    cfg = CONFIGS[name]
    model = preprocess_graph(cfg, 18, "images")
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    exact = total = 0
    for w, h in SIZES:
        img = _picture(w, h)
        if max(w, h) > 100 * min(w, h):
            continue
        ref = preprocess_image(img, cfg)
        got = sess.run(None, {"images": np.asarray(img)[None]})[0][0]
        assert got.shape == ref.shape == (*cfg.input_size, 3) and got.dtype == np.uint8
        diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
        assert diff.max() <= RAW_PIXEL_TOLERANCE, (name, w, h, int(diff.max()))
        exact += int((diff == 0).sum())
        total += diff.size
    assert exact / total > 0.97  # almost every pixel identical to Pillow's


def test_equal_size_batch_equals_single_images() -> None:
    cfg = CONFIGS["bicubic-224"]
    sess = ort.InferenceSession(preprocess_graph(cfg, 18, "images").SerializeToString())
    imgs = np.stack([np.asarray(_picture(500, 330)), np.asarray(_picture(500, 330).transpose(Image.FLIP_LEFT_RIGHT))])
    batch = sess.run(None, {"images": imgs})[0]
    for i in range(2):
        assert np.array_equal(batch[i], sess.run(None, {"images": imgs[i:i + 1]})[0][0])


def test_filters_the_graph_cannot_reproduce_are_refused() -> None:
    with pytest.raises(ConfigError, match="'lanczos'.*--input preprocessed"):
        check_raw_interpolation(PreprocessConfig((32, 32), 36, "lanczos", MEAN, MEAN))
