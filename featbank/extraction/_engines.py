"""Inference engines: torch (CPU or CUDA, autocast) and onnxruntime (CPU) over a cached ONNX export."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .. import __version__
from .._files import atomic_write_text, describe_os_error, remove_orphans, sha256_file, slugify, temporary_path, timestamp
from ..cache import default_cache_dir
from ..errors import CacheError, ConfigError, OnnxCacheRebuiltWarning
from .config import ENGINES

if TYPE_CHECKING:
    from ..backbones import Backbone

__all__ = [
    "Engine",
    "TorchEngine",
    "onnx_cache_path",
    "check_embedder_onnx",
    "export_embedder_onnx",
    "ensure_embedder_onnx",
    "OrtEngine",
    "build_engine",
    "TapEngine",
    "OrtTapEngine",
    "tap_identity",
]


class Engine(Protocol):
    """What embeds a batch: ``engine(batch)`` -> one array per image row (a list of arrays per layer for taps)."""

    name: str

    def __call__(self, batch: Any) -> np.ndarray | list[np.ndarray]: ...


class TorchEngine:
    name = "torch"

    def __init__(self, backbone: Backbone, device: str, precision: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        model = self._build(backbone).eval().to(self.device)
        if self.device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)

    def _build(self, backbone: Backbone) -> Any:
        return backbone.embedder()

    def _forward(self, batch: Any) -> Any:
        """The model's output on ``batch`` (uint8 NHWC), under inference mode and the run's autocast."""
        torch = self.torch
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True)
            if self.autocast_dtype is None:
                return self.model(x)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return self.model(x)

    def __call__(self, batch: Any) -> np.ndarray:
        return self._forward(batch).float().cpu().numpy()


class TapEngine(TorchEngine):
    """torch engine over a :class:`~featbank.backbones.TapModel`: a batch -> one array per tap."""

    def __init__(self, backbone: Backbone, device: str, precision: str, layers: Sequence[str], pooling: str):
        self._taps = (layers, pooling)
        super().__init__(backbone, device, precision)
        self.layers = self.model.layers

    def _build(self, backbone: Backbone) -> Any:
        from ..backbones import TapModel

        return TapModel(backbone, *self._taps)

    def __call__(self, batch: Any) -> list[np.ndarray]:  # type: ignore[override]
        return [y.float().cpu().numpy() for y in self._forward(batch)]


def onnx_cache_path(identity: dict[str, Any]) -> Path:
    import torch

    blob = json.dumps({"identity": identity, "torch": torch.__version__, "featbank": __version__}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return default_cache_dir() / "onnx" / f"{slugify(identity['backbone'])}-{digest}.onnx"


def _record_path(path: Path) -> Path:
    """The JSON beside a cached graph that records its size and sha256 when it was written."""
    return path.with_name(path.name + ".json")


def check_embedder_onnx(path: Path) -> str | None:
    """Why the cached embedder graph at ``path`` cannot be trusted, or ``None`` when it can.

    A graph is trusted when its size and sha256 are those recorded beside it (``<name>.json``)
    when featbank wrote it: a truncated, corrupt or unrecorded file is not used.
    """
    record = _record_path(path)
    try:
        rec = json.loads(record.read_text())
        want_size, want_sha = int(rec["size"]), str(rec["sha256"])
    except FileNotFoundError:
        return f"it has no record of its sha256 ({record.name} is missing: an older featbank or a killed run)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its record {record.name} is unreadable ({type(e).__name__})"
    try:
        size = path.stat().st_size
        if size != want_size:
            return f"it has {size} bytes where {want_size} were written (truncated or overwritten)"
        if sha256_file(path) != want_sha:
            return "its sha256 differs from the one recorded when it was written (corrupt)"
    except OSError as e:
        return f"it cannot be read ({describe_os_error(e)})"
    return None


def tap_identity(backbone: Backbone, layers: Sequence[str] | None = None, pooling: str = "gap+2x2") -> dict[str, Any]:
    """The identity of an embedder graph: the backbone's, plus its taps and pooling when it has taps."""
    ident = backbone.identity()
    return ident if layers is None else {**ident, "taps": list(layers), "pooling": pooling}


