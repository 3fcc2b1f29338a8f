"""The options of an extraction run: allowed values and their validation (devices: featbank._device)."""

from __future__ import annotations

from .._device import DEVICES
from ..errors import ConfigError

__all__ = ["DEVICES", "ENGINES", "DTYPES", "MAX_BATCH_SIZE", "MAX_NUM_WORKERS", "MAX_PROCS", "validate_options",
           "validate_procs"]

ENGINES = ("auto", "torch", "onnxruntime")
DTYPES = ("float32", "float16")
#: Bounds checked before any work: a batch is staged as uint8 pixels (65,536 at 224 px: 9.9 GB), and each
#: worker is a process.
MAX_BATCH_SIZE = 65_536
MAX_NUM_WORKERS = 256
MAX_PROCS = 256


def validate_options(batch_size: int, num_workers: int | None, dtype: str) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(f"The 'batch_size' parameter must be an integer from 1 to {MAX_BATCH_SIZE:,}. "
                          f"Got {batch_size!r} instead.")
    if num_workers is not None and (not isinstance(num_workers, int) or not 0 <= num_workers <= MAX_NUM_WORKERS):
        raise ConfigError(f"The 'num_workers' parameter must be an integer from 0 to {MAX_NUM_WORKERS}. "
                          f"Got {num_workers!r} instead.")
    if dtype not in DTYPES:
        raise ConfigError(f"The 'dtype' parameter must be one of {DTYPES}. Got {dtype!r} instead.")


def validate_procs(procs: int) -> None:
    """``--procs``: local worker processes, at most :data:`MAX_PROCS` (each one is a process with its own model)."""
    if not isinstance(procs, int) or isinstance(procs, bool) or not 1 <= procs <= MAX_PROCS:
        raise ConfigError(f"The 'procs' parameter must be an integer from 1 to {MAX_PROCS}. Got {procs!r} instead.")
