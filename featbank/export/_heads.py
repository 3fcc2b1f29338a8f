"""A bundle's head as a graph piece: a torch module when linear in the embeddings, else skl2onnx."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ExportError
from ..runtime import OUTPUT_NAMES
from ._graph import torch_modules

if TYPE_CHECKING:
    from ..heads import Estimator

__all__ = ["head_proba_module", "sklearn_head_onnx"]


# --------------------------------------------------------------------------------------------
# Heads -> torch modules (embeddings -> probabilities)
# --------------------------------------------------------------------------------------------


def _class_columns(est: Estimator, n_classes: int) -> np.ndarray | None:
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


def head_proba_module(est: Estimator, n_classes: int) -> Any | None:
    """Module embeddings -> probabilities (bundle column order), or None when the head is not linear."""
    import torch
    from torch import nn

    from ..heads import kind_of

    ProbaHead, _ = torch_modules()
    m = kind_of(est).export(est)  # each head kind owns its export
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


#: Heads checked to export through featbank's CLI (tests/test_hostile_onnx.py runs each suggestion).
EXPORTABLE_HEADS = ("linear", "mlp", "LogisticRegression", "KNeighborsClassifier", "RandomForestClassifier",
                    "CalibratedClassifierCV")


def _unsupported(est: Estimator, why: str) -> ExportError:
    return ExportError(
        f"The head {type(est).__name__} of this bundle cannot be exported to ONNX: {why}. Fit a head that exports "
        f"instead: 'featbank fit CACHE --head linear' (or --head {', '.join(EXPORTABLE_HEADS[1:])})."
    )


def _no_proba_reason(clf: Any) -> str:
    why = "it has no predict_proba, so there are no probabilities to put in the graph"
    if type(clf).__name__ in ("SVC", "NuSVC"):
        why += (
            " (fitted without probability estimates). For a support vector machine that "
            f"exports, fit '--head {type(clf).__name__} --param probability=True' (deprecated from scikit-learn "
            "1.9) or '--head CalibratedClassifierCV' (a calibrated linear SVM)"
        )
    return why


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
        elif kind == "sqrt":  # sign(x) * sqrt(|x|)
            nodes += [helper.make_node("Sign", [x], [f"pre{i}/sign"]), helper.make_node("Abs", [x], [f"pre{i}/abs"]),
                      helper.make_node("Sqrt", [f"pre{i}/abs"], [f"pre{i}/root"]),
                      helper.make_node("Mul", [f"pre{i}/sign", f"pre{i}/root"], [f"pre{i}/out"])]
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


def _skl2onnx_graph(model_est: Any, clf: Any, embed_dim: int, opset: int) -> tuple[Any, str]:
    """skl2onnx's graph of ``model_est`` (input ``skl_input``, every other name prefixed ``skl/``) and
    the name of its probabilities output."""
    import onnx
    from skl2onnx import convert_sklearn  # a dependency of featbank: an ImportError is a broken install
    from skl2onnx.common.data_types import FloatTensorType

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
    proba_out = next((o.name for o in onx.graph.output if "prob" in o.name), None)
    if proba_out is None:
        raise _unsupported(clf, f"skl2onnx gave outputs {[o.name for o in onx.graph.output]} without probabilities")
    return onx, proba_out


def _output_nodes(clf: Any, n_classes: int, proba_out: str, inits: list[Any]) -> list[Any]:
    """Nodes from skl2onnx's probabilities to the bundle's outputs: float32, one column per bundle
    class (a matrix of 0/1 placed in ``inits`` where the classifier saw fewer), and the argmax label."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Cast", [proba_out], ["head/proba"], to=TensorProto.FLOAT)]
    cols = _class_columns(clf, n_classes)
    src = "head/proba"
    if cols is not None:
        m = np.zeros((len(cols), n_classes), np.float32)
        m[np.arange(len(cols)), cols] = 1.0
        inits.append(numpy_helper.from_array(m, "head/columns"))
        nodes.append(helper.make_node("MatMul", [src, "head/columns"], ["head/proba_all"]))
        src = "head/proba_all"
    return nodes + [
        helper.make_node("Identity", [src], [OUTPUT_NAMES[0]]),
        helper.make_node("ArgMax", [OUTPUT_NAMES[0]], [OUTPUT_NAMES[1]], axis=1, keepdims=0),
    ]


def sklearn_head_onnx(est: Estimator, embed_dim: int, n_classes: int, opset: int) -> Any:
    """A graph embeddings (N, D) float -> probabilities (N, C) float32, label (N,) int64, via skl2onnx."""
    from onnx import TensorProto, helper

    from ..heads import affine_prefix, has_predict_proba, pipeline_steps

    *steps, clf = pipeline_steps(est)
    if not has_predict_proba(clf):
        raise _unsupported(clf, _no_proba_reason(clf))
    prefix = affine_prefix(steps)
    if prefix is None:
        # Unknown preprocessing: let skl2onnx try the whole pipeline.
        prefix, model_est = [], est
    else:
        model_est = clf
    onx, proba_out = _skl2onnx_graph(model_est, clf, embed_dim, opset)
    g = onx.graph
    pre_nodes, inits, x = _prefix_nodes(prefix, "embeddings", opset)
    for node in g.node:
        node.input[:] = [x if i == "skl_input" else i for i in node.input]
    nodes = _output_nodes(clf, n_classes, proba_out, inits)
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
