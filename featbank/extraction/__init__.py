"""Image folder + backbone -> feature cache, incremental, resumable, with a report of skipped files."""

from __future__ import annotations

from .._device import DEVICES, resolve_device
from ._cachefile import default_cache_path
from ._doctor import Diagnosis, diagnose
from ._engines import build_engine, build_tap_engine, ensure_embedder_onnx, export_embedder_onnx, onnx_cache_path
from ._pipeline import extract
from ._report import ExtractReport
from .config import DTYPES, ENGINES, ExtractConfig, read_extract_config

# The rooms of a run, by role: config (ExtractConfig), job (resolve_job -> ExtractJob, one run), units (plan and
# run work units, merge them into parts), launchers (who runs the units: a Launcher registry).
__all__ = ["ExtractConfig", "read_extract_config", "ExtractReport", "extract", "default_cache_path", "resolve_device",
           "DEVICES", "ENGINES", "DTYPES", "Diagnosis", "diagnose",
           # extract's engines and ONNX graph, reused by predict, featbank.export and scripts/bench_extract.py
           "build_engine", "build_tap_engine", "ensure_embedder_onnx", "export_embedder_onnx", "onnx_cache_path"]
