"""Intensity windows: how high-bit-depth pixels (DICOM, 16-bit PNG/TIFF, float TIFF) become 8 bits.

A window is part of the eval transform (``PreprocessConfig.window``), so it is keyed in the cache,
recorded in the bundle (``manifest.json`` -> ``backbone.transform.window``) and in an exported
model's ``preprocessing`` metadata, and applied the same way by extract, fit's bundle, predict,
evaluate and export's parity check. The rule, one string:

- ``none`` (the default): no window. A 16-bit PNG/TIFF is scaled by 1/257 (65535 -> 255) as
  before; a DICOM file's modality values are mapped linearly from the whole range its header
  allows (``BitsStored`` through the rescale slope/intercept) to 0..255.
- ``auto``: a DICOM file's own VOI (its VOI LUT, else its first window centre/width, applied by
  pydicom's ``apply_voi_lut``); without one (or for PNG/TIFF) the robust range between the 0.5th
  and 99.5th percentiles of the image's values.
- a preset in Hounsfield units, centre C and width W from Radiopaedia's "Windowing (CT)" article
  (https://radiopaedia.org/articles/windowing-ct): ``lung`` (C -600, W 1500), ``soft-tissue``
  (C 50, W 400, the abdominal soft-tissue window), ``bone`` (C 400, W 1800), ``brain`` (C 40, W 80).
- ``C,W``: any centre and width (W >= 1) in the image's values (Hounsfield units for CT).

A fixed window (preset or ``C,W``) is the DICOM linear VOI function (PS3.3 C.11.2.1.2.1) with an
output range of 0..255. Windows apply to single-channel images only: colour images and 8-bit
images pass unchanged. MONOCHROME1 DICOM images are inverted after windowing.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

__all__ = ["WINDOW_PRESETS", "PERCENTILES", "Window", "parse_window", "window_to_uint8", "range_to_uint8",
           "percentile_range", "WINDOW_HELP"]

#: Named windows, (centre, width) in Hounsfield units (Radiopaedia, "Windowing (CT)").
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "soft-tissue": (50.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
#: The robust range of ``auto`` when the file gives no window: these percentiles of the values.
PERCENTILES = (0.5, 99.5)
#: Percentiles are computed on at most this many values (an even stride through the image).
_PERCENTILE_SAMPLE = 1 << 22

WINDOW_HELP = ("none, auto, a preset (" + ", ".join(f"{k} = {c:g},{w:g}" for k, (c, w) in WINDOW_PRESETS.items())
               + ") or C,W: a centre and a width >= 1, e.g. 40,400")

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


@dataclass(frozen=True)
class Window:
    """A parsed window rule. ``spec`` is its canonical string (what is stored and keyed).

    Attributes:
        spec: ``none``, ``auto``, a preset name, or ``C,W`` with shortest-form numbers.
        center, width: the fixed window of a preset or ``C,W``; None for ``none`` and ``auto``.
    """

    spec: str
    center: float | None = None
    width: float | None = None

    @property
    def is_fixed(self) -> bool:
        return self.center is not None


@functools.lru_cache(maxsize=64)
def parse_window(text: str | Window | None) -> Window:
    """Parse a window rule (``none``, ``auto``, ``lung``, ``soft-tissue``, ``bone``, ``brain``, ``C,W``).

    Raises:
        ConfigError: the text is none of these (the message lists what to type); a width below 1.
    """
    if isinstance(text, Window):
        return text
    raw = "none" if text is None else str(text)
    s = raw.strip().lower().replace(" ", "")
    if s in ("none", "auto"):
        return Window(s)
    if s in WINDOW_PRESETS:
        c, w = WINDOW_PRESETS[s]
        return Window(s, c, w)
    m = re.fullmatch(f"({_NUMBER}),({_NUMBER})", s)
    if m:
        c, w = float(m.group(1)), float(m.group(2))
        if math.isfinite(c) and math.isfinite(w) and w >= 1:
            return Window(f"{_short(c)},{_short(w)}", c, w)
        raise ConfigError(f"The window {raw!r} has width {m.group(2)}; the width must be a finite number >= 1 "
                         f"(DICOM's linear window). Use {WINDOW_HELP}.")
    raise ConfigError(f"Unknown window {raw!r}. Use {WINDOW_HELP}.")


def _short(v: float) -> str:
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def window_to_uint8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear VOI function (PS3.3 C.11.2.1.2.1) onto 0..255, rounded to ``uint8``.

    ``x <= c - 0.5 - (w-1)/2`` -> 0; ``x > c - 0.5 + (w-1)/2`` -> 255; else
    ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255``.
    """
    x = np.asarray(values, dtype=np.float64)
    c, w = center - 0.5, width - 1.0
    out = np.where(x > c + w / 2, 255.0, 0.0)
    between = (x > c - w / 2) & (x <= c + w / 2)
    if w > 0 and between.any():
        out[between] = ((x[between] - c) / w + 0.5) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def range_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo..hi`` linearly onto 0..255 (``lo`` -> 0, ``hi`` -> 255; clipped, rounded; ``hi < lo`` inverts);
    a flat range gives 0 at or below ``lo`` and 255 above."""
    x = np.asarray(values)
    if hi == lo or not (math.isfinite(lo) and math.isfinite(hi)):
        return np.where(x > lo, 255, 0).astype(np.uint8)
    if x.dtype.kind == "f":
        x = np.nan_to_num(x, nan=lo, posinf=max(lo, hi), neginf=min(lo, hi))
    y = np.subtract(x, lo, dtype=np.float64)
    y *= 255.0 / (hi - lo)
    np.clip(y, 0, 255, out=y)
    return np.rint(y, out=y).astype(np.uint8)


def percentile_range(values: np.ndarray) -> tuple[float, float]:
    """The 0.5th and 99.5th percentiles of the finite values (an even sample of at most 4M of them)."""
    flat = np.asarray(values).reshape(-1)
    if flat.size > _PERCENTILE_SAMPLE:
        flat = flat[:: -(-flat.size // _PERCENTILE_SAMPLE)]
    flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    if flat.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(flat, PERCENTILES)
    return float(lo), float(hi)
