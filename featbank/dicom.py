"""DICOM decoding with pydicom (the optional extra ``featbank[dicom]``), under the image limits.

A DICOM file becomes one 8-bit image, as :func:`featbank.images.load_image` gives for a PNG:

- Monochrome: the modality LUT (rescale slope/intercept, or a Modality LUT Sequence) with
  pydicom's ``apply_modality_lut``, then the window rule (:mod:`featbank.windowing`; ``auto``
  applies the file's own VOI LUT or window with pydicom's ``apply_voi_lut``), then MONOCHROME1
  is inverted so that bright means dense for every file.
- Colour: RGB as stored, YBR converted to RGB by pydicom's decoders (``convert_color_space``),
  PALETTE COLOR through pydicom's ``apply_color_lut``; more than 8 bits are scaled by the bit
  depth. The window does not apply to colour.
- Multi-frame files give their middle frame (``NumberOfFrames // 2``, counting from 0), decoded
  alone; one row per file, so a cache key stays the file's path.
- Compressed transfer syntaxes are decoded when pydicom has a decoder for them (Pillow for JPEG
  baseline and JPEG 2000, pydicom's own RLE, or the pylibjpeg / GDCM plugins when installed);
  otherwise the file is skipped with the transfer syntax and the plugins it needs as the reason.

Limits (checked from the header, before pixel data is read): the file is parsed with every
element over 1 MiB deferred, so neither pixel data nor a large junk element is in memory yet;
``Rows x Columns x NumberOfFrames x SamplesPerPixel`` must stay within the pixel limit of other
images, the aspect-ratio limit applies, and uncompressed pixel data shorter than the header
promises (a lying ``Rows``/``Columns``, a truncated file) or more than twice as long is refused
before it is read. A file without pixel data is skipped with its SOP class.
"""

from __future__ import annotations

import os
import warnings
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image

from .windowing import Window, parse_window, percentile_range, range_to_uint8, window_to_uint8

if TYPE_CHECKING:  # pydicom is optional: imported when a DICOM file comes
    from types import ModuleType

    from pydicom.dataset import Dataset
    from pydicom.uid import UID

__all__ = ["DICOM_EXTENSIONS", "DICOM_MAGIC_OFFSET", "has_dicom_preamble", "is_dicom_file", "read_dicom",
           "dicom_frame", "window_values", "monochrome_to_uint8", "modality_range", "voi_range"]

#: File names that are read as DICOM even without the 128-byte preamble and ``DICM`` magic.
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
#: Where the ``DICM`` magic sits in a DICOM Part 10 file.
DICOM_MAGIC_OFFSET = 128
#: Elements longer than this are read only when used (pixel data after the header checks).
_DEFER_BYTES = 1 << 20


class _Refused(Exception):
    """A per-file reason; featbank.images turns it into ImageReadError."""


