"""What every image decoder refuses, shared by :mod:`featbank.images` (Pillow's formats) and
:mod:`featbank.dicom` (DICOM), which sit above it: the size limits checked from a header before a
pixel is decoded, and :class:`ImageReadError`, the per-file refusal extraction reports and skips.

``featbank.images`` re-exports every name here (their documented home); this module exists so that
``images`` (which hands DICOM files to ``dicom``) and ``dicom`` (which needs the same checks) do not
import each other.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_PIXELS", "MAX_IMAGE_BYTES", "MAX_ASPECT_RATIO", "ImageReadError", "check_image_bytes",
           "check_aspect_ratio"]

#: Larger images are refused as probable decompression bombs (Pillow's own default limit).
DEFAULT_MAX_PIXELS = 178_956_970
#: Image files (and WebDataset members) larger than this are refused from their size, before a byte is
#: read (1 GiB: an uncompressed RGB image at DEFAULT_MAX_PIXELS is 537 MB).
MAX_IMAGE_BYTES = 1 << 30
#: Images whose longer side is more than this many times the shorter one are refused: resizing the
#: short side of a 1x20000 strip to 256 px would make a 256x5120000 image (3.9 GB).
MAX_ASPECT_RATIO = 100


class ImageReadError(Exception):
    """An image file cannot be decoded; ``reason`` says why in a few words.

    Extraction catches this per file, reports the reason and goes on with the next image.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def check_image_bytes(size: int, max_bytes: int = MAX_IMAGE_BYTES) -> None:
    """Refuse an image file or tar member of ``size`` bytes (from ``stat`` or the tar header) before reading it.

    Raises:
        ImageReadError: empty, or larger than ``max_bytes``.
    """
    if size == 0:
        raise ImageReadError("empty file (0 bytes)")
    if size > max_bytes:
        raise ImageReadError(f"too large: {size} bytes exceeds the limit of {max_bytes} bytes for one image")


def check_aspect_ratio(width: int, height: int, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> None:
    """Refuse an image whose longer side is more than ``max_aspect_ratio`` times its shorter side.

    Raises:
        ImageReadError: with the size and the bound as ``reason``.
    """
    short, long = min(width, height), max(width, height)
    if short < 1 or long > max_aspect_ratio * short:
        ratio = f"{long / short:.0f}:1" if short >= 1 else "degenerate"
        raise ImageReadError(
            f"extreme aspect ratio: {width}x{height} ({ratio}; at most {max_aspect_ratio:g}:1 is accepted, "
            "since resizing its short side would make a huge image)"
        )
