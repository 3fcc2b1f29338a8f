"""Pixel verification of candidate duplicate pairs (``featbank audit --verify pixels``).

A network's pooled embedding keeps what an image shows, not which image it is: a JPEG quality-30
copy of an ELPV cell scores a cosine of ~0.80 to its original at the final layer while two different
cells reach 0.996, so no cosine threshold separates copies from look-alikes. A copy keeps its
pixels, though. Every pair the neighbour search proposes (each image's ``k`` nearest, whatever their
cosine) is scored by the normalised cross-correlation of small grey thumbnails (``THUMB`` x ``THUMB``,
bilinear, mean removed, unit norm; invariant to brightness and contrast, and to JPEG blocking and
resizing, which a thumbnail averages away), taking the best over centred crops of either image to
``CROPS`` of its side (a copy cropped to 85-100% lines up with one of them). A pair is a
near-duplicate when that score is at or above ``pixel_threshold`` (measured in
``scripts/bench_audit.py dups``). Pairs whose images cannot be read keep their cosine verdict.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from ._findings import Pairs

__all__ = ["VERIFY", "CROPS", "THUMB", "DEFAULT_PIXEL_THRESHOLD", "open_row_image", "pixel_descriptor", "pixel_scores"]

#: ``none``: a pair is a duplicate when its cosine is at or above the threshold. ``pixels``: when its
#: thumbnails correlate at or above the pixel threshold.
VERIFY = ("none", "pixels")
#: Centred crops (fraction of the side) tried on either image of a pair.
CROPS = (1.0, 0.95, 0.9, 0.85)
#: Side of the grey thumbnails compared.
THUMB = 64
#: Thumbnail correlation at or above which a pair is a near-duplicate (scripts/bench_audit.py dups).
DEFAULT_PIXEL_THRESHOLD = 0.99

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def _tar_member(root: Path, rel: str) -> Image.Image | None:
    """The image of a WebDataset row key ``<tar>/<key>`` (the member ``<key>.<ext>``), else None."""
    from ..images import DEFAULT_MAX_PIXELS, decode_image

    tar_rel, _, key = rel.rpartition("/")
    tar_path = root / tar_rel
    if not tar_rel.endswith(_TAR_SUFFIXES) or not tar_path.is_file():
        return None
    with tarfile.open(tar_path) as tf:
        for m in tf:
            stem, _, ext = m.name.rpartition(".")
            if m.isfile() and stem == key and ext.lower() in _IMAGE_EXTS:
                fh = tf.extractfile(m)
                return decode_image(io.BytesIO(fh.read()), DEFAULT_MAX_PIXELS) if fh else None
    return None


def open_row_image(root: Path, rel: str) -> tuple[Image.Image | None, str | None]:
    """(image, None) or (None, why not) for a cache row's path (a file, or a member of a WebDataset tar)."""
    from ..images import load_image

    path = Path(rel) if os.path.isabs(rel) else root / rel
    try:
        im = load_image(path) if path.is_file() else _tar_member(root, rel)
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes a reason, never a crash
        return None, f"unreadable: {type(e).__name__}: {str(e)[:120]}"
    if im is None:
        return None, f"not found: {path}"
    return im, None


def pixel_descriptor(im: Image.Image) -> np.ndarray:
    """(len(CROPS), THUMB * THUMB) float32: per centred crop, the grey thumbnail, mean removed, unit norm."""
    g = im.convert("L")
    w, h = g.size
    out = np.zeros((len(CROPS), THUMB * THUMB), np.float32)
    for i, f in enumerate(CROPS):
        box = ((w - w * f) / 2, (h - h * f) / 2, (w + w * f) / 2, (h + h * f) / 2)
        x = np.asarray(g.resize((THUMB, THUMB), Image.BILINEAR, box=box), np.float32).ravel()
        x = x - x.mean()
        out[i] = x / max(float(np.linalg.norm(x)), 1e-6)
    return out


class _Descriptors:
    """Descriptors by row, made on demand, the most recent ``capacity`` kept."""

    def __init__(self, root: Path, paths: list[str] | tuple[str, ...], capacity: int):
        self.root, self.paths, self.capacity = root, paths, max(2, capacity)
        self.memo: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self.skipped: dict[str, str] = {}

    def get(self, row: int) -> np.ndarray | None:
        if row in self.memo:
            self.memo.move_to_end(row)
            return self.memo[row]
        im, why = open_row_image(self.root, self.paths[row])
        if why:
            self.skipped[self.paths[row]] = why
        d = pixel_descriptor(im) if im is not None else None
        self.memo[row] = d
        if len(self.memo) > self.capacity:
            self.memo.popitem(last=False)
        return d


def _score(da: np.ndarray, db: np.ndarray) -> float:
    """Best correlation over crop pairs where at least one image is uncropped."""
    c = da @ db.T
    return float(max(c[0].max(), c[:, 0].max()))


def pixel_scores(pairs: Pairs, root: Path, paths: list[str] | tuple[str, ...], max_memory: int = 1 << 30
                 ) -> tuple[np.ndarray, dict[str, str]]:
    """(thumbnail correlation per pair, NaN where an image is unreadable; {path: why not})."""
    per_row = len(CROPS) * THUMB * THUMB * 4
    desc = _Descriptors(root, paths, max_memory // per_row)
    order = np.lexsort((pairs.b, pairs.a))
    out = np.full(len(pairs), np.nan, np.float32)
    for i in order:
        da, db = desc.get(int(pairs.a[i])), desc.get(int(pairs.b[i]))
        if da is not None and db is not None:
            out[i] = _score(da, db)
    return out, desc.skipped
