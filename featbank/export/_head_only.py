"""``export --head-only``: the head alone, for services that already compute embeddings.

The graph takes ``embeddings`` (N, D) float32 (D = the head's input width: the backbone's embedding, or
the bundle's layers concatenated) and gives ``probabilities`` (N, C) float32 and ``label`` (N,) int64.
The head's own standardisation / L2 normalisation (``fit --standardize``, ``--l2-normalize``) is inside;
how the features were computed (backbone, weights, layers, pooling, views, the image preprocessing) is in
the metadata (``features``), so the embedding service can be checked against it. Parity: the graph
against ``Bundle.predict_proba`` on the embeddings featbank's PyTorch pipeline computes for the check
images (batch sizes 1 and 7).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._files import remove_orphans, temporary_path
from ..errors import ConfigError, ExportError
from ..runtime import FORMAT_KEY, FORMAT_VERSION, OUTPUT_NAMES
from ._parity import check_parity, load_batch, parity_json_path, torch_batches
from ._publish import ExportReport, file_error, publish, stamp

if TYPE_CHECKING:
    from ..bundles import Bundle
    from .config import ExportConfig

__all__ = ["export_head_only", "EMBEDDINGS_NAME", "feature_spec"]

EMBEDDINGS_NAME = "embeddings"


def feature_spec(bundle: Bundle) -> dict[str, Any]:
    """How the head's input is computed from an image: backbone, layers, pooling, views, standardisation."""
    feats = bundle.features
    pre = bundle.head_info.get("preprocessing") or {}
    return {
        "backbone": bundle.backbone.get("backbone"), "weights": bundle.backbone.get("weights"),
        "weights_sha256": bundle.backbone.get("weights_sha256"), "transform": bundle.backbone.get("transform"),
        "layers": list(feats.layers), "layer_dims": dict(feats.layer_dims), "dim": bundle.feature_dim,
        "pooling": getattr(feats, "pooling", None), "augment": getattr(feats, "augment", ""),
        "n_views": getattr(feats, "n_views", 0), "tta": bool(getattr(feats, "tta", False)),
        "view_pool": getattr(feats, "view_pool", None),
        "standardisation": {"standardize": bool(pre.get("standardize", False)),
                            "l2_normalize": bool(pre.get("l2_normalize", False)),
                            # fit --auto / --cv: standardize, l2 or sqrt (the signed square root first)
                            **({"preprocess": bundle.head_info["preprocess"]} if "preprocess" in bundle.head_info else {}),
                            "where": "inside the graph (the head's own, fitted on the training embeddings)"},
    }


def _head_graph(bundle: Bundle, tmp: Path, dim: int, opset: int | None) -> tuple[Any, str]:
    import onnx
    import torch

    from ._graph import export_torch
    from ._heads import head_proba_module, sklearn_head_onnx

    est = bundle.load_head()
    module = head_proba_module(est, bundle.n_classes)
    if module is not None:
        export_torch(module, torch.zeros((2, dim), dtype=torch.float32), tmp, EMBEDDINGS_NAME, OUTPUT_NAMES,
                     opset or 20, small=True)
        return onnx.load(str(tmp)), "torch"
    return sklearn_head_onnx(est, dim, bundle.n_classes, opset or 20), "skl2onnx"


def _metadata(bundle: Bundle, route: str, dim: int, model_version: int) -> dict[str, str]:
    from .. import __version__
    from .._files import timestamp

    return {
        FORMAT_KEY: FORMAT_VERSION, "classes": json.dumps(list(bundle.classes)),
        "preprocessing": json.dumps(bundle.backbone.get("transform") or {}, sort_keys=True),
        "input": "embeddings", "features": json.dumps(feature_spec(bundle), sort_keys=True),
        "backbone": str(bundle.backbone.get("backbone")), "embed_dim": str(dim), "bundle_id": bundle.bundle_id,
        "bundle_kind": bundle.kind, "head": str(bundle.head_info.get("estimator") or bundle.head_info.get("type")),
        "export_route": route, "model_version": str(model_version), "featbank_version": __version__,
        "inputs": json.dumps({EMBEDDINGS_NAME: f"float32 [N, {dim}], computed as metadata.features says"}),
        "outputs": json.dumps({OUTPUT_NAMES[0]: "float32 [N, C], columns = classes",
                               OUTPUT_NAMES[1]: "int64 [N], index into classes"}),
        "created": timestamp(),
    }


def _parity(bundle: Bundle, tmp: Path, checked: tuple[list[Path], str], weights_file: Any,
            atol: float) -> dict[str, Any]:
    from ..bundles.network import feature_module

    images, source = checked
    bb = bundle.load_backbone(weights_file)
    batch, skipped = load_batch(images, bb.preprocess)
    emb = torch_batches(feature_module(bundle, bb).eval(), batch).astype(np.float32)
    parity = check_parity(tmp, bundle.predict_proba, emb, atol=atol, input_name=EMBEDDINGS_NAME)
    parity.update({"checked": True, "image_source": source, "skipped_images": skipped,
                   "reference": "Bundle.predict_proba on embeddings of the check images (torch eager)"})
    if not parity["passed"]:
        raise ExportError(
            f"The exported head does not match the bundle's head on {parity['n_images']} embedding(s): max |dprob| = "
            f"{parity['max_abs_diff']:.2e} (limit {atol:.0e}), top-1 agreement {100 * parity['top1_agreement']:.1f}%. "
            "Nothing was written. Report the model."
        )
    return parity


def export_head_only(bundle: Bundle, out_path: Path, checked: tuple[list[Path], str], cfg: ExportConfig) -> ExportReport:
    """Write the head's graph (embeddings -> probabilities, label) to ``out_path``, checked on the images of
    ``checked`` (paths, where they come from); its report."""
    opset, atol, check, model_version, weights_file = cfg.opset, cfg.atol, cfg.check, cfg.model_version, cfg.weights_file
    from ._graph import opset_of

    if bundle.kind != "head":
        raise ConfigError(
            f"--head-only exports a head fitted on cached embeddings; {str(bundle.path)!r} is a fine-tuned network "
            "(its head reads the fine-tuned backbone's features). Export it whole."
        )
    dim = int(bundle.feature_dim or bundle.embed_dim)
    parity_path = parity_json_path(out_path)
    remove_orphans(out_path)
    remove_orphans(parity_path)
    tmp = temporary_path(out_path)
    try:
        graph, route = _head_graph(bundle, tmp, dim, opset)
        meta = _metadata(bundle, route, dim, model_version)
        stamp(graph, meta)
        import onnx

        onnx.save(graph, str(tmp))
        parity = _parity(bundle, tmp, checked, weights_file, atol) if check else None
        publish(tmp, out_path, parity_path, parity)
    except OSError as e:
        raise file_error(e, out_path) from None
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(out_path, parity_path, parity, route, opset_of(graph), meta, 0.0, "embeddings")
