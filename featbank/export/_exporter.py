"""The entry point: bundle -> checked ONNX file with metadata, and its report; the torch reference classifier."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from .._files import (
    check_output_dir,
    describe_os_error,
    remove_orphans,
    temporary_path,
    timestamp,
)
from ..errors import BundleError, ConfigError, ExportError
from ..runtime import FORMAT_KEY, FORMAT_VERSION, IMAGE_METADATA, INPUT_NAME, OUTPUT_NAMES
from ._graph import compose_graphs, embedder_onnx, export_torch, opset_of, torch_modules
from ._head_only import export_head_only
from ._heads import head_proba_module, sklearn_head_onnx
from ._parity import (
    check_parity,
    collect_images,
    load_batch,
    parity_json_path,
    torch_batches,
)
from ._publish import ExportReport, file_error, publish, stamp
from ._quantize import CalibrationPlan, calibration_plan, quantize_model
from ._raw import RAW_MIN_AGREEMENT, RAW_PIXEL_TOLERANCE, check_no_window, check_raw_interpolation, compose_raw, raw_parity
from ._triton import check_triton_repo, model_name, write_triton_repo
from .config import MIN_OPSET, ExportConfig, build_export_config

if TYPE_CHECKING:
    from ..bundles import Bundle
    from ..heads import Estimator

__all__ = ["export_model", "build_torch_classifier", "MIN_OPSET"]



# --------------------------------------------------------------------------------------------
# Bundle -> torch classifier (the reference) and graph
# --------------------------------------------------------------------------------------------


def build_torch_classifier(
    model: str | os.PathLike, *, weights_file: str | os.PathLike | None = None
) -> tuple[Any, Any]:
    """The PyTorch module equal to the exported graph: uint8 NHWC -> (probabilities, label).

    Only for bundles whose head is linear in the embeddings (or fine-tuned bundles); used by
    ``scripts/bench_onnx.py`` to time the same model in torch eager.

    Returns:
        ``(module, preprocess_config)``.

    Raises:
        ExportError: the head is not a torch-expressible (linear/MLP) head.
    """
    from ..bundles import load_bundle

    bundle = load_bundle(model)
    _, Classifier = torch_modules()
    if bundle.kind == "finetuned":
        bb, head = bundle.finetuned_network()
        ProbaHead, _ = torch_modules()
        return Classifier(bb.embedder(), ProbaHead(head, "logits")).eval(), bb.preprocess
    bb = bundle.load_backbone(weights_file)
    head = head_proba_module(bundle.load_head(), bundle.n_classes)
    if head is None:
        raise ExportError(f"The head of {str(bundle.path)!r} is not a torch-expressible head.")
    return Classifier(bb.embedder(), head).eval(), bb.preprocess


def _metadata(bundle: Bundle, bb: Any, route: str, input_kind: str = "preprocessed", model_version: int = 1) -> dict[str, str]:
    import onnxruntime
    import torch

    head = bundle.head_info
    pre = bb.preprocess.to_dict()
    pre["crop_pct"] = round(bb.preprocess.crop_pct, 6)
    pre["resize"] = "shorter side to resize_size, then centre crop to input_size (torchvision PIL)"
    meta = {
        FORMAT_KEY: FORMAT_VERSION,
        "classes": json.dumps(list(bundle.classes)),
        "preprocessing": json.dumps(pre, sort_keys=True),
        "backbone": str(bb.name if bundle.kind == "finetuned" else bundle.backbone.get("backbone")),
        "backbone_weights": str(bundle.backbone.get("weights", bb.weights)),
        "weights_sha256": str(bundle.backbone.get("weights_sha256") or bb.weights_sha256),
        "embed_dim": str(bb.embed_dim),
        "features": json.dumps({"layers": list(bundle.features.layers)}
                               | {k: getattr(bundle.features, k) for k in ("pooling", "tta", "augment", "n_views", "view_pool")})
        if bundle.kind == "head" else "{}",
        "cache_key": str(bundle.cache_key or ""),
        "bundle_id": bundle.bundle_id,
        "bundle_kind": bundle.kind,
        "head": str(head.get("estimator") or head.get("type") or ("finetuned" if bundle.kind == "finetuned" else "")),
        "head_type": str(head.get("type", "")),
        "featbank_version": __version__,
        "export_route": route,
        "input": input_kind,
        "inputs": json.dumps({INPUT_NAME: "uint8 [N, H, W, 3] RGB, H, W = preprocessing.input_size"
                              if input_kind == "preprocessed" else
                              "uint8 [N, H, W, 3] RGB of any H, W (one size per batch; aspect ratio at most 100:1); "
                              "resize, centre crop and normalisation are in the graph"}),
        **IMAGE_METADATA,
        "model_version": str(model_version),
        "outputs": json.dumps({OUTPUT_NAMES[0]: "float32 [N, C], columns = classes",
                               OUTPUT_NAMES[1]: "int64 [N], index into classes"}),
        "exported_with": json.dumps({"torch": torch.__version__.split("+")[0], "onnxruntime": onnxruntime.__version__}),
        "created": timestamp(),
    }
    return meta


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def export_model(
    model: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    config: ExportConfig | None = None,
    **options: Any,
) -> ExportReport:
    """Export a model bundle to one ONNX file: uint8 images -> probabilities, label.

    Every option is a field of :class:`~featbank.export.ExportConfig`: pass them as keywords, or a
    ``config`` (keywords then change it); it is checked before the bundle is read.

    Args:
        model: a bundle folder written by ``featbank fit`` or ``featbank finetune``.
        out: the ONNX file. Default: ``<bundle folder>.onnx`` beside the bundle. A folder means
            ``<folder>/<bundle name>.onnx``. An existing file is replaced only after the new one
            passed its check.
        check_images: image files or folders for the parity check. Default: the bundle's
            validation images that still exist.
        check: run the parity check (strongly recommended); ``False`` writes the model unchecked.
        opset: ai.onnx opset of the graph. Default: the exporter's (the embedder cache's) opset.
        weights_file: the backbone weights file, for bundles fitted with ``--weights-file``.
        atol: the largest allowed |Δprobability| between ONNX and PyTorch.
        max_check_images: use at most this many images for the check.
        input_kind: ``"preprocessed"`` (the graph takes pixels resized and centre-cropped as its metadata
            says) or ``"raw"`` (any decoded RGB uint8 image; resize and crop are inside the graph).
        quantize: ``"int8"``: static QDQ per-channel quantization (see :mod:`featbank.export._quantize`),
            refused when the cache's test top-1 drops by more than ``max_drop`` points.
        calibration: a folder of images to calibrate on, instead of the training images of the cache
            the bundle was fitted on.
        max_drop: the largest allowed drop of test top-1 accuracy, in points (``quantize`` only).
        model_version: the ``model_version`` of the file (and the Triton version folder).
        triton: also write a Triton model repository here (``<triton>/<name>/config.pbtxt``,
            ``<triton>/<name>/<model_version>/model.onnx``, ``labels.txt``).
        head_only: export the head alone: embeddings (N, D) float32 -> probabilities, label.
        config: an :class:`~featbank.export.ExportConfig` (default: built from the keywords).

    Returns:
        An :class:`ExportReport`; ``<out stem>.parity.json`` beside the model holds the figures.

    Raises:
        BundleError: the bundle is missing, corrupt or incomplete, or its backbone weights differ.
        ExportError: the head cannot be exported (the message says which and why), the graph
            does not match PyTorch (probabilities differ by more than ``atol`` or a top-1 label
            differs), or a read or write failed during the export (disk full: the message names
            the file and the reason). Nothing is left at ``out`` then; a file already there is
            unchanged.
        ConfigError: bad options (``model`` is an .onnx file, no images for the check or the
            calibration, bad opset or input, a raw export of a bundle with an intensity window, an
            int8 model that loses more than ``max_drop``), or ``out`` cannot be written (checked
            before the export: a file in the path, a read-only or virtual folder, a non-regular file
            under the name, inside the bundle).

    Example:
        >>> report = export_model("models/elpv-linear", "elpv.onnx")
        >>> report.parity["max_abs_diff"] < 1e-4
        True
    """
    from ..bundles import load_bundle

    t0 = time.perf_counter()
    cfg = build_export_config(config, options)
    _refuse_onnx_file(model)
    bundle = load_bundle(model)
    if cfg.input_kind == "raw":
        check_no_window(bundle)
    out_path = _output_path(bundle, out)
    triton_dir = check_triton_repo(cfg.triton, model_name(out_path)) if cfg.triton is not None else None
    # Find the check (and calibration) images first: a missing folder should fail before minutes of export.
    images, source = _check_images(bundle, cfg.check, cfg.check_images, cfg.max_check_images)
    plan = calibration_plan(bundle, cfg.calibration) if cfg.quantize else None
    if cfg.head_only:
        report = export_head_only(bundle, out_path, (images, source), cfg)
    else:
        report = _export_graph(bundle, out_path, (images, source), plan, cfg)
    if triton_dir is not None:
        report.triton = write_triton_repo(report.path, triton_dir, model_name(out_path), cfg.model_version)
    report.seconds = time.perf_counter() - t0
    return report


def _export_graph(bundle: Bundle, out_path: Path, checked: tuple[list[Path], str], plan: CalibrationPlan | None,
                  cfg: ExportConfig) -> ExportReport:
    """Build the graph, check it, then quantize it and put the preprocessing in front, as asked; publish."""
    import onnx

    images, source = checked
    parity_path = parity_json_path(out_path)
    # Temporaries of killed exports into the same file (named by temporary_path) go first.
    remove_orphans(out_path)
    remove_orphans(parity_path)
    tmp, tmp2 = temporary_path(out_path), temporary_path(out_path)
    try:
        if bundle.kind == "finetuned":
            graph, route, bb, ref_fn = _finetuned_graph(bundle, tmp, cfg.opset)
        else:
            graph, route, bb, ref_fn = _head_graph(bundle, tmp, out_path, cfg.opset, cfg.weights_file)
        if cfg.input_kind == "raw":
            check_raw_interpolation(bb.preprocess)
        meta = _metadata(bundle, bb, route, cfg.input_kind, cfg.model_version)
        stamp(graph, meta)
        onnx.save(graph, str(tmp))
        parity = _check(bundle, tmp, out_path, ref_fn, images, source, bb.preprocess, cfg.atol) if cfg.check else None
        quant = _quantize(tmp, tmp2, plan, bb.preprocess, meta, out_path, bundle, cfg.max_drop) if plan is not None else None
        final = None
        if cfg.input_kind == "raw":
            final = _put_raw_preprocessing_in_front(tmp, tmp2, bb.preprocess, meta, parity, images, out_path)
        elif quant is not None:
            final = _restamp(tmp, meta)
        if parity is not None and quant is not None:
            parity["quantization"] = quant
        publish(tmp, out_path, parity_path, parity)
    except OSError as e:
        raise file_error(e, out_path) from None
    finally:
        tmp.unlink(missing_ok=True)
        tmp2.unlink(missing_ok=True)
    return ExportReport(out_path, parity_path, parity, route, opset_of(final or graph), meta, 0.0, cfg.input_kind, quant)


def _quantize(tmp: Path, tmp2: Path, plan: CalibrationPlan, prep: Any, meta: dict[str, str], out_path: Path,
              bundle: Bundle, max_drop: float) -> dict[str, Any]:
    """Quantize the checked graph at ``tmp`` in place (``tmp2`` is scratch); its report goes into ``meta``."""
    quant = quantize_model(tmp, tmp2, plan, prep, max_drop, out_path, list(bundle.classes))
    meta["quantization"] = json.dumps(quant, sort_keys=True)
    os.replace(tmp2, tmp)
    return quant


def _put_raw_preprocessing_in_front(tmp: Path, tmp2: Path, prep: Any, meta: dict[str, str], parity: dict | None,
                                    images: list[Path], out_path: Path) -> Any:
    """The graph at ``tmp``, in place, with the resize and crop of raw images in front (``--input raw``);
    ``parity`` (when checked) gets the raw graph's check on ``images``. Returns the new graph."""
    import onnx

    final = compose_raw(onnx.load(str(tmp)), prep, INPUT_NAME)
    stamp(final, meta)
    onnx.save(final, str(tmp2))
    if parity is not None:
        parity["raw"] = _check_raw(tmp2, tmp, prep, images, out_path)
    os.replace(tmp2, tmp)
    return final


