"""The torch side of the export: wrapper modules, ``torch.onnx.export``, the embedder graph, and composition."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import temporary_path
from ..errors import ExportError
from ..runtime import INPUT_NAME

if TYPE_CHECKING:
    from onnx import ModelProto

    from ..backbones import Backbone

__all__ = ["torch_modules", "export_torch", "opset_of", "embedder_onnx", "compose_graphs", "dedupe_opsets"]


# --------------------------------------------------------------------------------------------
# torch side: modules and export
# --------------------------------------------------------------------------------------------


def torch_modules() -> Any:
    import torch
    from torch import nn

    class ProbaHead(nn.Module):
        """embeddings -> (probabilities, label)."""

        def __init__(self, head: nn.Module, outputs: str):
            super().__init__()
            self.head = head
            self.outputs = outputs  # "logits" or "probabilities"

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.head(x.float())
            p = torch.softmax(y, dim=1) if self.outputs == "logits" else y
            p = p.float()
            return p, torch.argmax(p, dim=1)

    class Classifier(nn.Module):
        """uint8 NHWC images -> (probabilities, label)."""

        def __init__(self, embedder: nn.Module, head: nn.Module):
            super().__init__()
            self.embedder = embedder
            self.head = head

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.head(self.embedder(x))

    return ProbaHead, Classifier


def export_torch(module: Any, example: Any, path: Path, input_name: str, output_names: Sequence[str],
                  opset: int | None, *, small: bool = False) -> None:
    import torch

    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if small:
            # A head on embeddings is a few Gemm/Relu/Softmax nodes: the TorchScript exporter writes
            # the same graph as dynamo in 50 ms instead of 2-3 s (dynamo's win is on conv backbones).
            try:
                torch.onnx.export(
                    module.eval(), (example,), str(path), input_names=[input_name],
                    output_names=list(output_names), dynamic_axes={input_name: {0: "batch"}}, dynamo=False,
                    opset_version=opset or 20,
                )
                return
            except OSError:
                raise  # a full disk or a read-only folder is not the exporter's fault: say so (the caller does)
            except Exception:  # noqa: BLE001 - fall back to the dynamo exporter below
                pass
        try:
            torch.onnx.export(
                module.eval(), (example,), str(path), input_names=[input_name], output_names=list(output_names),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},), dynamo=True,
                external_data=False, **kwargs,
            )
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; say what failed
            os_error = _os_error_in(e)
            if os_error is not None:
                raise os_error from None  # the caller reports the path and the reason, not the opset
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(
                f"torch.onnx.export failed for {type(module).__name__}: {type(e).__name__}: {msg}. "
                "Try another --opset, or report the model."
            ) from None


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind an exporter's exception (torch wraps the one that failed its write), if any."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def opset_of(model: ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def embedder_onnx(backbone: Backbone, opset: int | None, out_path: Path) -> Any:
    """The embedder graph, reused from extract's ONNX cache when it has the wanted opset.

    Otherwise it is exported to a temporary sibling of ``out_path`` (named so that the next
    export's ``remove_orphans(out_path)`` removes it if this run is killed).
    """
    import onnx

    from ..extraction import ensure_embedder_onnx

    if opset is None:
        try:
            # Verified against the sha256 recorded when it was written; rebuilt (with a warning) if broken.
            return onnx.load(str(ensure_embedder_onnx(backbone)))
        except OSError:
            pass  # read-only cache dir: export beside the output instead
    h, w = backbone.preprocess.input_size
    import torch

    tmp = temporary_path(out_path)
    try:
        export_torch(backbone.embedder(), torch.zeros((2, h, w, 3), dtype=torch.uint8), tmp, INPUT_NAME,
                      ["embeddings"], opset)
        return onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)


def compose_graphs(embedder: ModelProto, head: ModelProto) -> ModelProto:
    """Join embedder (images -> embeddings) and head (embeddings -> probabilities, label)."""
    import onnx
    from onnx import compose, version_converter

    opset = opset_of(embedder)
    if opset_of(head) != opset:
        head = version_converter.convert_version(head, opset)
    ir = max(embedder.ir_version, head.ir_version)
    embedder.ir_version = ir
    head.ir_version = ir
    embedder = compose.add_prefix(embedder, "backbone/", rename_inputs=False, rename_outputs=False)
    head = compose.add_prefix(head, "head/", rename_inputs=False, rename_outputs=False)
    # Domains only the head uses (ai.onnx.ml) must be declared on the merged model.
    merged = compose.merge_models(embedder, head, io_map=[("embeddings", "embeddings")])
    dedupe_opsets(merged)
    onnx.checker.check_model(merged)
    return merged


def dedupe_opsets(model: ModelProto) -> None:
    """One opset_import entry per domain (``merge_models`` repeats them; onnxruntime's quantizer refuses that)."""
    seen: dict[str, Any] = {}
    for imp in model.opset_import:
        key = "" if imp.domain == "ai.onnx" else imp.domain
        if key not in seen or imp.version > seen[key].version:
            seen[key] = type(imp)(domain=key, version=imp.version)
    del model.opset_import[:]
    model.opset_import.extend(seen.values())
