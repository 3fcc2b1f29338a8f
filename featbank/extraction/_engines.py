"""Inference engines: torch (CPU or CUDA, autocast) and onnxruntime (CPU) over a cached ONNX export."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..cache import default_cache_dir
from ..errors import ConfigError
from ._cachefile import _slug
from ._options import ENGINES

__all__ = ["_TorchEngine", "_onnx_cache_path", "export_embedder_onnx", "_OrtEngine", "_make_engine"]


class _TorchEngine:
    name = "torch"

    def __init__(self, backbone: Any, device: str, precision: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        model = backbone.embedder().eval().to(self.device)
        if self.device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)

    def __call__(self, batch: Any) -> np.ndarray:
        torch = self.torch
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True)
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    y = self.model(x)
            else:
                y = self.model(x)
            return y.float().cpu().numpy()


def _onnx_cache_path(identity: dict[str, Any]) -> Path:
    import torch

    blob = json.dumps({"identity": identity, "torch": torch.__version__, "featbank": __version__}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return default_cache_dir() / "onnx" / f"{_slug(identity['backbone'])}-{digest}.onnx"


def export_embedder_onnx(backbone: Any, path: Path) -> Path:
    """Export uint8 NHWC -> embeddings to ONNX with a dynamic batch axis (atomic write)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = backbone.preprocess.input_size
    model = backbone.embedder().eval()
    x = torch.zeros((2, h, w, 3), dtype=torch.uint8)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                input_names=["images"],
                output_names=["embeddings"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},),
                dynamo=True,
                external_data=False,
            )
    os.replace(tmp, path)
    return path


class _OrtEngine:
    name = "onnxruntime"

    def __init__(self, backbone: Any = None, path: Path | None = None):
        import onnxruntime as ort

        if path is None:
            path = _onnx_cache_path(backbone.identity())
            if not path.exists():
                export_embedder_onnx(backbone, path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads would otherwise spin and take CPU from the image-decoding workers.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: Any) -> np.ndarray:
        arr = batch.numpy() if hasattr(batch, "numpy") else batch
        return self.session.run(None, {self.input_name: np.ascontiguousarray(arr)})[0]


def _make_engine(engine: str, backbone: Any, device: str, precision: str) -> Any:
    if engine not in ENGINES:
        raise ConfigError(f"The 'engine' parameter must be one of {ENGINES}. Got {engine!r} instead.")
    if engine == "onnxruntime" and device != "cpu":
        raise ConfigError("--engine onnxruntime runs on the CPU here; use --device cpu or --engine torch.")
    if engine == "torch" or (engine == "auto" and device != "cpu"):
        return _TorchEngine(backbone, device, precision)
    try:
        return _OrtEngine(backbone)
    except Exception as e:  # noqa: BLE001 - auto falls back, explicit choice reports
        if engine == "onnxruntime":
            raise ConfigError(f"The onnxruntime engine could not be built for {backbone.name!r}: {e}") from None
        warnings.warn(f"onnxruntime engine unavailable ({e}); using torch.", RuntimeWarning, stacklevel=3)
        return _TorchEngine(backbone, device, precision)
