"""``export --triton REPO``: a Triton Inference Server model repository around an exported graph.

Layout (Triton's "Model Repository" documentation)::

    REPO/<name>/config.pbtxt
    REPO/<name>/labels.txt          one class name per line, in column order of `probabilities`
    REPO/<name>/<version>/model.onnx

``config.pbtxt`` is written from the graph itself (onnxruntime reads its inputs and outputs):
``platform: "onnxruntime_onnx"``, ``max_batch_size`` (the batch axis is left out of ``dims``), the
input's dims (``[-1, -1, 3]`` for a raw-input graph), ``probabilities`` with ``label_filename``,
``label`` (int64 with only the batch axis: ``dims: [1]`` reshaped to ``[]``, Triton's form for a
scalar per request), ``dynamic_batching`` and one CPU ``instance_group`` (change ``kind`` to
``KIND_GPU`` on a GPU server).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .._files import atomic_write_text, check_output_dir, describe_os_error, temporary_path
from ..errors import ConfigError

__all__ = ["model_name", "check_triton_repo", "write_triton_repo", "triton_config", "TRITON_MAX_BATCH_SIZE"]

#: the largest batch Triton's dynamic batcher forms.
TRITON_MAX_BATCH_SIZE = 32
_TYPES = {"tensor(uint8)": "TYPE_UINT8", "tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}


def model_name(out_path: Path) -> str:
    """The Triton model name: the ONNX file's stem, with characters outside ``[A-Za-z0-9_.-]`` as ``_``."""
    stem = out_path.stem if out_path.suffix == ".onnx" else out_path.name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".") or "model"


def check_triton_repo(repo: str | os.PathLike, name: str) -> Path:
    """The repository folder, created and checked writable before the export starts.

    Raises:
        ConfigError: it cannot be created or written, or ``REPO/<name>`` is a file.
    """
    path = Path(repo).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--triton {str(path)!r} is a file; pass a folder (the model repository).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Cannot create the Triton repository {str(path)!r}: {describe_os_error(e)}.") from None
    check_output_dir(path, "Triton model repository")
    if (path / name).exists() and not (path / name).is_dir():
        raise ConfigError(f"{str(path / name)!r} exists and is not a folder; remove it or choose another --triton.")
    return path


def _dims(shape: list[object]) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) + " ]"


def triton_config(onnx_path: Path, name: str, max_batch_size: int = TRITON_MAX_BATCH_SIZE) -> str:
    """The ``config.pbtxt`` text of an exported graph (inputs and outputs read from the file)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}", "input ["]
    for i, arg in enumerate(sess.get_inputs()):
        lines.append(f'  {{ name: "{arg.name}" data_type: {_TYPES[arg.type]} dims: {_dims(list(arg.shape)[1:])} }}'
                     + ("," if i < len(sess.get_inputs()) - 1 else ""))
    lines += ["]", "output ["]
    outs = sess.get_outputs()
    for i, arg in enumerate(outs):
        dims = list(arg.shape)[1:]
        extra = ' label_filename: "labels.txt"' if arg.name == "probabilities" else ""
        body = f"dims: {_dims(dims)}" if dims else "dims: [ 1 ] reshape: { shape: [ ] }"
        lines.append(f'  {{ name: "{arg.name}" data_type: {_TYPES[arg.type]} {body}{extra} }}'
                     + ("," if i < len(outs) - 1 else ""))
    lines += ["]", "dynamic_batching { max_queue_delay_microseconds: 500 }",
              "instance_group [ { count: 1 kind: KIND_CPU } ]", ""]
    return "\n".join(lines)


def write_triton_repo(onnx_path: Path, repo: Path, name: str, version: int) -> Path:
    """Copy the published model into ``repo/name/version/model.onnx`` and write its config and labels.

    Returns:
        The model folder ``repo/name``.
    """
    import json

    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    folder = repo / name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    target = folder / str(version) / "model.onnx"
    tmp = temporary_path(target)
    try:
        shutil.copyfile(onnx_path, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(folder / "labels.txt", "".join(f"{c}\n" for c in json.loads(meta["classes"])))
    atomic_write_text(folder / "config.pbtxt", triton_config(target, name))
    return folder
