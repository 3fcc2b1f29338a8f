"""The estimator classes a scikit-learn head may be built from, hence the classes a bundle's skops file may name.

The skops reader (``featbank.heads.skops``) trusts exactly these classifiers (plus the pipeline steps
and state types it lists itself); this module imports no head kind, so the kinds can use the reader.
"""

from __future__ import annotations

from ._kernel_svc import KernelSVC
from ._sklearn import sklearn_classifiers

__all__ = ["trusted_head_classes"]


def trusted_head_classes() -> list[type]:
    """Every scikit-learn classifier ``fit --head`` accepts, and :class:`~featbank.heads.KernelSVC` (``--auto``'s SVMs)."""
    # KernelSVC: featbank's SVC fitted through a BLAS kernel matrix (fit --auto's SVMs); its state is SVC's.
    return [*sklearn_classifiers().values(), KernelSVC]
