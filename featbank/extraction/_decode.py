"""``--decode gpu``: JPEG bytes read by the DataLoader workers, decoded and resized as tensors on the run's device.

The workers only read a file's bytes and check its header with Pillow's lazy ``Image.open`` (format,
mode, size limits, EXIF orientation; no pixel is decoded). The main process decodes the batch's
JPEGs in one call of ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA, libjpeg on the CPU), then
orients, resizes (shorter side to ``resize_size``, antialiased, the weights' interpolation) and
centre-crops each image with torch ops on the device, with the same target sizes and crop offsets
as :func:`featbank.images.preprocess_image`. Anything else takes the Pillow path, with today's skip
rules and reasons: non-JPEG files and CMYK JPEGs in the worker, JPEGs the decoder refuses (corrupt,
unsupported) one by one in the main process.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .._device import quiet_worker_init
from ..errors import ConfigError
from ..images import (
    DEFAULT_MAX_PIXELS,
    MAX_ASPECT_RATIO,
    MAX_RESIZED_PIXELS,
    PreprocessConfig,
)
from ._embedding import ImageRowsDataset, embed_block

if TYPE_CHECKING:
    from ..cache import PartWriter  # exported by featbank.cache's face (cachehouse, #23)
    from ..features import FeatureSpec
    from ._engines import Engine
    from ._jobs import WorkerSettings

__all__ = ["DECODERS", "TENSOR_INTERPOLATIONS", "resolve_decode", "check_decode_transform", "read_jpeg",
           "preprocess_tensor", "JpegRowsDataset", "JpegCollate", "DeviceDecoder", "embed_jpeg_rows"]

#: The values of ``--decode``: ``auto`` is ``gpu`` on a CUDA device, else ``pillow``.
DECODERS = ("pillow", "gpu", "auto")
#: The interpolations torchvision's tensor resize has (Pillow also has lanczos, box, hamming).
TENSOR_INTERPOLATIONS = frozenset({"nearest", "bilinear", "bicubic"})
#: A JPEG larger than this many bytes takes the Pillow path (which streams the file).
MAX_JPEG_BYTES = 64 << 20
#: EXIF orientation tag.
_ORIENTATION = 0x0112


def resolve_decode(decode: str, device: str, *, features: FeatureSpec | None = None, webdataset: bool = False) -> str:
    """``pillow`` or ``gpu``: the decoder a run uses (``auto`` is ``gpu`` on CUDA for image files, else ``pillow``).

    Raises:
        ConfigError: an unknown value; ``gpu`` with layers or views, or with WebDataset input (not
            supported in this version); ``gpu`` without torchvision's JPEG decoder.
    """
    if decode not in DECODERS:
        raise ConfigError(f"The 'decode' parameter must be one of {DECODERS}. Got {decode!r} instead.")
    if decode == "auto":
        plain = features is None and not webdataset
        return "gpu" if device.split(":")[0] == "cuda" and plain and _has_decoder() else "pillow"
    if decode == "gpu":
        if features is not None:
            raise ConfigError("--decode gpu does not support --layers or --views yet; use --decode pillow for those runs.")
        if webdataset:
            raise ConfigError("--decode gpu does not read WebDataset shards yet; use --decode pillow for tar inputs.")
        if not _has_decoder():
            raise ConfigError("--decode gpu needs torchvision with its image decoders (torchvision.io.decode_jpeg); "
                              "install torchvision, or use --decode pillow.")
    return decode


def _has_decoder() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no decoder
        return False
    return True


def check_decode_transform(decode: str, transform: dict[str, Any]) -> None:
    """Refuse ``gpu`` for a backbone whose interpolation torchvision's tensor resize does not have."""
    interp = str(transform.get("interpolation", ""))
    if decode == "gpu" and interp not in TENSOR_INTERPOLATIONS:
        raise ConfigError(f"--decode gpu resizes with torchvision, which has no {interp!r} interpolation "
                          f"(this backbone's); use --decode pillow.")