def has_dicom_preamble(head: bytes) -> bool:
    """Whether the first 132 bytes of a file carry the DICOM Part 10 magic ``DICM`` at byte 128."""
    return head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM"


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a readable file with the DICOM preamble (for names without an image extension)."""
    try:
        with open(path, "rb") as fh:
            return has_dicom_preamble(fh.read(DICOM_MAGIC_OFFSET + 4))
    except OSError:
        return False


def _pydicom() -> ModuleType:
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401 - pydicom >= 3
    except ImportError:
        raise _Refused("a DICOM file needs pydicom >= 3: pip install 'featbank[dicom]'") from None
    return pydicom


def read_dicom(fp: IO[bytes], max_pixels: int, window: str | Window = "none",
               max_aspect_ratio: float = 100) -> Image.Image:
    """Decode a DICOM file (an open binary file) into an 8-bit ``L`` or ``RGB`` Pillow image.

    Raises:
        featbank.images.ImageReadError: with the reason (no pixel data, too large, truncated,
            a decoder plugin missing, pydicom missing, ...).
    """
    from ._limits import ImageReadError

    try:
        pydicom = _pydicom()
        with warnings.catch_warnings():  # pydicom warns (and logs) about odd but readable files
            warnings.simplefilter("ignore")
            return _read(pydicom, fp, max_pixels, parse_window(window), max_aspect_ratio)
    except _Refused as e:
        raise ImageReadError(str(e)) from None


def _read(pydicom: ModuleType, fp: IO[bytes], max_pixels: int, window: Window, max_aspect_ratio: float) -> Image.Image:
    from ._limits import check_aspect_ratio

    try:
        ds = pydicom.dcmread(fp, force=True, defer_size=_DEFER_BYTES)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise _Refused(f"not a readable DICOM file: {type(e).__name__}: {_first_line(e)}") from None
    frames, rows, cols = _check_header(ds, max_pixels)
    check_aspect_ratio(cols, rows, max_aspect_ratio)
    arr = dicom_frame(ds, frames // 2)
    return _to_image(arr, ds, window)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _int_attr(ds: Dataset, name: str, default: int | None = None) -> int:
    """A whole-number attribute of the header; ``default`` when it is absent or empty (else a reason)."""
    try:
        value = ds.get(name)
    except Exception as e:  # noqa: BLE001 - pydicom may refuse to convert a malformed value
        raise _Refused(f"DICOM attribute {name} is unreadable: {_first_line(e)}") from None
    if value is None or value == "":
        if default is None:
            raise _Refused(f"DICOM attribute {name} is empty")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _Refused(f"DICOM attribute {name} is {value!r}, not a whole number") from None


def _check_header(ds: Dataset, max_pixels: int) -> tuple[int, int, int]:
    """(frames, rows, columns) from the header, refused when the image would be too large."""
    if "Rows" not in ds or "Columns" not in ds:
        sop = getattr(ds.get("SOPClassUID"), "name", None) or "unknown SOP class"
        raise _Refused(f"no pixel data: a DICOM file without an image pixel module (Rows/Columns missing; {sop})")
    rows, cols = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    frames = max(_int_attr(ds, "NumberOfFrames", 1), 1)
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    if rows < 1 or cols < 1:
        raise _Refused(f"empty image: DICOM Rows x Columns is {rows} x {cols}")
    if samples not in (1, 3):
        raise _Refused(f"DICOM SamplesPerPixel is {samples}; only 1 (grey) and 3 (colour) are images")
    total = rows * cols * frames * samples
    if total > max_pixels:
        raise _Refused(
            f"too large: the DICOM header says {cols}x{rows} pixels x {frames} frame(s) x {samples} sample(s) = "
            f"{total} values, over the limit of {max_pixels} (a lying header or a decompression bomb)"
        )
    return frames, rows, cols


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax; for a file without one in its meta, the encoding it was read with."""
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(ts)
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        raise _Refused("DICOM without a transfer syntax: the file meta has none and the encoding is unknown")
    ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta = meta if meta is not None else _empty_meta()
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def _empty_meta() -> Dataset:
    from pydicom.dataset import FileMetaDataset

    return FileMetaDataset()


def dicom_frame(ds: Dataset, index: int) -> np.ndarray:
    """Frame ``index`` of a read dataset, decoded by pydicom (YBR converted to RGB), or a reason.

    Raises:
        _Refused: no pixel data, truncated pixel data, no decoder for the transfer syntax, or a
            decoder failure.
    """
    from pydicom.pixels import get_decoder, pixel_array
    from pydicom.pixels.utils import get_expected_length

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = getattr(ds.get("SOPClassUID"), "name", None) or "unknown SOP class"
        raise _Refused(f"no pixel data: a DICOM file without an image ({sop})")
    if "BitsAllocated" not in ds or "PhotometricInterpretation" not in ds:
        raise _Refused("no image pixel module: DICOM BitsAllocated or PhotometricInterpretation is missing")
    ts = _transfer_syntax(ds)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise _Refused(f"unsupported DICOM transfer syntax {ts.name} ({ts})") from None
    if not decoder.is_available:
        need = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise _Refused(f"compressed DICOM ({ts.name}) needs a decoder plugin that is not installed: {need}")
    if not ts.is_encapsulated and "PixelData" in ds:
        _check_length(ds, get_expected_length(ds, "bytes"))
    try:
        return np.asarray(pixel_array(ds, index=index))
    except MemoryError:
        raise _Refused("out of memory while decoding the DICOM pixel data") from None
    except Exception as e:  # noqa: BLE001 - a decoder failure is a per-file reason
        others = "; ".join(decoder.missing_dependencies) if ts.is_compressed else ""
        hint = f" (decoder plugins not installed: {others})" if others else ""
        raise _Refused(f"cannot decode DICOM pixel data ({ts.name}): {type(e).__name__}: {_flat(e)}{hint}") from None


def _check_length(ds: Dataset, want: int) -> None:
    """Uncompressed pixel data must be as long as the header says, checked before a deferred value is read."""
    elem = ds.get_item("PixelData", keep_deferred=True)
    have = len(elem.value) if elem.value is not None else int(elem.length)
    if have < want:
        raise _Refused(f"truncated DICOM pixel data: {have} bytes, the header (Rows x Columns x frames x samples x "
                       f"bits) needs {want}")
    if have > 2 * want + 1024:
        raise _Refused(f"DICOM pixel data of {have} bytes, over twice the {want} its header (Rows x Columns x frames x "
                       "samples x bits) says: a lying header")


