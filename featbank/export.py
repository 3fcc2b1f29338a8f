"""Model bundle -> one self-describing ONNX graph (uint8 images -> probabilities, label), proven equal to PyTorch.

The graph has one input, ``images`` (N, H, W, 3) uint8 RGB at the backbone's crop size (resizing
and cropping are done by the caller as the metadata says, e.g. by :mod:`featbank.runtime`), and
two plain tensor outputs: ``probabilities`` (N, C) float32 and ``label`` (N,) int64. Normalisation,
backbone and head are inside. Class names, preprocessing and provenance are in ``metadata_props``.

How each bundle becomes a graph:

- head bundles: the embedder graph (uint8 NHWC -> embeddings, the same dynamo export that
  ``extract --engine onnxruntime`` computed the cached embeddings with, reused from its cache)
  joined with ``onnx.compose`` to a head graph. Heads that are linear in the embeddings
  (featbank LinearHead/MLPHead, scikit-learn LogisticRegression and other linear classifiers,
  with StandardScaler/Normalizer in front) are torch modules exported with the same exporter;
  other scikit-learn heads go through skl2onnx (ZipMap off), and ``label`` is an ArgMax.
- fine-tuned bundles: the whole network (normalisation, features, head, softmax) in one export.

Every export is checked on real images against featbank's PyTorch pipeline at batch sizes 1
and 7 before the file appears under its name (``<out>`` with suffix ``.parity.json`` holds the
figures).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from .errors import BundleError, ConfigError, ExportError
from .images import IMAGE_EXTENSIONS, ImageReadError, load_and_preprocess
from .runtime import FORMAT_KEY, FORMAT_VERSION, INPUT_NAME, OUTPUT_NAMES

__all__ = [
    "ExportReport",
    "export_model",
    "build_torch_classifier",
    "check_parity",
    "DEFAULT_ATOL",
    "PARITY_BATCH_SIZES",
]

#: Export fails when any probability differs from PyTorch's by more than this.
DEFAULT_ATOL = 1e-4
PARITY_BATCH_SIZES = (1, 7)
#: At most this many images are used by the parity check (the first ones, in a fixed order).
MAX_CHECK_IMAGES = 64
MIN_OPSET = 18


@dataclass
class ExportReport:
    """What :func:`export_model` wrote.

    Attributes:
        path: the ONNX file.
        parity_path: the JSON with the parity figures (also written with ``check=False``, saying so).
        parity: the parity figures (``None`` with ``check=False``).
        route: how the head entered the graph: ``torch`` (one export), ``torch+compose``
            (embedder and torch head joined) or ``skl2onnx+compose``.
        opset: the ai.onnx opset of the graph.
        metadata: the ``metadata_props`` written.
        seconds: wall time of the export and check.
    """

    path: Path
    parity_path: Path
    parity: dict[str, Any] | None
    route: str
    opset: int
    metadata: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"Exported {self.metadata.get('backbone')} + {self.metadata.get('head')} "
                 f"({self.route}, opset {self.opset}) in {self.seconds:.1f}s"]
        if self.parity is None:
            lines.append("Parity check: skipped (--no-check)")
        else:
            p = self.parity
            lines.append(
                f"Parity check on {p['n_images']} image(s) ({p['image_source']}), batch sizes "
                f"{', '.join(map(str, p['batch_sizes']))}: max |dprob| = {p['max_abs_diff']:.2e} "
                f"(limit {p['atol']:.0e}), top-1 agreement {100 * p['top1_agreement']:.1f}%"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# torch side: modules and export
# --------------------------------------------------------------------------------------------


def _torch_modules() -> Any:
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


def _export_torch(module: Any, example: Any, path: Path, input_name: str, output_names: Sequence[str],
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
            except Exception:  # noqa: BLE001 - fall back to the dynamo exporter below
                pass
        try:
            torch.onnx.export(
                module.eval(), (example,), str(path), input_names=[input_name], output_names=list(output_names),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},), dynamo=True,
                external_data=False, **kwargs,
            )
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; say what failed
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(
                f"torch.onnx.export failed for {type(module).__name__}: {type(e).__name__}: {msg}. "
                "Try another --opset, or report the model."
            ) from None


def _opset_of(model: Any) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _embedder_onnx(backbone: Any, opset: int | None, workdir: Path) -> Any:
    """The embedder graph, reused from extract's ONNX cache when it has the wanted opset."""
    import onnx

    from .extraction import _onnx_cache_path, export_embedder_onnx

    cached = _onnx_cache_path(backbone.identity())
    if opset is None:
        try:
            if not cached.is_file():
                export_embedder_onnx(backbone, cached)
            return onnx.load(str(cached))
        except OSError:
            pass  # read-only cache dir: export beside the output instead
    h, w = backbone.preprocess.input_size
    import torch

    tmp = workdir / f".embedder-{uuid.uuid4().hex[:8]}.onnx"
    try:
        _export_torch(backbone.embedder(), torch.zeros((2, h, w, 3), dtype=torch.uint8), tmp, INPUT_NAME,
                      ["embeddings"], opset)
        return onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Heads -> torch modules (embeddings -> probabilities)
