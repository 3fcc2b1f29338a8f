"""A corpus of awkward image files, shared by the image, data and extraction tests.

``make_bad_image_corpus(root)`` writes every case into ``root`` and returns, for each file that
:func:`featbank.sources.scan_folder` indexes, whether :func:`featbank.images.load_image` must
convert it (``"ok"``) or refuse it with ``ImageReadError`` (``"skip"``). All files are tiny and
made with Pillow or by hand; the whole corpus takes well under a second.
"""

from __future__ import annotations

import functools
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "BOMB_SIDE",
    "make_bad_image_corpus",
    "png_bytes",
    "bomb_png_bytes",
    "noise_rgb",
]

#: The decompression bomb claims BOMB_SIDE x BOMB_SIDE pixels (400 M, over Pillow's own limit).
BOMB_SIDE = 20_000


def noise_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random uint8 RGB pixels, so that compressed files are not trivially small."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(
    width: int, height: int, bit_depth: int, color_type: int, rows: Sequence[bytes]
) -> bytes:
    """Encode a PNG by hand (Pillow cannot write 16-bit RGB); ``rows`` are raw scanlines."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@functools.lru_cache(maxsize=1)
def bomb_png_bytes() -> bytes:
    """A valid 1-bit PNG of BOMB_SIDE x BOMB_SIDE black pixels, ~200 kB on disk, 400 MB decoded."""
    side = BOMB_SIDE
    row = b"\x00" * (1 + side // 8)
    comp = zlib.compressobj(1)
    block = row * 100
    idat = b"".join(comp.compress(block) for _ in range(side // 100)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _rgb(path: Path) -> None:
    Image.fromarray(noise_rgb(24, 32, seed=1)).save(path)


def _grey(path: Path) -> None:
    Image.new("L", (8, 6), 77).save(path)


def _bilevel(path: Path) -> None:
    img = Image.new("1", (8, 8), 0)
    img.putpixel((0, 0), 1)
    img.save(path)


def _grey_alpha(path: Path) -> None:
    Image.new("LA", (8, 8), (100, 50)).save(path)


def _rgba(path: Path) -> None:
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(path)


def _palette_transparency(path: Path) -> None:
    # Index 0 red (half transparent), index 1 green; transparency given as bytes, the case in
    # which Pillow's convert('RGB') warns.
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    for x in range(4, 8):
        for y in range(8):
            img.putpixel((x, y), 1)
    img.save(path, transparency=bytes([128, 255]))


def _cmyk_jpeg(path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)


def _grey16(path: Path) -> None:
    arr = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(2, axis=0)
    Image.fromarray(arr).save(path)


def _rgb16(path: Path) -> None:
    px = [(65535, 32768, 0), (0, 257, 65535)]
    row = b"".join(struct.pack(">HHH", *p) for p in px)
    path.write_bytes(png_bytes(2, 2, 16, 2, [row, row]))


def _float_tiff(path: Path) -> None:
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F").save(path)


def _exif_rotated(path: Path) -> None:
    # 32 wide x 16 high, white with a red 8x8 block at the top left; orientation 6 means "rotate
    # 90 degrees clockwise to display", which moves the block to the top right of a 16x32 image.
    img = Image.new("RGB", (32, 16), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, quality=95, exif=exif)


def _one_pixel(path: Path) -> None:
    Image.new("RGB", (1, 1), (7, 8, 9)).save(path)


def _unicode(path: Path) -> None:
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)


def _animation(path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _upper_ext(path: Path) -> None:
    Image.new("RGB", (4, 4), (200, 100, 50)).save(path, format="PNG")


def _unreadable(path: Path) -> None:
    Image.new("RGB", (4, 4), (9, 9, 9)).save(path)
    path.chmod(0)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _truncated_png(path: Path) -> None:
    buf = path.with_suffix(".tmp")
    Image.fromarray(noise_rgb(32, 32, seed=2)).save(buf, format="PNG")
    data = buf.read_bytes()
    buf.unlink()
    path.write_bytes(data[: len(data) // 2])


def _truncated_jpeg(path: Path) -> None:
    buf = path.with_suffix(".tmp")
    Image.fromarray(noise_rgb(32, 32, seed=3)).save(buf, format="JPEG", quality=90)
    data = buf.read_bytes()
    buf.unlink()
    path.write_bytes(data[: len(data) // 2])


def _text_as_jpeg(path: Path) -> None:
    path.write_text("this is not an image, only text with a .jpg name\n", encoding="utf-8")


def _bomb(path: Path) -> None:
    path.write_bytes(bomb_png_bytes())


def _strip_tall(path: Path) -> None:
    # 1x20000 grey PNG of ~100 bytes: resizing its short side to 256 px used to allocate gigabytes.
    Image.new("L", (1, BOMB_SIDE), 200).save(path)


def _strip_wide(path: Path) -> None:
    Image.new("RGB", (BOMB_SIDE, 1), (10, 20, 30)).save(path)


def _strip_ok(path: Path) -> None:
    Image.fromarray(noise_rgb(150, 2)).save(path)  # 75:1, inside MAX_ASPECT_RATIO


_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

#: (file name, writer, expectation); "ok" cases come first so each class gets some.
_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("rgb.png", _rgb, "ok"),
    ("grey.png", _grey, "ok"),
    ("grey_alpha.png", _grey_alpha, "ok"),
    ("rgba.png", _rgba, "ok"),
    ("palette_transparency.png", _palette_transparency, "ok"),
    ("cmyk.jpg", _cmyk_jpeg, "ok"),
    ("grey16.png", _grey16, "ok"),
    ("rgb16.png", _rgb16, "ok"),
    ("float.tif", _float_tiff, "ok"),
    ("exif_rotated.jpg", _exif_rotated, "ok"),
    ("one_pixel.png", _one_pixel, "ok"),
    ("café_日本.png", _unicode, "ok"),
    ("animation.gif", _animation, "ok"),
    ("bilevel.png", _bilevel, "ok"),
    ("UPPER.PNG", _upper_ext, "ok"),
    ("empty.png", _empty, "skip"),
    ("truncated.png", _truncated_png, "skip"),
    ("truncated.jpg", _truncated_jpeg, "skip"),
    ("text.jpg", _text_as_jpeg, "skip"),
    ("bomb.png", _bomb, "skip"),
    ("strip_tall.png", _strip_tall, "skip"),
    ("strip_wide.png", _strip_wide, "skip"),
    ("strip_ok.png", _strip_ok, "ok"),
    # chmod 000 does not stop root from reading.
    ("unreadable.png", _unreadable, "ok" if _ROOT else "skip"),
]


def make_bad_image_corpus(root: Path, classes: Sequence[str] | None = None) -> dict[str, str]:
    """Write every awkward case into ``root`` and return ``{relative path: "ok" | "skip"}``.

    Args:
        root: folder to write into (created if missing).
        classes: if given, case ``i`` goes into ``root/classes[i % len(classes)]/``, so the
            folder is an ImageFolder; every class gets at least one "ok" image as long as there
            are no more than 15 classes. Otherwise the files lie flat in ``root``.

    Returns:
        Expectations keyed by POSIX path relative to ``root``, for exactly the files that
        ``scan_folder`` indexes.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    for i, (name, write, expectation) in enumerate(_CASES):
        rel = f"{classes[i % len(classes)]}/{name}" if classes else name
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        expected[rel] = expectation
    return expected
