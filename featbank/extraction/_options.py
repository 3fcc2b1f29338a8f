"""The options of an extraction run: allowed values and their validation (devices: featbank._device)."""

from __future__ import annotations

from .._device import DEVICES
from ..errors import ConfigError

__all__ = ["DEVICES", "ENGINES", "DTYPES", "validate_options"]

ENGINES = ("auto", "torch", "onnxruntime")
DTYPES = ("float32", "float16")


def validate_options(batch_size: int, num_workers: int | None, dtype: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"The 'batch_size' parameter must be a positive integer. Got {batch_size!r} instead.")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ConfigError(f"The 'num_workers' parameter must be an integer >= 0. Got {num_workers!r} instead.")
    if dtype not in DTYPES:
        raise ConfigError(f"The 'dtype' parameter must be one of {DTYPES}. Got {dtype!r} instead.")