# --------------------------------------------------------------------------------------------


def _affine_prefix(steps: Sequence[Any]) -> list[tuple[str, np.ndarray | None, np.ndarray | None]] | None:
    """Pipeline preprocessing steps as ("scale", mean, scale) / ("l2", None, None); None if unknown."""
    from sklearn.preprocessing import Normalizer, StandardScaler

    out: list[tuple[str, np.ndarray | None, np.ndarray | None]] = []
    for step in steps:
        if step is None or step == "passthrough":
            continue
        if isinstance(step, StandardScaler):
            mean = np.asarray(step.mean_, np.float64) if step.with_mean and step.mean_ is not None else None
            scale = np.asarray(step.scale_, np.float64) if step.with_std and step.scale_ is not None else None
            out.append(("scale", mean, scale))
        elif isinstance(step, Normalizer) and step.norm == "l2":
            out.append(("l2", None, None))
        elif hasattr(step, "to_affine_steps"):
            # featbank's own preprocessing transformer describes itself in these terms.
            out.extend(step.to_affine_steps())
        else:
            return None
    return out


def _split_pipeline(est: Any) -> tuple[list[Any], Any]:
    from sklearn.pipeline import Pipeline

    if isinstance(est, Pipeline):
        steps = [s for _, s in est.steps]
        return steps[:-1], steps[-1]
    return [], est


def _has_proba(est: Any) -> bool:
    try:
        est.predict_proba  # noqa: B018 - available_if raises AttributeError when there is none
    except AttributeError:
        return False
    return True


def _class_columns(est: Any, n_classes: int) -> np.ndarray | None:
    """Indices into the bundle's classes of the estimator's columns; None when they are 0..C-1."""
    cols = np.asarray(getattr(est, "classes_", np.arange(n_classes)))
    try:
        cols = cols.astype(np.int64)
    except (TypeError, ValueError):
        raise ExportError(
            f"The head's classes_ are {cols.tolist()[:5]}..., not class indices; featbank heads are fitted "
            "on integer labels. Re-fit the bundle with 'featbank fit'."
        ) from None
    if len(cols) == n_classes and np.array_equal(cols, np.arange(n_classes)):
        return None
    return cols