def _size_accepted(w: int, h: int, resize_size: int) -> bool:
    """Whether the Pillow path would accept these dimensions (else it refuses them, with its reason)."""
    short, long = min(w, h), max(w, h)
    if w * h > DEFAULT_MAX_PIXELS or short < 1 or long > MAX_ASPECT_RATIO * short:
        return False
    return resize_size * int(resize_size * long / short) <= MAX_RESIZED_PIXELS


def read_jpeg(path: str | os.PathLike, cfg: PreprocessConfig) -> tuple[np.ndarray, int] | None:
    """The bytes and EXIF orientation of a JPEG the tensor path can take; ``None`` sends the file to Pillow.

    Only the header is parsed. ``None`` for anything not a complete (ends with the EOI marker) RGB or
    greyscale JPEG within the size limits, and for any read error: the Pillow path then decodes the
    file or gives today's reason for refusing it.
    """
    try:
        with open(path, "rb") as fp:
            st = os.fstat(fp.fileno())
            if not stat.S_ISREG(st.st_mode) or not 0 < st.st_size <= MAX_JPEG_BYTES:
                return None
            data = fp.read()
        if not data.endswith(b"\xff\xd9"):  # truncated (or trailing bytes): Pillow decides
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            if not _size_accepted(*img.size, cfg.resize_size):
                return None
            orientation = _orientation(img)
    except Exception:  # noqa: BLE001 - the Pillow path reports what is wrong with the file
        return None
    return np.frombuffer(data, np.uint8), orientation


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - broken metadata: no rotation, as the Pillow path does
        return 1
    return value if 2 <= value <= 8 else 1


