"""Throughput of an extraction: the steady rate timed through ``on_progress``, and its record beside the cache."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .._files import atomic_write_text, timestamp

if TYPE_CHECKING:
    from ..extraction import ExtractReport

__all__ = ["THROUGHPUT_SOURCES", "METHODS", "Throughput", "Clock", "choose_throughput", "read_record"]

#: ``img_per_s_source`` values: this run's extraction, a previous compare's record, or nothing known.
THROUGHPUT_SOURCES = ("measured", "recorded", "unknown")
#: ``img_per_s_method`` values: the rate after the first batch, or the whole extraction's.
METHODS = ("steady", "whole run")
_RECORD_SUFFIX = ".throughput.json"


@dataclass(frozen=True)
class Throughput:
    """One throughput measurement: img/s, over how many images, and how (``steady`` or ``whole run``)."""

    images_per_second: float
    n_images: int
    method: str

    @property
    def rank(self) -> tuple[bool, int]:
        # A steady rate beats a whole-run one, then more images beat fewer.
        return self.method == "steady", self.n_images


class Clock:
    """``on_progress`` for extract: when each batch finished, for a rate without the fixed costs."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.marks.append((time.perf_counter(), int(done)))

    def measure(self, report: ExtractReport, min_images: int) -> Throughput | None:
        """The rate after the first batch (model load, ONNX export, warm-up and pipeline fill left
        out) when at least ``min_images`` came after it; else the whole run's; None if none embedded."""
        if len(self.marks) >= 2:
            (t0, d0), (t1, d1) = self.marks[0], self.marks[-1]
            if d1 - d0 >= min_images and t1 > t0:
                return Throughput((d1 - d0) / (t1 - t0), d1 - d0, "steady")
        if report.n_embedded and report.seconds > 0:
            return Throughput(report.n_embedded / report.seconds, int(report.n_embedded), "whole run")
        return None


def choose_throughput(report: ExtractReport, now: Throughput | None) -> tuple[Throughput | None, str]:
    """(throughput, source): this run's measurement or the record of an earlier run of this cache,
    whichever ranks higher (a rerun that embeds 3 new files measures little but the model load)."""
    record_path = Path(str(report.path) + _RECORD_SUFFIX)
    recorded = read_record(record_path, report.cache_key)
    if now is not None and (recorded is None or now.rank >= recorded.rank):
        record = {"cache_key": report.cache_key, "images_per_second": now.images_per_second,
                  "n_images": now.n_images, "method": now.method, "extract_seconds": report.seconds,
                  "engine": report.engine, "device": report.device, "recorded": timestamp()}
        try:
            atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
        except OSError:
            pass  # the number is still reported; only the next run will not find it
        return now, "measured"
    if recorded is not None:
        return recorded, "recorded"
    return None, "unknown"


def read_record(path: Path, cache_key: str) -> Throughput | None:
    """The throughput recorded for this very cache key; anything else (damaged, foreign) is no record."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("cache_key") != cache_key or not cache_key:
        return None
    ips, n, method = record.get("images_per_second"), record.get("n_images"), record.get("method")
    if not isinstance(ips, (int, float)) or isinstance(ips, bool) or not math.isfinite(ips) or ips <= 0:
        return None
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0 or method not in METHODS:
        return None
    return Throughput(float(ips), n, method)