def _restamp(tmp: Path, meta: dict[str, str]) -> Any:
    """The graph at ``tmp`` with ``meta`` stamped again (after quantization rewrote it), in place."""
    import onnx

    final = onnx.load(str(tmp))
    stamp(final, meta)
    onnx.save(final, str(tmp))
    return final


def _check_raw(raw_path: Path, inner_path: Path, cfg: Any, images: list[Path], out_path: Path) -> dict[str, Any]:
    res = raw_parity(raw_path, inner_path, cfg, images, INPUT_NAME, OUTPUT_NAMES)
    if not res["passed"]:
        raise ExportError(
            f"The raw-input graph does not match featbank's Pillow preprocessing on {res['n_cases']} image(s): "
            f"top-1 agreement {100 * res['top1_agreement']:.1f}% (need {100 * RAW_MIN_AGREEMENT:.0f}%), pixels "
            f"differ by up to {res['pixel_max_diff']} levels (limit {RAW_PIXEL_TOLERANCE}). Nothing was written to "
            f"{str(out_path)!r}. Export with --input preprocessed, or report the model."
        )
    return res


# --------------------------------------------------------------------------------------------
# The two graphs: a fine-tuned network exported whole, a backbone and a head composed
# --------------------------------------------------------------------------------------------

_Graph = tuple[Any, str, Any, Callable[[np.ndarray], np.ndarray]]  # (graph, route, backbone, torch reference)