def _flat(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _to_image(arr: np.ndarray, ds: Dataset, window: Window) -> Image.Image:
    from pydicom.pixels import apply_color_lut

    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if pi == "PALETTE COLOR" and arr.ndim == 2:
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:  # noqa: BLE001 - a broken palette is a per-file reason
            raise _Refused(f"unusable DICOM palette: {type(e).__name__}: {_flat(e)}") from None
        bits = 16 if arr.dtype.itemsize > 1 else 8
        return Image.fromarray(range_to_uint8(arr, 0, 2**bits - 1) if bits > 8 else arr.astype(np.uint8), "RGB")
    if arr.ndim == 3:
        if arr.shape[2] != 3:
            raise _Refused(f"unexpected decoded DICOM shape {arr.shape}")
        if arr.dtype == np.uint8:
            return Image.fromarray(arr, "RGB")
        bits = _int_attr(ds, "BitsStored", arr.dtype.itemsize * 8)
        return Image.fromarray(range_to_uint8(arr, 0, 2**bits - 1), "RGB")
    if arr.ndim != 2:
        raise _Refused(f"unexpected decoded DICOM shape {arr.shape}")
    grey = monochrome_to_uint8(arr, ds, window)
    return Image.fromarray(grey, "L")


def window_values(values: np.ndarray, ds: Dataset, window: Window) -> tuple[np.ndarray, float, float]:
    """``(values, lo, hi)`` for ``none`` or ``auto``: what maps linearly onto 0..255, ``lo`` to 0 and ``hi`` to 255.

    ``values`` are the modality LUT's output. ``auto`` with a VOI in the file: those values through
    pydicom's ``apply_voi_lut`` and its output range; ``auto`` without a usable VOI: the 0.5 / 99.5
    percentiles. ``none``: the modality range the header allows (else the values' min and max).
    """
    from pydicom.pixels import apply_voi_lut

    if window.spec == "auto":
        rng = voi_range(ds)
        if rng is not None:
            try:
                return np.asarray(apply_voi_lut(values, ds), dtype=np.float64), *rng
            except Exception:  # noqa: BLE001 - an unusable VOI (width < 1, odd function): the robust range instead
                pass
        return values, *percentile_range(values)
    rng = modality_range(ds)
    return (values, *rng) if rng is not None else (values, *_min_max(values))


def monochrome_to_uint8(arr: np.ndarray, ds: Dataset, window: Window) -> np.ndarray:
    """A monochrome frame as ``uint8``: pydicom's modality LUT, the window rule, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(arr, ds)
    if window.center is not None and window.width is not None:
        out = window_to_uint8(values, window.center, window.width)
    else:
        out = range_to_uint8(*window_values(values, ds, window))
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        out = 255 - out
    return out


def _min_max(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def modality_range(ds: Dataset) -> tuple[float, float] | None:
    """The range of the modality LUT's output the header allows (PS3.3 C.11.1; as pydicom's windowing).

    A Modality LUT Sequence: ``0 .. 2**bits - 1`` of its descriptor. Otherwise the stored range
    (``BitsStored``, signed or not) through the rescale slope and intercept. None when the header
    does not say (float pixel data, no ``BitsStored``).
    """
    try:
        seq = ds.get("ModalityLUTSequence")
        if seq:
            return 0.0, float(2 ** int(seq[0].LUTDescriptor[2]) - 1)
        bits = int(ds.BitsStored)
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds or not 1 <= bits <= 32:
            return None
        lo, hi = (0, 2**bits - 1) if int(ds.get("PixelRepresentation", 0)) == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is not None and intercept is not None:
            lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
        return float(lo), float(hi)
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):
        return None


def voi_range(ds: Dataset) -> tuple[float, float] | None:
    """The output range of the VOI that pydicom's ``apply_voi_lut`` applies to this file, or None if it has none.

    A VOI LUT Sequence (preferred, as pydicom does): ``0 .. 2**bits - 1`` of its descriptor. A
    window centre/width: the modality range (PS3.3 C.11.2.1.2: the window's output spans it).
    """
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        try:
            return 0.0, float(2 ** int(seq[0].LUTDescriptor[2]) - 1)
        except (TypeError, ValueError, IndexError):
            return None
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        if str(ds.get("PhotometricInterpretation", "")).strip().upper() not in ("MONOCHROME1", "MONOCHROME2"):
            return None
        return modality_range(ds)
    return None
