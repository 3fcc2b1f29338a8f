"""Exception hierarchy and exit codes.

The library raises; the command line turns each exception into an exit code in exactly one
place (``featbank.cli.main``).
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "EXIT_SKIPPED",
    "EXIT_INTERRUPTED",
    "FeatbankError",
    "ConfigError",
    "DatasetError",
    "CacheError",
    "CacheKeyMismatch",
    "NotACacheError",
    "WeightsUnavailable",
    "BundleError",
    "ExportError",
    "SkippedImagesError",
    "Interrupted",
    "FeatbankWarning",
    "RandomWeightsWarning",
    "SkippedImagesWarning",
    "ValidationLeakWarning",
    "OnnxCacheRebuiltWarning",
    "ExtremeEmbeddingsWarning",
    "DuplicateRowsWarning",
]

EXIT_OK = 0
#: An unexpected failure (a bug): the traceback is printed.
EXIT_INTERNAL = 1
#: A user error: bad option, bad input, refusal to overwrite. A message says what to do.
EXIT_USAGE = 2
#: ``--strict`` was given and some images were skipped.
EXIT_SKIPPED = 3
#: Interrupted by Ctrl-C (SIGINT); work done so far is kept.
EXIT_INTERRUPTED = 130


class FeatbankError(Exception):
    """Base class of every error featbank raises on purpose."""

    exit_code = EXIT_USAGE


class ConfigError(FeatbankError, ValueError):
    """An option or parameter has a value featbank cannot use."""


class DatasetError(FeatbankError):
    """The image folder is missing, empty or not laid out as featbank expects."""


class CacheError(FeatbankError):
    """A feature cache is missing, corrupt, or not a featbank cache."""


class CacheKeyMismatch(CacheError):
    """The cache on disk was made with other settings than the ones asked for."""


class NotACacheError(CacheError):
    """A file given as a cache is not one (not HDF5, or HDF5 without featbank's format attribute).

    featbank never overwrites such a file, not even with ``--overwrite``.
    """


class WeightsUnavailable(FeatbankError):
    """Pretrained weights are not available offline."""


class BundleError(FeatbankError):
    """A model bundle is missing, corrupt, or does not fit the data it is used with."""


class ExportError(FeatbankError):
    """A model cannot be exported, or the exported graph does not match PyTorch."""


class SkippedImagesError(FeatbankError):
    """``strict`` was asked for and some images were skipped (the cache was still written)."""

    exit_code = EXIT_SKIPPED


class Interrupted(FeatbankError):
    """The run was interrupted (Ctrl-C); what was done is kept and a rerun resumes."""

    exit_code = EXIT_INTERRUPTED


class FeatbankWarning(UserWarning):
    """Base class of featbank's warnings, so users can filter them all at once."""


class RandomWeightsWarning(FeatbankWarning):
    """A backbone runs with random weights: its embeddings carry no pretrained knowledge."""


class SkippedImagesWarning(FeatbankWarning):
    """Some images could not be read and were skipped."""


class ValidationLeakWarning(FeatbankWarning):
    """A model selected on a validation set was fitted on some of its images (optimistic metrics)."""


class OnnxCacheRebuiltWarning(FeatbankWarning):
    """A cached ONNX graph of a backbone was broken (truncated, corrupt, unrecorded) and was rebuilt."""


class ExtremeEmbeddingsWarning(FeatbankWarning):
    """Some cached embedding rows are finite but huge (beyond ``featbank.cache.EXTREME_VALUE``)."""


class DuplicateRowsWarning(FeatbankWarning):
    """An input named one file (or one WebDataset sample) more than once; the repeats were collapsed to one row."""
