"""The options of an extraction run: allowed values, device resolution, mixed precision, validation."""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["DEVICES", "ENGINES", "DTYPES", "resolve_device", "_precision", "_validate"]

DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("auto", "torch", "onnxruntime")
DTYPES = ("float32", "float16")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA GPU is visible, else ``cpu``."""
    if device not in DEVICES:
        raise ConfigError(f"The 'device' parameter must be one of {DEVICES}. Got {device!r} instead.")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is visible. Use --device cpu.")
    return device


def _precision(device: str) -> str:
    if device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def _validate(batch_size: int, num_workers: int | None, dtype: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"The 'batch_size' parameter must be a positive integer. Got {batch_size!r} instead.")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ConfigError(f"The 'num_workers' parameter must be an integer >= 0. Got {num_workers!r} instead.")
    if dtype not in DTYPES:
        raise ConfigError(f"The 'dtype' parameter must be one of {DTYPES}. Got {dtype!r} instead.")
