"""Heads on embeddings: torch linear / MLP heads as scikit-learn estimators, sklearn heads by name.

What ``fit`` can store in a bundle is a registry of head kinds (:mod:`featbank.heads.kinds`: build,
select, refit, save, load and export per kind; :func:`register_head_kind` adds one).

:class:`LinearHead` is multinomial logistic regression fitted with full-batch L-BFGS (scipy's
L-BFGS-B driving losses and gradients computed in torch, on CPU or CUDA); its objective is
scikit-learn's multinomial ``LogisticRegression`` one, so ``C`` means the same thing in both::

    (1/S) * sum_i w_i * CE(x_i, y_i)  +  ||W||^2 / (2 * C * S)      (S = sum_i w_i; intercept not penalised)

(For two classes the head keeps one weight vector per class, like scikit-learn's multinomial
solver; scikit-learn's binary ``LogisticRegression`` has one vector, and its C is twice this C.)
In memory, L-BFGS runs on a preconditioned parametrisation ``W = M @ U.T`` with
``U = V diag(1 / sqrt(c * e + 2 * lambda))`` from the eigendecomposition ``V diag(e) V^T`` of the
standardised features' second-moment matrix (``c`` approximates the softmax curvature): the same
objective and optimum, far fewer iterations on correlated embeddings (see scripts/bench_fit.py).

:class:`MLPHead` is a small MLP trained with AdamW and early stopping on a validation set.

Both accept an (N, D) array, or a :class:`featbank.heads.Features` that streams rows of an HDF5
cache in chunks (the linear head then accumulates the exact full-batch gradient chunk by chunk,
so a streamed fit equals the in-memory one up to float rounding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._estimator import Estimator, pipeline_steps
from ._features import Features
from ._sklearn import (
    affine_prefix,
    estimator_proba,
    has_predict_proba,
    make_sklearn_head,
    parse_param,
    sklearn_classifiers,
    unknown_head,
)
from ._sweep import COARSE_GRID, SKLEARN_C_GRID, half_decades
from .kinds import (
    DEFAULT_KIND,
    HEAD_KINDS,
    HeadKind,
    HeadSpec,
    Selected,
    ValSplit,
    head_kind,
    head_state,
    jsonable,
    kind_of,
    register_head_kind,
)

if TYPE_CHECKING:
    from ._families import HEAD_FAMILIES, Folds, HeadFamily, family_mismatch, get_head_family, searched_as_spec
    from ._gram import Block, FoldGram, FoldKernels
    from ._kernel_svc import KernelSVC
    from ._linear_head import LinearHead
    from ._mlp_head import MLPHead
    from ._preprocess import PREPROCESSES, SignedSqrt
    from ._state import head_to_torch

# The torch heads and the families load on first use, so that ``featbank.fitting`` (and the CLI)
# import without torch. LinearHead and MLPHead keep __module__ == "featbank.heads" (set in their
# submodules): skops files and bundle manifests written before the split name them so, and
# resolve through here.
_LAZY = {
    "LinearHead": "._linear_head", "MLPHead": "._mlp_head", "head_to_torch": "._state", "KernelSVC": "._kernel_svc",
    "HeadFamily": "._families", "HEAD_FAMILIES": "._families", "Folds": "._families",
    "get_head_family": "._families", "family_mismatch": "._families", "searched_as_spec": "._families",
    "FoldKernels": "._gram", "FoldGram": "._gram", "Block": "._gram",
    "PREPROCESSES": "._preprocess", "SignedSqrt": "._preprocess",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LinearHead",
    "MLPHead",
    "Features",
    "head_to_torch",
    "head_state",
    "Estimator",
    "pipeline_steps",
    "HeadSpec",
    "HeadKind",
    "HEAD_KINDS",
    "DEFAULT_KIND",
    "jsonable",
    "register_head_kind",
    "head_kind",
    "kind_of",
    "Selected",
    "ValSplit",
    "COARSE_GRID",
    "half_decades",
    "SKLEARN_C_GRID",
    "make_sklearn_head",
    "affine_prefix",
    "sklearn_classifiers",
    "unknown_head",
    "parse_param",
    "estimator_proba",
    "has_predict_proba",
    "KernelSVC",
    "HeadFamily",
    "HEAD_FAMILIES",
    "PREPROCESSES",
    "SignedSqrt",
    "Folds",
    "get_head_family",
    "family_mismatch",
    "searched_as_spec",
    "FoldKernels",
    "FoldGram",
    "Block",
]