def export_embedder_onnx(backbone: Backbone, path: Path, layers: Sequence[str] | None = None, pooling: str = "gap+2x2") -> Path:
    """Export uint8 NHWC -> embeddings to ONNX with a dynamic batch axis, and record its sha256.

    The graph is written under a temporary name, then renamed into place; the record beside it
    (``<name>.json``: size, sha256, backbone identity) is written after. Temporaries of killed
    runs are removed first. With ``layers`` the graph is the :class:`~featbank.backbones.TapModel`
    of those taps: one output per tap, named after it, in network order.
    """
    import torch

    from ..backbones import TapModel

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    remove_orphans(_record_path(path))
    h, w = backbone.preprocess.input_size
    model = backbone.embedder().eval() if layers is None else TapModel(backbone, layers, pooling).eval()
    output_names = ["embeddings"] if layers is None else list(model.layers)
    x = torch.zeros((2, h, w, 3), dtype=torch.uint8)
    tmp = temporary_path(path)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                input_names=["images"],
                output_names=output_names,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},),
                dynamo=True,
                external_data=False,
            )
        record = {"size": tmp.stat().st_size, "sha256": sha256_file(tmp), "identity": tap_identity(backbone, layers, pooling),
                  "written": timestamp(), "featbank": __version__}
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if layers is not None:
            model.remove_hooks()
    atomic_write_text(_record_path(path), json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return path


def ensure_embedder_onnx(backbone: Backbone, path: Path | None = None, layers: Sequence[str] | None = None,
                         pooling: str = "gap+2x2") -> Path:
    """The cached embedder graph of ``backbone``, verified; built when missing, rebuilt when broken.

    With ``layers``, the graph of those taps (see :func:`export_embedder_onnx`), cached apart.

    Raises:
        OSError: the cache folder cannot be written (callers fall back or report).

    Warns:
        OnnxCacheRebuiltWarning: the cached graph was broken (the warning says why) and was rebuilt.
    """
    path = path or onnx_cache_path(tap_identity(backbone, layers, pooling))
    if path.exists():
        why = check_embedder_onnx(path)
        if why is None:
            return path
        warnings.warn(
            f"The cached ONNX graph of backbone {backbone.name!r} at {str(path)!r} is broken: {why}. "
            "Rebuilding it.", OnnxCacheRebuiltWarning, stacklevel=2,
        )
    return export_embedder_onnx(backbone, path, layers, pooling)


class OrtEngine:
    name = "onnxruntime"

    def __init__(self, backbone: Backbone | None = None, path: Path | None = None, layers: Sequence[str] | None = None,
                 pooling: str = "gap+2x2"):
        import onnxruntime as ort

        if path is None:
            path = ensure_embedder_onnx(backbone, layers=layers, pooling=pooling)
        else:
            why = check_embedder_onnx(path)
            if why is not None:
                # extract then builds the backbone and takes the route above, which rebuilds it.
                raise CacheError(f"The cached ONNX graph {str(path)!r} cannot be used: {why}.")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads would otherwise spin and take CPU from the image-decoding workers.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: Any) -> np.ndarray:
        arr = batch.numpy() if hasattr(batch, "numpy") else batch
        return self.session.run(None, {self.input_name: np.ascontiguousarray(arr)})[0]


class OrtTapEngine(OrtEngine):
    """onnxruntime over the exported :class:`~featbank.backbones.TapModel`: a batch -> one array per tap."""

    def __init__(self, backbone: Backbone, layers: str | Sequence[str], pooling: str):
        from ..backbones import parse_layers

        self.layers = parse_layers(layers, backbone)
        # Views without layers: the plain embedder's graph (its one output is 'final'), not a second export.
        plain = self.layers == ("final",)
        super().__init__(backbone, layers=None if plain else self.layers, pooling=pooling)

    def __call__(self, batch: Any) -> list[np.ndarray]:  # type: ignore[override]
        arr = batch.numpy() if hasattr(batch, "numpy") else batch
        return list(self.session.run(None, {self.input_name: np.ascontiguousarray(arr)}))


def _chosen(engine: str, backbone: Backbone, device: str) -> str:
    """``torch`` or ``onnxruntime``: what ``engine`` (``auto``: onnxruntime on CPU, torch on CUDA) means for
    ``backbone`` on ``device``; a backbone whose forward is not an ONNX graph (``torch_only``) runs on torch.

    Raises:
        ConfigError: an unknown engine, onnxruntime asked for off the CPU or for a torch-only backbone.
    """
    if engine not in ENGINES:
        raise ConfigError(f"The 'engine' parameter must be one of {ENGINES}. Got {engine!r} instead.")
    if engine == "onnxruntime" and device != "cpu":
        raise ConfigError("--engine onnxruntime runs on the CPU here; use --device cpu or --engine torch.")
    torch_only = bool(getattr(backbone, "extra", {}).get("torch_only"))
    if engine == "onnxruntime" and torch_only:
        raise ConfigError(f"{backbone.name!r} runs only with --engine torch (its forward is not an ONNX graph).")
    return "torch" if engine == "torch" or (engine == "auto" and device != "cpu") or torch_only else "onnxruntime"


def _with_fallback(engine: str, backbone: Backbone, make_ort: Any, make_torch: Any) -> Engine:
    """``make_ort()``; when that fails, an explicit ``--engine onnxruntime`` reports, ``auto`` warns and uses torch."""
    try:
        return make_ort()
    except Exception as e:  # noqa: BLE001 - auto falls back, explicit choice reports
        if engine == "onnxruntime":
            raise ConfigError(f"The onnxruntime engine could not be built for {backbone.name!r}: {e}") from None
        warnings.warn(f"onnxruntime engine unavailable ({e}); using torch.", RuntimeWarning, stacklevel=4)
        return make_torch()


def build_tap_engine(engine: str, backbone: Backbone, device: str, precision: str, layers: Sequence[str],
                     pooling: str) -> Engine:
    """The engine of a run with layers or views: what :func:`build_engine` picks, over the taps."""
    def make_torch() -> Engine:
        return TapEngine(backbone, device, precision, layers, pooling)

    if _chosen(engine, backbone, device) == "torch":
        return make_torch()
    return _with_fallback(engine, backbone, lambda: OrtTapEngine(backbone, layers, pooling), make_torch)


def build_engine(engine: str, backbone: Backbone, device: str, precision: str) -> Engine:
    """The engine that embeds a batch with ``backbone`` (its final embedding): see :func:`_chosen`."""
    def make_torch() -> Engine:
        return TorchEngine(backbone, device, precision)

    if _chosen(engine, backbone, device) == "torch":
        return make_torch()
    return _with_fallback(engine, backbone, lambda: OrtEngine(backbone), make_torch)
