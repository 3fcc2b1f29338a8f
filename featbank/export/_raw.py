"""Preprocessing inside the graph: decoded RGB uint8 images of any size -> the weights' resize and centre crop.

The graph :func:`preprocess_graph` builds is the ONNX twin of :func:`featbank.images.preprocess_image`
(torchvision's PIL ``Resize(resize_size)`` + ``CenterCrop(input_size)``):

- the shorter side becomes ``resize_size`` and the longer ``floor(resize_size * long / short)``, with
  ``Resize`` (opset 18, ``antialias=1``: Pillow's filter support widened by the downscale factor,
  ``half_pixel`` coordinates, ``exclude_outside=1``: Pillow renormalises the weights inside the image;
  bicubic with ``cubic_coeff_a=-0.5`` as Pillow's, bilinear as Pillow's triangle filter). onnxruntime
  resizes uint8 with fixed-point weights as Pillow does, so most pixels come out identical; Pillow's
  rounding of its intermediate (horizontal-pass) image differs by one level on some pixels
  (the export's parity file reports the pixel and probability differences);
- an image whose shorter side already equals ``resize_size`` is not resampled (as Pillow does not);
- zero padding where the crop is larger than the resized image, then the crop at
  ``round((h - crop_h) / 2)`` (half to even, as Python's ``round`` and ONNX ``Round``).

Its output (N, crop_h, crop_w, 3) uint8 is the input of the preprocessed graph, so the raw graph is
``compose(preprocess_graph, preprocessed graph)``: one backbone graph for both inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..images import PreprocessConfig

if TYPE_CHECKING:
    from ..bundles import Bundle

__all__ = ["preprocess_graph", "RAW_INTERPOLATIONS", "CROPPED_NAME", "check_raw_interpolation", "compose_raw",
           "raw_parity", "RAW_MIN_AGREEMENT", "RAW_PIXEL_TOLERANCE", "check_no_window"]

#: Pillow filters the graph reproduces, as ONNX Resize ``mode`` (nearest is Pillow's pixel-centre rule).
RAW_INTERPOLATIONS = {"bicubic": "cubic", "bilinear": "linear"}
CROPPED_NAME = "cropped"
_RAW_TMP_NAME = "raw_images"
#: the raw graph must agree with featbank's Pillow pipeline (then the checked graph) on this share of top-1 labels,
RAW_MIN_AGREEMENT = 0.99
#: and its resized and cropped pixels may differ from Pillow's by at most this many levels (of 255; measured: 0 on
#: almost every pixel, up to 2 where Pillow rounds its intermediate horizontal pass).
RAW_PIXEL_TOLERANCE = 4


def check_raw_interpolation(cfg: PreprocessConfig) -> None:
    if cfg.interpolation not in RAW_INTERPOLATIONS:
        raise ConfigError(
            f"--input raw reproduces the weights' resize inside the graph for {sorted(RAW_INTERPOLATIONS)} "
            f"interpolation; this backbone resizes with {cfg.interpolation!r}. Export with --input preprocessed "
            "(the caller resizes as the metadata says)."
        )


def preprocess_graph(cfg: PreprocessConfig, opset: int, input_name: str) -> Any:
    """uint8 (N, H, W, 3) RGB of any H, W -> uint8 (N, crop_h, crop_w, 3), as featbank's Pillow pipeline."""
    from onnx import TensorProto, helper, numpy_helper

    check_raw_interpolation(cfg)
    ch, cw = cfg.input_size

    def const(name: str, value: Any, dtype: Any = np.int64) -> Any:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    inits = [
        const("c_hw_idx", [1, 2]), const("c_size", int(cfg.resize_size)), const("c_crop", [ch, cw]),
        const("c_two_f", 2.0, np.float32), const("c_axes_hw", [1, 2]), const("c_pad_zero", [0, 0]),
        const("c_zero_u8", 0, np.uint8), const("c_two_i", 2),
    ]
    nodes = _resize_nodes(input_name, RAW_INTERPOLATIONS[cfg.interpolation]) + _pad_nodes() + _crop_nodes()
    graph = helper.make_graph(
        nodes, "featbank_preprocess",
        [helper.make_tensor_value_info(input_name, TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info(CROPPED_NAME, TensorProto.UINT8, ["batch", ch, cw, 3])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _resize_nodes(input_name: str, mode: str) -> list[Any]:
    """``input_name`` -> ``resized``: the short side to ``c_size``, the long side to
    floor(size * long / short); the image itself where the short side already is ``c_size``."""
    from onnx import TensorProto, helper

    n = helper.make_node
    return [
        n("Shape", [input_name], ["shape"]),
        n("Gather", ["shape", "c_hw_idx"], ["hw"], axis=0),
        n("ReduceMin", ["hw"], ["short"], keepdims=0),
        n("Mul", ["hw", "c_size"], ["hw_scaled"]),
        n("Div", ["hw_scaled", "short"], ["new_hw"]),  # int64: floor division for positive values
        n("Equal", ["short", "c_size"], ["same_size"]),
        n("If", ["same_size"], ["resized"],
          then_branch=helper.make_graph([n("Identity", [input_name], ["resized_same"])], "keep", [],
                                        [helper.make_tensor_value_info("resized_same", TensorProto.UINT8, None)]),
          else_branch=helper.make_graph(
              [n("Resize", [input_name, "", "", "new_hw"], ["resized_new"], mode=mode,
                 antialias=1, axes=[1, 2], coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.5,
                 exclude_outside=1)],
              "resize", [], [helper.make_tensor_value_info("resized_new", TensorProto.UINT8, None)])),
    ]


def _pad_nodes() -> list[Any]:
    """``resized`` -> ``padded``: zeros where the crop is larger (torchvision pads), floor(half) before
    and the rest after."""
    from onnx import helper

    n = helper.make_node
    return [
        n("Shape", ["resized"], ["rshape"]),
        n("Gather", ["rshape", "c_hw_idx"], ["rhw"], axis=0),
        n("Sub", ["c_crop", "rhw"], ["short_by"]),
        n("Max", ["short_by", "c_pad_zero"], ["pad_total"]),
        n("Div", ["pad_total", "c_two_i"], ["pad_before"]),
        n("Sub", ["pad_total", "pad_before"], ["pad_after"]),
        n("Concat", ["pad_before", "pad_after"], ["pads"], axis=0),
        n("Pad", ["resized", "pads", "c_zero_u8", "c_axes_hw"], ["padded"], mode="constant"),
    ]


def _crop_nodes() -> list[Any]:
    """``padded`` -> the centre crop, starting at round((dim - crop) / 2), half to even as Python's round."""
    from onnx import TensorProto, helper

    n = helper.make_node
    return [
        n("Shape", ["padded"], ["pshape"]),
        n("Gather", ["pshape", "c_hw_idx"], ["phw"], axis=0),
        n("Sub", ["phw", "c_crop"], ["extra"]),
        n("Cast", ["extra"], ["extra_f"], to=TensorProto.FLOAT),
        n("Div", ["extra_f", "c_two_f"], ["half_f"]),
        n("Round", ["half_f"], ["start_f"]),
        n("Cast", ["start_f"], ["start"], to=TensorProto.INT64),
        n("Add", ["start", "c_crop"], ["end"]),
        n("Slice", ["padded", "start", "end", "c_axes_hw"], [CROPPED_NAME]),
    ]


def check_no_window(bundle: Bundle) -> None:
    """A bundle whose transform has an intensity window cannot go raw: the window is not in the graph."""
    transform = bundle.backbone.get("transform") or {}
    window = transform.get("window") if isinstance(transform, dict) else None
    if window not in (None, "none"):
        raise ConfigError(
            f"Bundle {str(bundle.path)!r} applies the intensity window {window!r} to its images "
            "(backbone.transform.window); the window is not in the graph, so --input raw would feed unwindowed "
            "pixels. Export with --input preprocessed and apply the window and the resize before the model."
        )


def _rename(graph: Any, old: str, new: str) -> None:
    """Rename a value everywhere in a graph and its subgraphs (If branches)."""
    for vi in list(graph.input) + list(graph.output):
        if vi.name == old:
            vi.name = new
    for node in graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
        for attr in node.attribute:
            if attr.g is not None and attr.HasField("g"):
                _rename(attr.g, old, new)


def compose_raw(inner: Any, cfg: PreprocessConfig, input_name: str) -> Any:
    """The raw graph: :func:`preprocess_graph` in front of ``inner`` (a graph taking preprocessed pixels)."""
    import onnx
    from onnx import compose

    from ._graph import dedupe_opsets, opset_of

    prep = preprocess_graph(cfg, opset_of(inner), _RAW_TMP_NAME)
    prep.ir_version = inner.ir_version
    for imp in inner.opset_import:  # merge_models wants the same opset imports on both sides
        if imp.domain not in ("", "ai.onnx"):
            prep.opset_import.append(imp)
    prep = compose.add_prefix(prep, "preprocess/", rename_inputs=False, rename_outputs=False)
    merged = compose.merge_models(prep, inner, io_map=[(CROPPED_NAME, input_name)])
    dedupe_opsets(merged)
    _rename(merged.graph, _RAW_TMP_NAME, input_name)
    onnx.checker.check_model(merged)
    return merged


# --------------------------------------------------------------------------------------------
# Parity: the raw graph on decoded images against featbank's Pillow pipeline + the checked graph
# --------------------------------------------------------------------------------------------


def _variants(img: Any, i: int, cfg: PreprocessConfig) -> list[tuple[str, Any]]:
    """The image itself, and for the first images awkward sizes and modes made from it (real content)."""
    from PIL import Image

    out = [("original", img)]
    if i >= 3:
        return out
    bicubic = Image.Resampling.BICUBIC
    side = int(cfg.resize_size)
    out += [
        ("tiny 7x5", img.resize((7, 5), bicubic)),
        ("wide 100:1", img.resize((2000, 20), bicubic)),
        ("tall 1:90", img.resize((16, 1440), bicubic)),
        ("grey as RGB", img.convert("L").convert("RGB")),
        ("landscape 640x360", img.resize((640, 360), bicubic)),
        (f"short side = resize_size ({side})", img.resize((side, side * 3 // 2), bicubic)),
    ]
    if i == 0:
        out.append(("huge 3000x2000", img.resize((3000, 2000), bicubic)))
    return out


def raw_parity(raw_path: Any, inner_path: Any, cfg: PreprocessConfig, images: Any, input_name: str,
               output_names: Any) -> dict[str, Any]:
    """Run the raw graph on decoded images and compare with Pillow's preprocessing fed to the inner graph.

    Args:
        raw_path: the raw-input graph file.
        inner_path: the graph it wraps (already checked against PyTorch on Pillow-preprocessed pixels).
        cfg: the weights' preprocessing.
        images: image files (real content); sizes and modes are varied from the first three.
        input_name, output_names: the graphs' input and outputs.

    Returns:
        ``passed`` (top-1 agreement >= :data:`RAW_MIN_AGREEMENT` and pixels within
        :data:`RAW_PIXEL_TOLERANCE`), ``top1_agreement``, ``max_abs_diff`` (probabilities),
        ``pixel_max_diff``, ``pixel_exact_fraction``, ``batch_max_abs_diff`` (equal-size images in one
        batch against one at a time), the cases (name, width x height).
    """
    from ..images import ImageReadError, load_image

    raw, inner, prep = _sessions(raw_path, inner_path, cfg, input_name)
    out = output_names[0]
    cases, px_exact, px_total = [], 0, 0
    originals: dict[tuple[int, ...], list[tuple[Any, Any]]] = {}
    for i, path in enumerate(images):
        try:
            img = load_image(path)
        except ImageReadError:
            continue
        for name, variant in _variants(img, i, cfg):
            x = np.asarray(variant, dtype=np.uint8)[None]
            metrics, got, px = _one_case(raw, inner, prep, x, variant, cfg, input_name, out)
            cases.append({"case": name, "size": f"{variant.width}x{variant.height}", "source": str(path), **metrics})
            px_exact, px_total = px_exact + int((px == 0).sum()), px_total + px.size
            if name == "original":
                originals.setdefault(x.shape, []).append((x[0], got))
    return _parity_summary(cases, px_exact / px_total if px_total else 0.0, _batch_worst(raw, originals, input_name, out))


def _sessions(raw_path: Any, inner_path: Any, cfg: PreprocessConfig, input_name: str) -> tuple[Any, Any, Any]:
    """onnxruntime sessions (CPU) of the raw graph, the graph it wraps, and the preprocessing alone."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    cpu = ["CPUExecutionProvider"]
    return (ort.InferenceSession(str(raw_path), opts, providers=cpu),
            ort.InferenceSession(str(inner_path), opts, providers=cpu),
            ort.InferenceSession(preprocess_graph(cfg, 18, input_name).SerializeToString(), opts, providers=cpu))


def _one_case(raw: Any, inner: Any, prep: Any, x: np.ndarray, variant: Any, cfg: PreprocessConfig, input_name: str,
              out: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """One decoded image ``x`` (1 x H x W x 3 uint8): (its figures, the raw graph's probabilities, the
    per-pixel difference between the graph's preprocessing and Pillow's)."""
    from ..images import preprocess_image

    ref_px = preprocess_image(variant, cfg)
    px = np.abs(prep.run(None, {input_name: x})[0][0].astype(np.int16) - ref_px.astype(np.int16))
    ref = inner.run([out], {input_name: ref_px[None]})[0][0]
    got = raw.run([out], {input_name: x})[0][0]
    metrics = {"pixel_max_diff": int(px.max()), "max_abs_diff": float(np.abs(got.astype(np.float64) - ref).max()),
               "top1_agrees": bool(got.argmax() == ref.argmax())}
    return metrics, got, px


def _batch_worst(raw: Any, originals: dict[tuple[int, ...], list[tuple[Any, Any]]], input_name: str, out: str) -> float:
    """The largest difference between equal-size images run as one batch and one at a time."""
    worst = 0.0
    for group in originals.values():
        if len(group) > 1:
            p = raw.run([out], {input_name: np.stack([g[0] for g in group])})[0]
            worst = max(worst, float(np.abs(p - np.stack([g[1] for g in group])).max()))
    return worst


def _parity_summary(cases: list[dict[str, Any]], px_exact_fraction: float, batch_worst: float) -> dict[str, Any]:
    agreement = float(np.mean([c["top1_agrees"] for c in cases])) if cases else 0.0
    px_worst = max((c["pixel_max_diff"] for c in cases), default=0)
    return {
        "passed": bool(cases) and agreement >= RAW_MIN_AGREEMENT and px_worst <= RAW_PIXEL_TOLERANCE,
        "reference": "featbank.images.preprocess_image (Pillow) -> the graph checked against PyTorch",
        "n_cases": len(cases), "top1_agreement": agreement, "min_top1_agreement": RAW_MIN_AGREEMENT,
        # np.max, not max(): a NaN in any case shows, whatever the order of the cases
        "max_abs_diff": float(np.max([c["max_abs_diff"] for c in cases])) if cases else 0.0, "pixel_max_diff": px_worst,
        "pixel_tolerance": RAW_PIXEL_TOLERANCE, "pixel_exact_fraction": px_exact_fraction,
        "batch_max_abs_diff": batch_worst, "cases": cases,
    }