def _head_to_torch(est: Any, n_classes: int) -> Any | None:
    """Module embeddings -> probabilities (bundle column order), or None when the head is not linear."""
    import torch
    from torch import nn

    from .heads import head_to_torch

    ProbaHead, _ = _torch_modules()
    m = head_to_torch(est)
    if m is None:
        return None
    module = ProbaHead(m, "probabilities")
    cols = _class_columns(est, n_classes)
    if cols is None:
        return module

    class Scatter(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner
            m = torch.zeros((len(cols), n_classes), dtype=torch.float32)
            m[torch.arange(len(cols)), torch.from_numpy(cols)] = 1.0
            self.register_buffer("map", m)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            p, _ = self.inner(x)
            p = p @ self.map
            return p, torch.argmax(p, dim=1)

    return Scatter(module)


# --------------------------------------------------------------------------------------------
# skl2onnx side
# --------------------------------------------------------------------------------------------


def _unsupported(est: Any, why: str) -> ExportError:
    return ExportError(
        f"The head {type(est).__name__} of this bundle cannot be exported to ONNX: {why}. Fit an exportable "
        "head instead (featbank fit --head linear|mlp|logistic, or a scikit-learn classifier that skl2onnx "
        "converts, such as RandomForestClassifier, KNeighborsClassifier or CalibratedClassifierCV(SVC()))."
    )


def _prefix_nodes(
    prefix: list[tuple[str, np.ndarray | None, np.ndarray | None]], x: str, opset: int
) -> tuple[list, list, str]:
    from onnx import helper, numpy_helper

    nodes, inits = [], []
    for i, (kind, mean, scale) in enumerate(prefix):
        if kind == "l2":
            if opset >= 18:
                nodes.append(helper.make_node("ReduceL2", [x, f"pre{i}/axes"], [f"pre{i}/norm"], keepdims=1))
                inits.append(numpy_helper.from_array(np.array([1], np.int64), f"pre{i}/axes"))
            else:
                nodes.append(helper.make_node("ReduceL2", [x], [f"pre{i}/norm"], keepdims=1, axes=[1]))
            nodes += [
                helper.make_node("Max", [f"pre{i}/norm", f"pre{i}/eps"], [f"pre{i}/safe"]),
                helper.make_node("Div", [x, f"pre{i}/safe"], [f"pre{i}/out"]),
            ]
            inits.append(numpy_helper.from_array(np.array(1e-30, np.float32), f"pre{i}/eps"))
        else:
            cur = x
            if mean is not None:
                nodes.append(helper.make_node("Sub", [cur, f"pre{i}/mean"], [f"pre{i}/centred"]))
                inits.append(numpy_helper.from_array(mean.astype(np.float32), f"pre{i}/mean"))
                cur = f"pre{i}/centred"
            inv = 1.0 / np.where(scale == 0, 1.0, scale) if scale is not None else np.ones(1)
            nodes.append(helper.make_node("Mul", [cur, f"pre{i}/inv_scale"], [f"pre{i}/out"]))
            inits.append(numpy_helper.from_array(inv.astype(np.float32), f"pre{i}/inv_scale"))
        x = f"pre{i}/out"
    return nodes, inits, x


def _prune(graph: Any) -> None:
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _sklearn_head_onnx(est: Any, embed_dim: int, n_classes: int, opset: int) -> Any:
    """A graph embeddings (N, D) float -> probabilities (N, C) float32, label (N,) int64, via skl2onnx."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    steps, clf = _split_pipeline(est)
    if not _has_proba(clf):
        raise _unsupported(
            clf, "it has no predict_proba, and its probabilities (softmax of a non-linear decision_function) "
            "have no skl2onnx equivalent; refit it with probabilities (e.g. wrapped in CalibratedClassifierCV)"
        )
    prefix = _affine_prefix(steps)
    if prefix is None:
        # Unknown preprocessing: let skl2onnx try the whole pipeline.
        prefix, model_est = [], est
    else:
        model_est = clf
    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError:
        raise ExportError("Exporting scikit-learn heads needs skl2onnx: run 'pip install skl2onnx'.") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onx = convert_sklearn(
                model_est,
                initial_types=[("skl_input", FloatTensorType([None, embed_dim]))],
                target_opset={"": opset, "ai.onnx.ml": 3},
                options={id(clf): {"zipmap": False}},
            )
    except Exception as e:  # noqa: BLE001 - skl2onnx raises RuntimeError/NotImplementedError/...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _unsupported(clf, f"skl2onnx has no converter for it or failed ({type(e).__name__}: {msg})") from None
    onx = onnx.compose.add_prefix(onx, "skl/", rename_inputs=False, rename_outputs=True)
    g = onx.graph
    proba_out = next((o.name for o in g.output if "prob" in o.name), None)
    if proba_out is None:
        raise _unsupported(clf, f"skl2onnx gave outputs {[o.name for o in g.output]} without probabilities")
    pre_nodes, inits, x = _prefix_nodes(prefix, "embeddings", opset)
    for node in g.node:
        node.input[:] = [x if i == "skl_input" else i for i in node.input]
    nodes = [helper.make_node("Cast", [proba_out], ["head/proba"], to=TensorProto.FLOAT)]
    cols = _class_columns(clf, n_classes)
    src = "head/proba"
    if cols is not None:
        m = np.zeros((len(cols), n_classes), np.float32)
        m[np.arange(len(cols)), cols] = 1.0
        inits.append(numpy_helper.from_array(m, "head/columns"))
        nodes.append(helper.make_node("MatMul", [src, "head/columns"], ["head/proba_all"]))
        src = "head/proba_all"
    nodes += [
        helper.make_node("Identity", [src], [OUTPUT_NAMES[0]]),
        helper.make_node("ArgMax", [OUTPUT_NAMES[0]], [OUTPUT_NAMES[1]], axis=1, keepdims=0),
    ]
    new_nodes = pre_nodes + list(g.node) + nodes
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(inits)
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", embed_dim]))
    del g.output[:]
    g.output.extend([
        helper.make_tensor_value_info(OUTPUT_NAMES[0], TensorProto.FLOAT, ["batch", n_classes]),
        helper.make_tensor_value_info(OUTPUT_NAMES[1], TensorProto.INT64, ["batch"]),
    ])
    _prune(g)
    if not any(o.domain == "ai.onnx.ml" for o in onx.opset_import) and any(
        n.domain == "ai.onnx.ml" for n in g.node
    ):
        onx.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    return onx


def _compose(embedder: Any, head: Any) -> Any:
    """Join embedder (images -> embeddings) and head (embeddings -> probabilities, label)."""
    import onnx
    from onnx import compose, version_converter

    opset = _opset_of(embedder)
    if _opset_of(head) != opset:
        head = version_converter.convert_version(head, opset)
    ir = max(embedder.ir_version, head.ir_version)
    embedder.ir_version = ir
    head.ir_version = ir
    embedder = compose.add_prefix(embedder, "backbone/", rename_inputs=False, rename_outputs=False)
    head = compose.add_prefix(head, "head/", rename_inputs=False, rename_outputs=False)
    # Domains only the head uses (ai.onnx.ml) must be declared on the merged model.
    merged = compose.merge_models(embedder, head, io_map=[("embeddings", "embeddings")])
    onnx.checker.check_model(merged)
    return merged


# --------------------------------------------------------------------------------------------
# Bundle -> torch classifier (the reference) and graph
# --------------------------------------------------------------------------------------------


def _bundle_backbone(bundle: Any, weights_file: str | os.PathLike | None) -> Any:
    from .backbones import load_backbone

    ident = bundle.backbone
    name, weights = ident.get("backbone"), ident.get("weights")
    if not name:
        raise BundleError(f"Bundle {str(bundle.path)!r} names no backbone in its manifest; re-create it.")
    if weights_file is None and str(weights or "").startswith("file:"):
        raise ExportError(
            f"Bundle {str(bundle.path)!r} was fitted on backbone {name!r} with weights from a file "
            f"({weights}); pass that file with --weights-file PATH."
        )
    bb = load_backbone(name, weights=None if weights_file else weights, weights_file=weights_file)
    want = ident.get("weights_sha256")
    if want and bb.weights_sha256 != want:
        raise BundleError(
            f"The weights of backbone {name!r} on this machine (sha256 {bb.weights_sha256[:12]}...) are not "
            f"the ones bundle {str(bundle.path)!r} was fitted with ({str(want)[:12]}...). Install the same "
            "weights (or pass them with --weights-file), or re-fit the bundle."
        )
    return bb


def _finetuned(bundle: Any) -> tuple[Any, Any]:
    try:
        from .finetuning import load_finetuned_model
    except ImportError as e:
        raise ExportError(
            f"Exporting fine-tuned bundles needs featbank.finetuning.load_finetuned_model, which this install "
            f"lacks ({e}). Update featbank."
        ) from None
    return load_finetuned_model(bundle.path)


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
    from .bundle import load_bundle

    bundle = load_bundle(model)
    _, Classifier = _torch_modules()
    if bundle.kind == "finetuned":
        bb, head = _finetuned(bundle)
        ProbaHead, _ = _torch_modules()
        return Classifier(bb.embedder(), ProbaHead(head, "logits")).eval(), bb.preprocess
    bb = _bundle_backbone(bundle, weights_file)
    head = _head_to_torch(bundle.load_head(), bundle.n_classes)
    if head is None:
        raise ExportError(f"The head of {str(bundle.path)!r} is not a torch-expressible head.")
    return Classifier(bb.embedder(), head).eval(), bb.preprocess


def _metadata(bundle: Any, bb: Any, route: str) -> dict[str, str]:
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
        "cache_key": str(bundle.cache_key or ""),
        "bundle_id": bundle.bundle_id,
        "bundle_kind": bundle.kind,
        "head": str(head.get("estimator") or head.get("type") or ("finetuned" if bundle.kind == "finetuned" else "")),
        "head_type": str(head.get("type", "")),
        "featbank_version": __version__,
        "export_route": route,
        "inputs": json.dumps({INPUT_NAME: "uint8 [N, H, W, 3] RGB, H, W = preprocessing.input_size"}),
        "outputs": json.dumps({OUTPUT_NAMES[0]: "float32 [N, C], columns = classes",
                               OUTPUT_NAMES[1]: "int64 [N], index into classes"}),
        "exported_with": json.dumps({"torch": torch.__version__.split("+")[0], "onnxruntime": onnxruntime.__version__}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return meta


def _stamp(model: Any, meta: dict[str, str]) -> None:
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.producer_name = "featbank"
    model.producer_version = __version__
    model.doc_string = (
        f"featbank classifier: images uint8 NHWC RGB -> probabilities, label. classes={meta['classes']}"
    )


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------


def _collect_images(bundle: Any, check_images: Sequence[str | os.PathLike] | str | os.PathLike | None,
                    limit: int) -> tuple[list[Path], str]:
    if check_images is not None:
        items = [check_images] if isinstance(check_images, (str, os.PathLike)) else list(check_images)
        paths: list[Path] = []
        for item in items:
            p = Path(item)
            if p.is_dir():
                paths += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            elif p.is_file():
                paths.append(p)
            else:
                raise ConfigError(f"--check-images {str(p)!r} does not exist. Pass image files or a folder of images.")
        if not paths:
            raise ConfigError(
                f"--check-images {', '.join(map(str, items))} holds no image files "
                f"({', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, ...)."
            )
        return paths[:limit], "check-images"
    val = [p for p in bundle.validation_paths() if p.is_file()]
    return val[:limit], "validation"


def check_parity(
    onnx_path: str | os.PathLike,
    reference: Callable[[np.ndarray], np.ndarray],
    batch: np.ndarray,
    *,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    atol: float = DEFAULT_ATOL,
) -> dict[str, Any]:
    """Compare an exported graph with a reference on the same preprocessed pixels.

    Args:
        onnx_path: the ONNX file.
        reference: uint8 NHWC batch -> (N, C) probabilities (featbank's PyTorch pipeline).
        batch: (N, H, W, 3) uint8 images.
        batch_sizes: the graph is run with exactly these batch sizes (the last chunk is padded
            with repeated images, whose outputs are dropped).
        atol: the largest allowed |Δprobability|.

    Returns:
        ``passed``, ``max_abs_diff``, ``top1_agreement``, per batch size figures, ``n_images``.
        A top-1 disagreement where the reference's two best classes are within ``atol`` of each
        other counts as a near tie (agreement), and is counted in ``n_near_ties``.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = np.asarray(reference(batch), dtype=np.float64)
    n = len(batch)
    ref_top = ref.argmax(axis=1)
    srt = np.sort(ref, axis=1)
    gap = srt[:, -1] - srt[:, -2] if ref.shape[1] > 1 else np.full(n, np.inf)
    per: dict[str, Any] = {}
    worst, agree_all, ties_all, labels_ok = 0.0, 1.0, 0, True
    for bs in batch_sizes:
        probs, labels = [], []
        for start in range(0, n, bs):
            idx = np.arange(start, start + bs) % n
            p, lab = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(batch[idx])})
            keep = min(bs, n - start)
            probs.append(p[:keep])
            labels.append(lab[:keep])
        p = np.concatenate(probs).astype(np.float64)
        lab = np.concatenate(labels)
        diff = float(np.abs(p - ref).max())
        same = lab == ref_top
        ties = int(np.sum(~same & (gap <= atol)))
        agree = float(np.mean(same | (gap <= atol)))
        label_is_argmax = bool(np.array_equal(lab, p.argmax(axis=1)))
        per[str(bs)] = {"max_abs_diff": diff, "top1_agreement": agree, "n_near_ties": ties,
                        "label_is_argmax": label_is_argmax, "label_dtype": str(lab.dtype)}
        worst, agree_all = max(worst, diff), min(agree_all, agree)
        ties_all = max(ties_all, ties)
        labels_ok = labels_ok and label_is_argmax and lab.dtype == np.int64
    return {
        "passed": bool(worst <= atol and agree_all == 1.0 and labels_ok),
        "n_images": n,
        "batch_sizes": list(batch_sizes),
        "atol": atol,
        "max_abs_diff": worst,
        "top1_agreement": agree_all,
        "n_near_ties": ties_all,
        "per_batch_size": per,
    }


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _parity_path(out: Path) -> Path:
    return out.with_name((out.stem if out.suffix == ".onnx" else out.name) + ".parity.json")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def export_model(
    model: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    check_images: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    check: bool = True,
    opset: int | None = None,
    weights_file: str | os.PathLike | None = None,
    atol: float = DEFAULT_ATOL,
    max_check_images: int = MAX_CHECK_IMAGES,
) -> ExportReport:
    """Export a model bundle to one ONNX file: uint8 images -> probabilities, label.

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

    Returns:
        An :class:`ExportReport`; ``<out stem>.parity.json`` beside the model holds the figures.

    Raises:
        BundleError: the bundle is missing, corrupt or incomplete, or its backbone weights differ.
        ExportError: the head cannot be exported (the message says which and why), or the graph
            does not match PyTorch (probabilities differ by more than ``atol`` or a top-1 label
            differs). Nothing is left at ``out`` then.
        ConfigError: bad options (no images for the check, bad opset).

    Example:
        >>> report = export_model("models/elpv-linear", "elpv.onnx")
        >>> report.parity["max_abs_diff"] < 1e-4
        True
    """
    import onnx

    from .bundle import load_bundle

    t0 = time.perf_counter()
    if opset is not None and not (MIN_OPSET <= int(opset) <= onnx.defs.onnx_opset_version()):
        raise ConfigError(
            f"The 'opset' parameter must be between {MIN_OPSET} (the oldest the torch dynamo exporter writes) and "
            f"{onnx.defs.onnx_opset_version()}. Got {opset} instead."
        )
    bundle = load_bundle(model)
    out_path = Path(out) if out is not None else bundle.path.parent / f"{bundle.path.name}.onnx"
    if out_path.is_dir():
        out_path = out_path / f"{bundle.path.name}.onnx"
    if out_path.resolve() == bundle.path.resolve():
        raise ConfigError(f"--out {str(out_path)!r} is the bundle folder itself; pass a file name ending in .onnx.")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    # Find the check images first: a missing --check-images should fail before minutes of export.
    images: list[Path] = []
    source = "none"
    if check:
        images, source = _collect_images(bundle, check_images, max_check_images)
        if not images:
            n_val = len(bundle.validation_paths())
            raise ConfigError(
                f"No images to check the export on: the bundle's {n_val} validation image(s) are not on this "
                "machine (moved or deleted) and --check-images was not given. Pass --check-images DIR (a few "
                "real images of the task), or --no-check to skip the check (not recommended)."
            )

    import torch

    ProbaHead, Classifier = _torch_modules()
    ref_fn: Callable[[np.ndarray], np.ndarray]
    tmp = out_path.with_name(f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if bundle.kind == "finetuned":
            bb, head = _finetuned(bundle)
            module = Classifier(bb.embedder(), ProbaHead(head, "logits")).eval()
            h, w = bb.preprocess.input_size
            _export_torch(module, torch.zeros((2, h, w, 3), dtype=torch.uint8), tmp, INPUT_NAME, OUTPUT_NAMES, opset)
            graph = onnx.load(str(tmp))
            route = "torch"

            def ref_fn(x: np.ndarray) -> np.ndarray:
                return _torch_batches(lambda t: module(t)[0], x)
        else:
            bb = _bundle_backbone(bundle, weights_file)
            if bundle.embed_dim is not None and bb.embed_dim != bundle.embed_dim:
                raise BundleError(
                    f"Backbone {bb.name!r} gives {bb.embed_dim}-d embeddings but the bundle's head expects "
                    f"{bundle.embed_dim}; the bundle is inconsistent. Re-fit it."
                )
            est = bundle.load_head()
            embedder_graph = _embedder_onnx(bb, opset, out_path.parent)
            graph_opset = _opset_of(embedder_graph)
            head_module = _head_to_torch(est, bundle.n_classes)
            if head_module is not None:
                _export_torch(head_module, torch.zeros((2, bb.embed_dim), dtype=torch.float32), tmp, "embeddings",
                              OUTPUT_NAMES, graph_opset, small=True)
                head_graph = onnx.load(str(tmp))
                route = "torch+compose"
            else:
                head_graph = _sklearn_head_onnx(est, bb.embed_dim, bundle.n_classes, graph_opset)
                route = "skl2onnx+compose"
            graph = _compose(embedder_graph, head_graph)
            embedder = bb.embedder().eval()

            def ref_fn(x: np.ndarray) -> np.ndarray:
                return bundle.predict_proba(_torch_batches(embedder, x))

        meta = _metadata(bundle, bb, route)
        _stamp(graph, meta)
        onnx.save(graph, str(tmp))
        parity: dict[str, Any] | None = None
        parity_path = _parity_path(out_path)
        if check:
            batch, skipped = _load_batch(images, bb.preprocess)
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
                "onnxruntime": __import__("onnxruntime").__version__,
            })
            if not parity["passed"]:
                raise ExportError(
                    f"The exported graph does not match PyTorch on {parity['n_images']} image(s): max |dprob| = "
                    f"{parity['max_abs_diff']:.2e} (limit {atol:.0e}), top-1 agreement "
                    f"{100 * parity['top1_agreement']:.1f}% (need 100%), per batch size {parity['per_batch_size']}. "
                    f"Nothing was written to {str(out_path)!r}. Try another --opset, or report the model "
                    "(--no-check writes it anyway; not recommended)."
                )
        unchecked = {"checked": False, "passed": None, "reason": "--no-check"}
        _atomic_write_text(parity_path, json.dumps(parity if parity is not None else unchecked, indent=2) + "\n")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(out_path, parity_path, parity, route, _opset_of(graph), meta, time.perf_counter() - t0)


def _torch_batches(fn: Callable[[Any], Any], x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    import torch

    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            outs.append(fn(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).float().numpy())
    return np.concatenate(outs)


def _load_batch(paths: Sequence[Path], cfg: Any) -> tuple[np.ndarray, list[list[str]]]:
    arrays, skipped = [], []
    for p in paths:
        try:
            arrays.append(load_and_preprocess(p, cfg))
        except ImageReadError as e:
            skipped.append([str(p), e.reason])
    if not arrays:
        raise ConfigError(
            f"None of the {len(paths)} check image(s) could be read (first: {skipped[0][0]}: {skipped[0][1]}). "
            "Pass readable images with --check-images."
        )
    return np.stack(arrays), skipped
