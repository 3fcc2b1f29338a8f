"""``ExportConfig``: every option of ``export`` in one typed object, checked once before the bundle is read.

``featbank export``'s click options map onto it in ``cli/export.py``; the Python API builds it from
keywords (``export_model(model, out, **options)``) or takes one (``config=``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import ConfigError
from ..runtime import INPUT_KINDS
from ._parity import DEFAULT_ATOL, MAX_CHECK_IMAGES
from ._quantize import DEFAULT_MAX_DROP

__all__ = ["ExportConfig", "MIN_OPSET", "build_export_config"]

#: The oldest ai.onnx opset the torch dynamo exporter writes.
MIN_OPSET = 18


@dataclass(frozen=True)
class ExportConfig:
    """What one export does (see :func:`featbank.export.export_model` for each option's meaning).

    Attributes:
        check_images: image files or folders for the parity check (default: the bundle's validation images).
        check: run the parity check; max_check_images: at most this many images; atol: the largest |Δprobability|.
        opset: ai.onnx opset (default: the exporter's).
        weights_file: the backbone weights file, for bundles fitted with ``--weights-file``.
        input_kind: ``preprocessed`` or ``raw``.
        quantize: ``None`` or ``"int8"``; calibration: images to calibrate on; max_drop: the allowed test top-1 drop.
        model_version: the file's ``model_version`` (and the Triton version folder).
        triton: also write a Triton model repository there.
        head_only: export the head alone (embeddings -> probabilities, label).
    """

    check_images: Sequence[str | os.PathLike] | str | os.PathLike | None = None
    check: bool = True
    opset: int | None = None
    weights_file: str | os.PathLike | None = None
    atol: float = DEFAULT_ATOL
    max_check_images: int = MAX_CHECK_IMAGES
    input_kind: str = "preprocessed"
    quantize: str | None = None
    calibration: str | os.PathLike | None = None
    max_drop: float = DEFAULT_MAX_DROP
    model_version: int = 1
    triton: str | os.PathLike | None = None
    head_only: bool = False

    def __post_init__(self) -> None:
        self._check_opset()
        if self.input_kind not in INPUT_KINDS:
            raise ConfigError(f"The 'input_kind' parameter must be one of {list(INPUT_KINDS)}. Got {self.input_kind!r} "
                              "instead.")
        if self.quantize not in (None, "int8"):
            raise ConfigError(f"The 'quantize' parameter must be 'int8' or None. Got {self.quantize!r} instead.")
        if not (0 <= self.max_drop <= 100):
            raise ConfigError(f"The 'max_drop' parameter must be 0 to 100 points of accuracy. Got {self.max_drop!r} "
                              "instead.")
        v = self.model_version
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**63:
            raise ConfigError(f"The 'model_version' parameter must be a positive integer. Got {v!r} instead.")
        if self.head_only and (self.input_kind == "raw" or self.quantize):
            raise ConfigError("--head-only exports the head on embeddings: it takes no images, so --input raw and "
                              "--quantize do not apply. Drop them, or drop --head-only.")

    def _check_opset(self) -> None:
        import onnx

        if self.opset is not None and not (MIN_OPSET <= int(self.opset) <= onnx.defs.onnx_opset_version()):
            raise ConfigError(
                f"The 'opset' parameter must be between {MIN_OPSET} (the oldest the torch dynamo exporter writes) and "
                f"{onnx.defs.onnx_opset_version()}. Got {self.opset} instead."
            )


def build_export_config(config: ExportConfig | None, options: dict[str, Any]) -> ExportConfig:
    """``config`` (or the defaults) changed by keyword options, checked.

    Raises:
        TypeError: an option ``export_model`` does not have.
    """
    known = {f.name for f in fields(ExportConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise TypeError(f"export_model() got unexpected keyword argument(s) {', '.join(map(repr, bad))}; its options "
                        f"are the fields of ExportConfig: {', '.join(sorted(known))}.")
    return ExportConfig(**options) if config is None else replace(config, **options)
