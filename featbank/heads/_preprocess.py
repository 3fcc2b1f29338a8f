"""The preprocessings a head family puts before its classifier, and the one step scikit-learn lacks.

``preprocess`` names (:data:`PREPROCESSES`), each fitted on a fold's fit rows only:

- ``"standardize"``: each feature centred and scaled with the fit rows' mean and standard deviation;
- ``"l2"``: centred on the fit rows' mean, then each row L2-normalised (Euclidean distances rank as
  cosine distances do);
- ``"sqrt"``: the signed square root of every entry (:class:`SignedSqrt`, ``sign(x) * sqrt(|x|)``),
  then standardised. This is the *power normalisation* of Perronnin, Sanchez and Mensink (ECCV 2010,
  "Improving the Fisher kernel for large-scale image classification"): pooled activations are sparse
  and bursty, a few large entries dominate a dot product, and the square root evens them out. On ELPV
  4-class, digits and lfw_subset (``scripts/bench_preprocess.py``) it raised the cross-validated top-1
  of the RBF SVM over ``standardize`` (docs/benchmarks.md); ``fit --auto`` still chooses it per data
  set by CV, never by default.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

__all__ = ["PREPROCESSES", "SignedSqrt", "prep_steps"]

#: Every preprocessing a family may support (see the module docstring).
PREPROCESSES = ("standardize", "l2", "sqrt")


class SignedSqrt(TransformerMixin, BaseEstimator):
    """``sign(x) * sqrt(|x|)`` of every entry: stateless (``fit`` learns nothing but the width), float64 out.

    It has no parameters, so a saved pipeline holds nothing but its class name and ``n_features_in_``.
    """

    def fit(self, X: Any, y: Any = None) -> SignedSqrt:
        self.n_features_in_ = int(np.asarray(X).shape[1])
        return self

    def transform(self, X: Any) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != getattr(self, "n_features_in_", X.shape[1]):
            raise ValueError(f"SignedSqrt was fitted on {getattr(self, 'n_features_in_', '?')} features; "
                             f"got an array of shape {X.shape}.")
        out = np.abs(X)
        np.sqrt(out, out=out)
        return np.copysign(out, X, out=out)


# Bundles name a skops type by `__module__.__qualname__`: keep it at the public path.
SignedSqrt.__module__ = "featbank.heads"


def prep_steps(preprocess: str) -> list[tuple[str, Any]]:
    """The scikit-learn steps of a preprocessing (fresh, unfitted): what a head family's ``build`` puts
    before the classifier (``standardize``: a ``StandardScaler``; ``l2``: centring, then ``Normalizer``;
    ``sqrt``: :class:`SignedSqrt`, then a ``StandardScaler``)."""
    from sklearn.preprocessing import Normalizer, StandardScaler

    if preprocess == "standardize":
        return [("scale", StandardScaler())]
    if preprocess == "sqrt":
        return [("sqrt", SignedSqrt()), ("scale", StandardScaler())]
    return [("center", StandardScaler(with_std=False)), ("l2", Normalizer(norm="l2"))]