def _finetuned_graph(bundle: Bundle, tmp: Path, opset: int | None) -> _Graph:
    """The fine-tuned network (uint8 images -> probabilities, label) exported by torch in one piece."""
    import onnx
    import torch

    ProbaHead, Classifier = torch_modules()
    bb, head = bundle.finetuned_network()
    module = Classifier(bb.embedder(), ProbaHead(head, "logits")).eval()
    h, w = bb.preprocess.input_size
    export_torch(module, torch.zeros((2, h, w, 3), dtype=torch.uint8), tmp, INPUT_NAME, OUTPUT_NAMES, opset)

    def ref_fn(x: np.ndarray) -> np.ndarray:
        return torch_batches(lambda t: module(t)[0], x)

    return onnx.load(str(tmp)), "torch", bb, ref_fn


def _head_graph(bundle: Bundle, tmp: Path, out_path: Path, opset: int | None, weights_file: Any) -> _Graph:
    """The backbone's embedder graph composed with the head's (torch when linear, else skl2onnx)."""
    import onnx
    import torch

    bb = bundle.load_backbone(weights_file)
    if bundle.embed_dim is not None and bb.embed_dim != bundle.embed_dim:
        raise BundleError(
            f"Backbone {bb.name!r} gives {bb.embed_dim}-d embeddings but the bundle's head expects "
            f"{bundle.embed_dim}; the bundle is inconsistent. Re-fit it."
        )
    est = bundle.load_head()
    feats = bundle.info.features
    if feats is not None and (feats.layers != ("final",) or feats.tta or feats.view_pool):
        return _layered_graph(bundle, bb, est, tmp, opset)
    embedder_graph = embedder_onnx(bb, opset, out_path)
    graph_opset = opset_of(embedder_graph)
    head_module = head_proba_module(est, bundle.n_classes)
    if head_module is not None:
        export_torch(head_module, torch.zeros((2, bb.embed_dim), dtype=torch.float32), tmp, "embeddings",
                     OUTPUT_NAMES, graph_opset, small=True)
        head_graph = onnx.load(str(tmp))
        route = "torch+compose"
    else:
        head_graph = sklearn_head_onnx(est, bb.embed_dim, bundle.n_classes, graph_opset)
        route = "skl2onnx+compose"
    embedder = bb.embedder().eval()

    def ref_fn(x: np.ndarray) -> np.ndarray:
        return bundle.predict_proba(torch_batches(embedder, x))

    return compose_graphs(embedder_graph, head_graph), route, bb, ref_fn


