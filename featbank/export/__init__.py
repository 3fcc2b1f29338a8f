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

Options of :func:`export_model` (docs/commands/export.md, "Deploy anywhere"): ``input="raw"`` puts the weights' resize
and centre crop in front of the graph (:mod:`._raw`; any decoded RGB uint8 image in), ``quantize="int8"``
quantizes it statically (QDQ, per channel, :mod:`._quantize`; the test top-1 change measured and
bounded), ``triton=REPO`` writes a Triton model repository (:mod:`._triton`), ``head_only=True`` exports
the head on embeddings (:mod:`._head_only`).

Every export is checked on real images against featbank's PyTorch pipeline at batch sizes 1
and 7 before the file appears under its name (``<out>`` with suffix ``.parity.json`` holds the
figures).
"""

from __future__ import annotations

# MAX_CHECK_IMAGES and MIN_OPSET are outside __all__ but were module attributes when this package
# was one module (featbank.export.MIN_OPSET), so they stay reachable here.
from ._exporter import MIN_OPSET, build_torch_classifier, export_model  # noqa: F401
from ._parity import DEFAULT_ATOL, MAX_CHECK_IMAGES, PARITY_BATCH_SIZES, check_parity  # noqa: F401
from ._publish import ExportReport
from .config import ExportConfig

__all__ = [
    "ExportReport",
    "ExportConfig",
    "export_model",
    "build_torch_classifier",
    "check_parity",
    "DEFAULT_ATOL",
    "PARITY_BATCH_SIZES",
]