def _orient(img: Any, orientation: int) -> Any:
    """A CHW tensor turned as ``PIL.ImageOps.exif_transpose`` turns the image of that EXIF orientation."""
    import torch

    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1).flip(-2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return torch.rot90(img, 1, (-2, -1))
    return img


def preprocess_tensor(img: Any, cfg: PreprocessConfig, orientation: int = 1) -> Any:
    """A decoded uint8 CHW RGB tensor -> the uint8 HWC crop, on its device.

    The same steps, sizes and offsets as :func:`featbank.images.preprocess_image`: EXIF orientation,
    shorter side resized to ``cfg.resize_size`` (long side ``int(size * long / short)``, antialiased),
    zero padding where the crop is larger, crop offsets ``round((h - ch) / 2)``. The resampling
    is torchvision's, so pixels differ slightly from Pillow's (not bit for bit).
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    img = _orient(img, orientation)
    h, w = int(img.shape[-2]), int(img.shape[-1])
    size = cfg.resize_size
    short, long = min(w, h), max(w, h)
    if short != size:
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        img = F.resize(img, [new_h, new_w], interpolation=InterpolationMode(cfg.interpolation), antialias=True)
        h, w = new_h, new_w
    ch, cw = cfg.input_size
    if w < cw or h < ch:
        big_h, big_w = max(h, ch), max(w, cw)
        canvas = img.new_zeros((img.shape[0], big_h, big_w))
        top, left = (big_h - h) // 2, (big_w - w) // 2
        canvas[:, top:top + h, left:left + w] = img
        img, h, w = canvas, big_h, big_w
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return img[:, top:top + ch, left:left + cw].permute(1, 2, 0)


#: A worker's item: row, Pillow pixels or None, skip reason, JPEG bytes or None, EXIF orientation.
JpegItem = tuple[int, "np.ndarray | None", str, "np.ndarray | None", int]


class JpegRowsDataset:
    """Map-style dataset over staging rows: a JPEG's bytes for the device, or the Pillow path's pixels or reason."""

    def __init__(self, root: Path, paths: list[str], rows: np.ndarray, cfg: PreprocessConfig):
        self.pillow = ImageRowsDataset(root, paths, rows, cfg)

    def __len__(self) -> int:
        return len(self.pillow)

    def __getitem__(self, i: int) -> JpegItem:
        p = self.pillow
        row = int(p.rows[i])
        found = read_jpeg(p.root / p.paths[row], p.cfg)
        if found is not None:
            return row, None, "", found[0], found[1]
        _, pixels, why = p[i]
        return row, pixels, why, None, 1


class JpegCollate:
    """Items -> rows, the Pillow pixels (uint8 NHWC), ok, reasons, and ``(j, bytes, orientation)`` per JPEG."""

    def __init__(self, cfg: PreprocessConfig):
        self.shape = (*cfg.input_size, 3)

    def __call__(self, items: list[JpegItem]) -> tuple[np.ndarray, Any, np.ndarray, list[str], list[tuple[int, Any, int]]]:
        import torch

        rows = np.array([it[0] for it in items], np.int64)
        ok = np.array([it[1] is not None for it in items], bool)
        pixels = np.zeros((len(items), *self.shape), np.uint8)
        jpegs = []
        for j, it in enumerate(items):
            if it[1] is not None:
                pixels[j] = it[1]
            if it[3] is not None:
                jpegs.append((j, torch.from_numpy(it[3].copy()), it[4]))
        return rows, torch.from_numpy(pixels), ok, [it[2] for it in items], jpegs


class DeviceDecoder:
    """Decodes a batch's JPEGs on ``device`` and fills their crops into the batch; failures go to ``fallback``."""

    def __init__(self, cfg: PreprocessConfig, device: str):
        import torch

        self.cfg, self.device = cfg, torch.device(device)

    def _decode(self, data: list[Any]) -> list[Any]:
        """Decoded CHW tensors (``None`` where the decoder refused one): the batch in one call, else one by one."""
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
            try:
                return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
            except Exception:  # noqa: BLE001 - one bad file must not cost the batch: retry each alone
                out = []
                for d in data:
                    try:
                        out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                    except Exception:  # noqa: BLE001 - refused: the Pillow path decides
                        out.append(None)
                return out

    def __call__(self, pixels: Any, ok: np.ndarray, reasons: list[str], jpegs: list[tuple[int, Any, int]],
                 fallback: Callable[[int], tuple[np.ndarray | None, str]]) -> Any:
        """The uint8 NHWC batch on the device; ``ok`` and ``reasons`` are updated in place.

        ``fallback(j)`` gives the Pillow path's pixels (or ``None`` and the reason) for batch item ``j``.
        """
        import torch

        batch = pixels.to(self.device)
        if not jpegs:
            return batch
        decoded = self._decode([d for _, d, _ in jpegs])
        for (j, _, orientation), img in zip(jpegs, decoded):
            if img is not None:
                try:
                    batch[j] = preprocess_tensor(img, self.cfg, orientation)
                    ok[j] = True
                    continue
                except Exception:  # noqa: BLE001 - e.g. out of device memory for one huge image: Pillow decides
                    pass
            arr, why = fallback(j)
            if arr is not None:
                batch[j] = torch.from_numpy(arr).to(self.device)
                ok[j] = True
            else:
                reasons[j] = why
        return batch


def embed_jpeg_rows(writer: PartWriter, root: Path, pending: np.ndarray, cfg: PreprocessConfig,
                    settings: WorkerSettings, eng: Engine,
                    skipped: dict[int, str], on_rows: Callable[[int], None]) -> None:
    """The embedding loop of ``--decode gpu`` (the embedding alone): workers read bytes, this process decodes."""
    from torch.utils.data import DataLoader

    dataset = JpegRowsDataset(root, writer.paths, pending, cfg)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, num_workers=settings.num_workers,
                        collate_fn=JpegCollate(cfg), prefetch_factor=4 if settings.num_workers > 0 else None,
                        worker_init_fn=quiet_worker_init)
    decoder = DeviceDecoder(cfg, settings.device)
    for rows, pixels, ok, reasons, jpegs in loader:
        def fallback(j: int, rows: np.ndarray = rows) -> tuple[np.ndarray | None, str]:
            _, arr, why = dataset.pillow.item(int(rows[j]))
            return arr, why

        batch = decoder(pixels, ok, reasons, jpegs, fallback)
        embed_block(writer, eng, rows, batch, ok, reasons, skipped)
        on_rows(len(rows))