def _layered_graph(bundle: Bundle, bb: Any, est: Estimator, tmp: Path, opset: int | None) -> _Graph:
    """A head on several layers (and/or with TTA): the taps, the column concatenation and the head in one graph.

    Torch-expressible heads are exported with the taps in one piece (route ``torch``, TTA views
    inside); scikit-learn heads are joined by ``onnx.compose`` to the taps' graph (no TTA: refused).
    """
    import onnx
    import torch

    from ..bundles.network import feature_module, tta_classifier, tta_views

    feat = feature_module(bundle, bb)
    views = tta_views(bundle, bb)
    h, w = bb.preprocess.input_size
    example = torch.zeros((2, h, w, 3), dtype=torch.uint8)

    def ref_fn(x: np.ndarray) -> np.ndarray:
        probs = [bundle.predict_proba(torch_batches(feat, x))]
        for view in views:
            probs.append(bundle.predict_proba(torch_batches(lambda t, v=view: feat(v(t).contiguous()), x)))
        return np.mean(probs, axis=0)

    head_module = head_proba_module(est, bundle.n_classes)
    if head_module is not None:
        export_torch(tta_classifier(feat, head_module, views), example, tmp, INPUT_NAME, OUTPUT_NAMES, opset)
        return onnx.load(str(tmp)), "torch", bb, ref_fn
    if views:
        raise ExportError(
            f"Bundle {str(bundle.path)!r} averages a {bundle.head_info.get('estimator')} head over augmented views "
            "(TTA); only torch-expressible heads (linear, mlp, LogisticRegression, ...) export with TTA inside the "
            "graph. Re-fit with --tta off, or with --head linear."
        )
    export_torch(feat, example, tmp, INPUT_NAME, ["embeddings"], opset)
    feat_graph = onnx.load(str(tmp))
    head_graph = sklearn_head_onnx(est, bundle.feature_dim, bundle.n_classes, opset_of(feat_graph))
    return compose_graphs(feat_graph, head_graph), "skl2onnx+compose", bb, ref_fn


