"""The end of every export: the report, the metadata stamped on the graph, the checked file published under its name."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from .._files import atomic_write_text, describe_os_error, fsync_dir
from ..errors import ExportError

if TYPE_CHECKING:
    from onnx import ModelProto

__all__ = ["ExportReport", "stamp", "publish", "file_error"]


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
        input_kind: what the graph takes: ``preprocessed``, ``raw`` or ``embeddings`` (``head_only``).
        quantization: the int8 figures (test top-1 of fp32 and int8, the drop, the calibration), if quantized.
        triton: the Triton model folder written (``<repo>/<name>``), if asked.
    """

    path: Path
    parity_path: Path
    parity: dict[str, Any] | None
    route: str
    opset: int
    metadata: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    input_kind: str = "preprocessed"
    quantization: dict[str, Any] | None = None
    triton: Path | None = None

    def summary(self) -> str:
        lines = [f"Exported {self.metadata.get('backbone')} + {self.metadata.get('head')} "
                 f"({self.route}, opset {self.opset}) in {self.seconds:.1f}s"]
        lines.append(f"Input: {self.input_kind}")
        if self.parity is None:
            lines.append("Parity check: skipped (--no-check)")
        else:
            p = self.parity
            lines.append(
                f"Parity check on {p['n_images']} image(s) ({p['image_source']}), batch sizes "
                f"{', '.join(map(str, p['batch_sizes']))}: max |dprob| = {p['max_abs_diff']:.2e} "
                f"(limit {p['atol']:.0e}), top-1 agreement {100 * p['top1_agreement']:.1f}%"
            )
            if "raw" in p:
                r = p["raw"]
                lines.append(
                    f"Raw input vs Pillow's preprocessing, {r['n_cases']} image(s), {len({c['size'] for c in r['cases']})} "
                    f"sizes: top-1 agreement {100 * r['top1_agreement']:.1f}%, max |dprob| = {r['max_abs_diff']:.2e}, "
                    f"pixels equal {100 * r['pixel_exact_fraction']:.2f}% (max diff {r['pixel_max_diff']})"
                )
        if self.quantization is not None:
            q = self.quantization
            lines.append(
                f"int8 (QDQ, per channel; {q['n_calibration']} calibration images): test top-1 {100 * q['fp32_top1']:.2f}% "
                f"-> {100 * q['int8_top1']:.2f}% ({q['drop_points']:+.2f} pt drop, limit {q['max_drop']:g}) on "
                f"{q['n_test']} test images"
            )
        return "\n".join(lines)


def stamp(model: ModelProto, meta: dict[str, str]) -> None:
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.producer_name = "featbank"
    model.producer_version = __version__
    model.model_version = int(meta.get("model_version", "1"))
    what = "embeddings float32 [N, D]" if meta.get("input") == "embeddings" else \
        f"images uint8 NHWC RGB ({meta.get('input', 'preprocessed')})"
    model.doc_string = f"featbank classifier: {what} -> probabilities, label. classes={meta['classes']}"


def publish(tmp: Path, out_path: Path, parity_path: Path, parity: dict[str, Any] | None) -> None:
    """Write the parity JSON, then move the checked graph to its name (durably, in one rename)."""
    unchecked = {"checked": False, "passed": None, "reason": "--no-check"}
    atomic_write_text(parity_path, json.dumps(parity if parity is not None else unchecked, indent=2) + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    if out_path.exists():
        os.chmod(tmp, out_path.stat().st_mode & 0o7777)  # a replaced model keeps its permissions
    os.replace(tmp, out_path)
    fsync_dir(out_path.parent)


def file_error(e: OSError, out_path: Path) -> ExportError:
    """A failed read or write during the export (disk full, file-size limit, permissions) as a user error."""
    where = f" at {e.filename!r}" if e.filename else ""
    kept = "the file already there is unchanged" if out_path.exists() else "nothing was written there"
    hint = " Free some space or choose another --out." if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) \
        else " Choose another --out, or check the permissions."
    return ExportError(
        f"The export to {str(out_path)!r} stopped: {describe_os_error(e)}{where}; {kept}.{hint}"
    )
