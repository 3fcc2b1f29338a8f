"""Device, mixed precision and decoding workers: one home for extract, fit, finetune and predict."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Union

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

#: What a ``device`` parameter takes: a name (``auto``, ``cpu``, ``cuda``, ``cuda:N``), a ``torch.device``, or None (auto).
DeviceLike = Union[str, "torch.device", None]

__all__ = ["DEVICES", "DeviceLike", "resolve_device", "autocast_dtype", "precision_name", "default_num_workers",
           "quiet_worker_init"]

#: The values ``--device`` offers (the library also takes ``cuda:N`` and a ``torch.device``).
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """``auto``/None -> CUDA when a GPU is visible, else CPU; returns a ``torch.device``.

    Raises:
        ConfigError: an unknown device, or ``cuda`` when no CUDA GPU is visible.
    """
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"The 'device' parameter must be one of {DEVICES} (or cuda:N). Got {device!r} instead.") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"The 'device' parameter must be one of {DEVICES} (or cuda:N). Got {device!r} instead.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is visible. Use --device cpu or auto.")
    return dev


def autocast_dtype(device: DeviceLike) -> torch.dtype | None:
    """The autocast dtype on ``device``: bfloat16 where the GPU has it, else float16; None on CPU."""
    import torch

    if resolve_device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision_name(device: DeviceLike) -> str:
    """``bfloat16``, ``float16`` or ``float32``: what :func:`autocast_dtype` runs at, as recorded in files."""
    dtype = autocast_dtype(device)
    return "float32" if dtype is None else str(dtype).replace("torch.", "")


def default_num_workers(device: DeviceLike, *, training: bool = False) -> int:
    """Image-decoding processes when ``num_workers`` is not given.

    On a GPU, enough decoders to feed it (fewer when training: each batch also runs backward). On
    CPU, extraction uses at least two (one decoder cannot keep up with onnxruntime even on two
    cores), while training decodes in the main process on two cores or fewer (the forward and
    backward passes need them).
    """
    n = os.cpu_count() or 1
    kind = device if isinstance(device, str) else getattr(device, "type", str(device))
    if kind != "cpu":
        return min(12, n) if training else min(16, n)
    if training:
        return 0 if n <= 2 else min(8, n - 1)
    return min(8, max(2, n - 1))


def quiet_worker_init(worker_id: int = 0) -> None:
    """``worker_init_fn`` of featbank's decoding ``DataLoader``\\ s: a worker is quiet about a consumer that left.

    A worker hands each batch's shared memory to the main process through multiprocessing's
    resource sharer, a thread that reports its errors with ``sys.excepthook``. When the main process
    stops mid-handshake (Ctrl-C reaches the whole process group; a crash), that thread hits
    ``ConnectionResetError`` and printed its traceback under the main process's own clear message. The
    worker's hook drops connection errors (the main process reports why it stopped) and passes every
    other exception to the hook it replaced.
    """
    import sys

    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(exc_type, (ConnectionError, EOFError)):
            return
        previous(exc_type, exc, tb)

    sys.excepthook = hook