# --------------------------------------------------------------------------------------------
# Checks made before the export, and the parity check after it
# --------------------------------------------------------------------------------------------


def _refuse_onnx_file(model: str | os.PathLike) -> None:
    path = Path(model)
    if path.is_file() and path.suffix.lower() == ".onnx":
        raise ConfigError(
            f"{str(path)!r} is a file, not a model bundle folder: export takes the folder that 'featbank fit' or "
            "'featbank finetune' wrote (models/<name>). This .onnx file is already an exported model; run it "
            f"with 'featbank predict {path} IMAGES' (or featbank.runtime.OnnxClassifier)."
        )


def _output_path(bundle: Bundle, out: str | os.PathLike | None) -> Path:
    """Where the ONNX file goes, checked writable before any slow work (exit 2 with the reason).

    A symlink is written through (its target is replaced, the link stays), as ``atomic_write`` does.
    """
    out_path = Path(out).expanduser() if out is not None else bundle.path.parent / f"{bundle.path.name}.onnx"
    if out_path.is_dir():
        out_path = out_path / f"{bundle.path.name}.onnx"
    if out_path.is_symlink():
        out_path = Path(os.path.realpath(out_path))
    bundle_dir = bundle.path.resolve()
    if out_path.resolve() == bundle_dir or bundle_dir in out_path.resolve().parents:
        raise ConfigError(
            f"--out {str(out_path)!r} is inside the bundle folder {str(bundle.path)!r} (it would replace the "
            "bundle's own files); pass a file name ending in .onnx outside it."
        )
    check_output_dir(out_path.parent, "ONNX model")
    if out_path.exists() and not out_path.is_file():
        # A device, FIFO or dangling link under the name would be replaced by (or write into) a file.
        raise ConfigError(
            f"--out {str(out_path)!r} exists and is not a regular file; export replaces only .onnx files. "
            "Choose another --out."
        )
    probe = temporary_path(out_path)
    try:  # the very temporary name must be creatable (e.g. not too long for the file system)
        probe.open("wb").close()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"Cannot write {str(out_path)!r}: {describe_os_error(e)}. Choose another --out.") from None
    return out_path


def _check_images(bundle: Bundle, check: bool, check_images: Any, limit: int) -> tuple[list[Path], str]:
    if not check:
        return [], "none"
    images, source = collect_images(bundle, check_images, limit)
    if not images:
        n_val = len(bundle.validation_paths())
        where = (f"the bundle's {n_val} validation image(s) are not on this machine (moved or deleted)" if n_val else
                 "the bundle records no validation images (fit --auto / --cv scored every training image in a fold) "
                 f"and the images of its cache {(bundle.manifest.get('training') or {}).get('cache')!r} are not here")
        raise ConfigError(
            f"No images to check the export on: {where}, and --check-images was not given. Pass --check-images "
            "DIR (a few real images of the task), or --no-check to skip the check (not recommended)."
        )
    return images, source


def _check(bundle: Bundle, tmp: Path, out_path: Path, ref_fn: Callable[[np.ndarray], np.ndarray],
           images: list[Path], source: str, preprocess: Any, atol: float) -> dict[str, Any]:
    """Run the parity check on the written graph; raise when it fails (nothing is published then)."""
    import onnxruntime
    import torch

    batch, skipped = load_batch(images, preprocess)
    parity = check_parity(tmp, ref_fn, batch, atol=atol)
    parity.update({
        "checked": True,
        "image_source": source,
        "skipped_images": skipped,
        "reference": ("torch eager: featbank.finetuning.load_finetuned_model -> softmax"
                      if bundle.kind == "finetuned"
                      else "torch eager: load_backbone -> embedder -> Bundle.predict_proba"),
        "bundle_id": bundle.bundle_id,
        "onnx_file": out_path.name,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    })
    if not parity["passed"]:
        raise ExportError(
            f"The exported graph does not match PyTorch on {parity['n_images']} image(s): max |dprob| = "
            f"{parity['max_abs_diff']:.2e} (limit {atol:.0e}), top-1 agreement "
            f"{100 * parity['top1_agreement']:.1f}% (need 100%), per batch size {parity['per_batch_size']}. "
            f"Nothing was written to {str(out_path)!r}. Try another --opset, or report the model "
            "(--no-check writes it anyway; not recommended)."
        )
    return parity


