"""Image decoding and eval preprocessing, with no torch import.

This module is shared by extraction, prediction and the light ONNX runtime
(``featbank.runtime``), so it may import only numpy and Pillow (pydicom only when a DICOM file
comes, :mod:`featbank.dicom`). Resizing follows torchvision's
PIL path exactly (shorter side to ``resize_size``, then a centre crop), so a config taken from
``weights.transforms()`` or timm's ``pretrained_cfg`` gives the same pixels here.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ._files import NotRegularFileError, open_regular_file
from ._limits import (
    DEFAULT_MAX_PIXELS,
    MAX_ASPECT_RATIO,
    MAX_IMAGE_BYTES,
    ImageReadError,
    check_aspect_ratio,
    check_image_bytes,
)
from .windowing import Window, parse_window, percentile_range, range_to_uint8, window_to_uint8

__all__ = [
    "IMAGE_EXTENSIONS",
    "PreprocessConfig",
    "ImageReadError",
    "DEFAULT_MAX_PIXELS",
    "MAX_IMAGE_BYTES",
    "MAX_ASPECT_RATIO",
    "check_image_bytes",
    "MAX_RESIZED_PIXELS",
    "check_aspect_ratio",
    "check_resizable",
    "load_image",
    "preprocess_image",
    "load_and_preprocess",
    "decode_image",
    "to_uint8_rgb",
    "RESAMPLE",
]

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".png",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".jfif",
        ".dcm",
        ".dicom",
    }
)

#: The resized image (before the centre crop) may have at most this many pixels (192 MB as RGB).
MAX_RESIZED_PIXELS = 1 << 26

#: Interpolation names of a PreprocessConfig -> Pillow resampling filters.
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """The eval transform that travels with a backbone's weights.

    Attributes:
        input_size: (height, width) of the centre crop fed to the network.
        resize_size: the shorter image side is resized to this before cropping.
        interpolation: Pillow resampling filter name (``bicubic``, ``bilinear``, ...).
        mean: per-channel mean, on the 0..1 scale, RGB order.
        std: per-channel standard deviation, on the 0..1 scale, RGB order.
        window: how single-channel high-bit-depth pixels (DICOM, 16-bit PNG/TIFF) become 8 bits:
            ``none``, ``auto``, ``lung``, ``soft-tissue``, ``bone``, ``brain`` or ``C,W``
            (:mod:`featbank.windowing`); stored in canonical form.
    """

    input_size: tuple[int, int]
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    window: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "resize_size", int(self.resize_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "window", parse_window(self.window).spec)
        if self.interpolation not in RESAMPLE:
            raise ValueError(
                f"Unknown interpolation {self.interpolation!r}; expected one of {sorted(RESAMPLE)}."
            )

    @classmethod
    def from_crop_pct(
        cls,
        input_size: int | Sequence[int],
        crop_pct: float,
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> PreprocessConfig:
        """Build a config the way timm does: ``resize = floor(size / crop_pct)``."""
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        h, w = input_size
        resize = math.floor(min(h, w) / crop_pct) if h == w else math.floor(h / crop_pct)
        return cls((h, w), resize, interpolation, tuple(mean), tuple(std))

    def torchvision_transform(self) -> Any:
        """The same transform as a torchvision pipeline (PIL image -> normalised float CHW tensor):
        ``Resize``, ``CenterCrop``, ``ToTensor``, ``Normalize``, as tutorials write it. Needs torchvision."""
        from torchvision import transforms

        return transforms.Compose([
            transforms.Resize(self.resize_size, interpolation=transforms.InterpolationMode(self.interpolation)),
            transforms.CenterCrop(self.input_size),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])

    @property
    def crop_pct(self) -> float:
        return min(self.input_size) / self.resize_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["layout"] = "NHWC uint8 RGB"
        if self.window == "none":
            # Absent means none, so every transform (and cache key) made before windows existed stays the same.
            del d["window"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        return cls(
            input_size=tuple(d["input_size"]),
            resize_size=d["resize_size"],
            interpolation=d["interpolation"],
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            window=d.get("window", "none"),
        )


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def to_uint8_rgb(img: Image.Image, keep_grey: bool = False, window: str | Window = "none") -> Image.Image:
    """8-bit RGB; with ``keep_grey`` single-channel images stay 8-bit ``L`` (3x less to resize).

    ``window`` (:mod:`featbank.windowing`) applies to 16-bit, 32-bit integer and float single-channel
    images; ``none`` keeps the plain conversion (16-bit scaled by 1/257).
    """
    mode = img.mode
    if mode == "RGB" or (keep_grey and mode == "L"):
        return img
    win = parse_window(window)
    if win.spec != "none" and (mode in _SIXTEEN_BIT_MODES or mode in ("I", "F")):
        grey = Image.fromarray(_windowed(np.asarray(img), win), mode="L")
        return grey if keep_grey else grey.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        # 16-bit data spans 0..65535; Pillow's convert('L') would clip it to 255 instead of scaling.
        # Mode "I" may hold 8-bit values too (some TIFFs), so only scale when it is really wider.
        if mode in _SIXTEEN_BIT_MODES or arr.max(initial=0) > 255:
            arr = arr / 257.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        grey = Image.fromarray(arr, mode="L")
        return grey if keep_grey else grey.convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        hi = 1.0 if arr.size and arr.max() <= 1.0 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        grey = Image.fromarray(arr, mode="L")
        return grey if keep_grey else grey.convert("RGB")
    if mode in ("P", "PA"):
        # convert('RGB') warns for palettes whose transparency is given as bytes; RGBA does not.
        img = img.convert("RGBA")
    # Alpha is dropped, not composited, exactly as torchvision's and timm's loaders do.
    return img.convert("RGB")


def _windowed(arr: np.ndarray, win: Window) -> np.ndarray:
    if win.center is not None and win.width is not None:
        return window_to_uint8(arr, win.center, win.width)
    return range_to_uint8(arr, *percentile_range(arr))  # auto: a PNG/TIFF has no VOI of its own


def _exif_transpose(img: Image.Image) -> None:
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - broken metadata is no reason to refuse pixels that decoded fine
        pass


def decode_image(fp: Any, max_pixels: int, keep_grey: bool = False, max_aspect_ratio: float = MAX_ASPECT_RATIO,
                 window: str | Window = "none", name: str = "") -> Image.Image:
    """Decode an open image file (a path or a binary file object) to 8-bit RGB (or ``L`` with ``keep_grey``),
    EXIF orientation applied; decompression bombs and extreme aspect ratios are refused from the header, before
    any pixel is decoded (ImageReadError). A file with the DICOM preamble, or named ``*.dcm`` / ``*.dicom``
    (``name``), is read by :func:`featbank.dicom.read_dicom`; ``window`` is the window rule
    (:mod:`featbank.windowing`)."""
    if isinstance(fp, (str, os.PathLike)):
        with open(fp, "rb") as fh:
            return decode_image(fh, max_pixels, keep_grey, max_aspect_ratio, window, name or os.fspath(fp))
    if _is_dicom(fp, name):
        from .dicom import read_dicom

        img = read_dicom(fp, max_pixels, window, max_aspect_ratio)
        return img if keep_grey or img.mode == "RGB" else img.convert("RGB")
    img = Image.open(fp)
    w, h = img.size
    # The header is parsed but no pixel is decoded yet: refuse bombs before allocating anything.
    if w * h > max_pixels:
        raise ImageReadError(
            f"too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
            "(possible decompression bomb)"
        )
    check_aspect_ratio(w, h, max_aspect_ratio)
    img.load()
    _exif_transpose(img)
    return to_uint8_rgb(img, keep_grey, window)


def _is_dicom(fp: Any, name: str) -> bool:
    from .dicom import DICOM_EXTENSIONS, DICOM_MAGIC_OFFSET, has_dicom_preamble

    if Path(name).suffix.lower() in DICOM_EXTENSIONS:
        return True
    start = fp.tell()
    head = fp.read(DICOM_MAGIC_OFFSET + 4)
    fp.seek(start)
    return has_dicom_preamble(head)


def load_image(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, *, keep_grey: bool = False,
    max_aspect_ratio: float = MAX_ASPECT_RATIO, window: str | Window = "none",
) -> Image.Image:
    """Decode an image file into an 8-bit RGB Pillow image.

    The EXIF orientation is applied. Grey, grey+alpha, palette (with or without transparency),
    CMYK, 16-bit and float images are converted; 16-bit values are scaled by 1/257 (65535 -> 255),
    not clipped; alpha is dropped as torchvision's loader does. Animated images give their first
    frame. The pixel count and the aspect ratio are checked from the header, before anything is
    decoded (a 1x20000 PNG of 118 bytes would become a 256x5120000 image once its short side is
    resized, 3.9 GB), and no global
    Pillow setting is changed (``Image.MAX_IMAGE_PIXELS`` still applies on top of ``max_pixels``).
    DICOM files (the ``DICM`` preamble, or a ``.dcm``/``.dicom`` name) are read with pydicom
    (:mod:`featbank.dicom`: modality LUT, window, MONOCHROME1 inverted, colour converted, the
    middle frame of a multi-frame file), under the same limits counted over every frame.
    Truncated files are refused, never padded, unless the caller has set Pillow's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES``. Decoder warnings are silenced (``warnings.catch_warnings``,
    which on Python < 3.14 is process-wide while a file decodes).

    Args:
        path: the image file.
        max_pixels: images with more pixels (width x height) are refused.
        max_aspect_ratio: images whose longer side exceeds this many times the shorter are refused.
        keep_grey: return single-channel images as 8-bit ``L`` instead of ``RGB``;
            :func:`preprocess_image` then gives exactly the same array, faster.
        window: how single-channel high-bit-depth pixels become 8 bits (:mod:`featbank.windowing`):
            ``none`` (default), ``auto``, ``lung``, ``soft-tissue``, ``bone``, ``brain`` or ``C,W``.

    Returns:
        A loaded Pillow image in mode ``RGB`` (or ``L`` with ``keep_grey``).

    Raises:
        ImageReadError: the file is missing, not a regular file (checked on the open file: a FIFO swapped in
            after a listing is refused, never waited on), larger than :data:`MAX_IMAGE_BYTES`, unreadable, empty, truncated,
            corrupt, not an image, has more than ``max_pixels`` pixels or an aspect ratio beyond
            ``max_aspect_ratio``. ``reason`` says which.

    Example:
        >>> img = load_image("DATA/cat/001.jpg")  # doctest: +SKIP
        >>> img.mode
        'RGB'
    """
    path = Path(path)
    try:
        fp = open_regular_file(path)
    except FileNotFoundError:
        raise ImageReadError(
            "file not found (moved or deleted since the scan, or a broken link)"
        ) from None
    except NotRegularFileError as e:
        raise ImageReadError("not a file: it is a directory" if e.kind == "a folder" else "not a regular file") from None
    except IsADirectoryError:
        raise ImageReadError("not a file: it is a directory") from None
    except PermissionError:
        raise ImageReadError("permission denied") from None
    except OSError as e:
        raise ImageReadError(f"cannot open: {e.strerror or e}") from None
    with fp:
        try:
            st = os.fstat(fp.fileno())
        except OSError as e:
            raise ImageReadError(f"cannot stat: {e.strerror or e}") from None
        check_image_bytes(st.st_size)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return decode_image(fp, max_pixels, keep_grey, max_aspect_ratio, window, path.name)
        except ImageReadError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageReadError(f"too large (possible decompression bomb): {e}") from None
        except Image.UnidentifiedImageError:
            raise ImageReadError("not an image (format not recognised)") from None
        except PermissionError:
            raise ImageReadError("permission denied") from None
        except (OSError, SyntaxError, EOFError) as e:
            msg = str(e) or type(e).__name__
            raise ImageReadError(f"truncated or corrupt: {msg}") from None
        except MemoryError:
            raise ImageReadError("out of memory while decoding") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a per-file problem, not a crash
            raise ImageReadError(f"cannot decode: {type(e).__name__}: {e}") from None


def check_resizable(width: int, height: int, cfg: PreprocessConfig, error: type[Exception] = ImageReadError) -> None:
    """Refuse an image the resize of ``cfg`` cannot take in bounded memory.

    Its aspect ratio must be at most :data:`MAX_ASPECT_RATIO` and the resized image (shorter side
    ``cfg.resize_size``) at most :data:`MAX_RESIZED_PIXELS` pixels. Used before the Pillow resize and
    before an image is fed to a graph that resizes inside (``export --input raw``).

    Raises:
        ImageReadError: (or ``error``, called with the message) the image is refused; the message
            says why, with its size.
    """
    try:
        check_aspect_ratio(width, height)
    except ImageReadError as e:
        if error is ImageReadError:
            raise
        raise error(f"The image is refused: {e.reason}.") from None
    size = cfg.resize_size
    short, long = min(width, height), max(width, height)
    if size * int(size * long / short) > MAX_RESIZED_PIXELS:
        reason = (f"resize target too large: {width}x{height} with its short side resized to {size} would have "
                  f"{size * int(size * long / short)} pixels (limit {MAX_RESIZED_PIXELS})")
        raise ImageReadError(reason) if error is ImageReadError else error(f"The image is refused: {reason}.")


def preprocess_image(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Resize the shorter side and centre-crop, bit for bit as torchvision's PIL path does.

    Equal to ``Resize(cfg.resize_size, interpolation) + CenterCrop(cfg.input_size)`` applied to a
    PIL image (zero padding where the crop is larger than the resized image).

    Args:
        img: a Pillow image; modes other than RGB are converted as :func:`load_image` does.
        cfg: the preprocessing config of the backbone.

    Returns:
        ``uint8`` array of shape ``(height, width, 3)``, RGB, not normalised.

    Raises:
        ImageReadError: the aspect ratio exceeds :data:`MAX_ASPECT_RATIO`, or the resized image
            would exceed :data:`MAX_RESIZED_PIXELS` (memory stays bounded whatever the input).
    """
    if img.mode != "RGB":
        # Grey stays grey until the end: resampling is per channel, so replicating the channel
        # after resize and crop gives the same bytes as converting first, at a third of the cost.
        img = to_uint8_rgb(img, keep_grey=True, window=cfg.window)
    w, h = img.size
    size = cfg.resize_size
    short, long = (w, h) if w <= h else (h, w)
    check_resizable(w, h, cfg)
    if short != size:
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        img = img.resize((new_w, new_h), RESAMPLE[cfg.interpolation])
    w, h = img.size
    ch, cw = cfg.input_size
    if w < cw or h < ch:
        # torchvision pads with zeros when the crop is larger than the image.
        canvas = Image.new(img.mode, (max(w, cw), max(h, ch)))
        canvas.paste(img, ((max(w, cw) - w) // 2, (max(h, ch) - h) // 2))
        img = canvas
        w, h = img.size
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    img = img.crop((left, top, left + cw, top + ch))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape != (ch, cw, 3):
        raise ImageReadError(f"unexpected decoded shape {arr.shape}")
    return arr


def load_and_preprocess(path: str | os.PathLike, cfg: PreprocessConfig) -> np.ndarray:
    """``preprocess_image(load_image(path, window=cfg.window), cfg)``, keeping grey images single-channel until the end."""
    return preprocess_image(load_image(path, keep_grey=True, window=cfg.window), cfg)
