"""Image folder + backbone -> feature cache, incremental, resumable, with a report of skipped files."""

from __future__ import annotations

from .._device import DEVICES, resolve_device

# Outside __all__ but imported from here, the path they had when this package was one module:
# export_embedder_onnx and onnx_cache_path by featbank.export (to reuse extract's ONNX graph),
# build_engine by scripts/bench_extract.py.
from ._cachefile import default_cache_path
from ._doctor import Diagnosis, diagnose
from ._engines import build_engine, export_embedder_onnx, onnx_cache_path  # noqa: F401
from ._pipeline import extract
from ._report import ExtractReport
from ._views import FIXED_VIEWS
from .config import DTYPES, ENGINES

__all__ = ["ExtractReport", "extract", "default_cache_path", "resolve_device", "DEVICES", "ENGINES", "DTYPES", "Diagnosis",
           "diagnose", "FIXED_VIEWS"]
