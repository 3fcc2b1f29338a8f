"""featbank: embed an image folder once, then fit heads in seconds, fine-tune, export to ONNX.

The public API is re-exported here; submodules import torch lazily where they can so the
command line starts fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "extract",
    "ExtractConfig",
    "ExtractReport",
    "open_cache",
    "FeatureCache",
    "load_backbone",
    "list_backbones",
    "backbone_groups",
    "finetune",
    "scan_folder",
    "create_source",
    "FeatureSpec",
    "PreprocessConfig",
    "export_model",
    "OnnxClassifier",
    "errors",
    "fit",
    "compare",
    "evaluate",
    "predict",
    "predict_proba",
    "load_bundle",
    "LinearHead",
    "MLPHead",
    "diagnose",
]

_LAZY = {
    "extract": ("featbank.extraction", "extract"),
    "ExtractConfig": ("featbank.extraction", "ExtractConfig"),
    "ExtractReport": ("featbank.extraction", "ExtractReport"),
    "open_cache": ("featbank.cache", "open_cache"),
    "FeatureCache": ("featbank.cache", "FeatureCache"),
    "load_backbone": ("featbank.backbones", "load_backbone"),
    "list_backbones": ("featbank.backbones", "list_backbones"),
    "backbone_groups": ("featbank.backbones", "backbone_groups"),
    "finetune": ("featbank.finetuning", "finetune"),
    "scan_folder": ("featbank.sources", "scan_folder"),
    "create_source": ("featbank.sources", "create_source"),
    "FeatureSpec": ("featbank.features", "FeatureSpec"),
    "PreprocessConfig": ("featbank.images", "PreprocessConfig"),
    "export_model": ("featbank.export", "export_model"),
    "OnnxClassifier": ("featbank.runtime", "OnnxClassifier"),
    "fit": ("featbank.fitting", "fit"),
    "compare": ("featbank.comparison", "compare"),
    "evaluate": ("featbank.inference", "evaluate"),
    "predict": ("featbank.inference", "predict"),
    "predict_proba": ("featbank.inference", "predict_proba"),
    "load_bundle": ("featbank.bundles", "load_bundle"),
    "LinearHead": ("featbank.heads", "LinearHead"),
    "MLPHead": ("featbank.heads", "MLPHead"),
    "diagnose": ("featbank.extraction", "diagnose"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name == "errors":
        import importlib

        return importlib.import_module("featbank.errors")
    raise AttributeError(f"module 'featbank' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
