"""A fitted head as a torch module mapping embeddings to probabilities, where torch expresses it exactly
(the ``export`` of every head kind, :mod:`featbank.heads.kinds`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ._estimator import pipeline_steps
from ._kernel_svc import KernelSVC, kernel_svc_to_torch
from ._neighbors import knn_to_torch
from ._sklearn import has_predict_proba
from ._torch_head import Preprocess, Probabilities, TorchHead

if TYPE_CHECKING:
    from ._estimator import Estimator

__all__ = ["head_to_torch"]


def _sk_linear_to_torch(steps: list[Any], clf: Any) -> nn.Module | None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import Normalizer, StandardScaler

    if not hasattr(clf, "coef_") or not hasattr(clf, "intercept_"):
        return None
    proba_is_softmax = isinstance(clf, LogisticRegression)
    has_proba = has_predict_proba(clf)
    if has_proba and not proba_is_softmax:
        return None  # e.g. SGDClassifier(loss="log_loss"): one-vs-rest probabilities, not a softmax
    mods: list[nn.Module] = []
    for s in steps:
        if isinstance(s, Normalizer) and s.norm == "l2":
            mods.append(Preprocess(True))
        elif isinstance(s, StandardScaler):
            mean = s.mean_ if s.with_mean else np.zeros(s.n_features_in_)
            scale = s.scale_ if s.with_std else np.ones(s.n_features_in_)
            mods.append(Preprocess(False, mean, scale))
        elif s is None or s == "passthrough":
            continue
        else:
            return None
    coef = np.atleast_2d(np.asarray(clf.coef_, np.float32))
    icpt = np.asarray(clf.intercept_, np.float32).reshape(-1)
    if coef.shape[0] == 1:  # binary: softmax([0, d]) == sigmoid(d)
        coef = np.concatenate([np.zeros_like(coef), coef])
        icpt = np.concatenate([np.zeros(1, np.float32), icpt])
    lin = nn.Linear(coef.shape[1], coef.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(coef))
        lin.bias.copy_(torch.as_tensor(icpt))
    return Probabilities(nn.Sequential(*mods, lin)).eval()


def head_to_torch(estimator: Estimator) -> nn.Module | None:
    """An nn.Module mapping embeddings -> PROBABILITIES for heads that torch can express exactly.

    LinearHead and MLPHead; a scikit-learn linear classifier (possibly in a Pipeline after
    ``Normalizer``/``StandardScaler``) whose probabilities are a softmax of its decision function:
    ``LogisticRegression``, and linear models without ``predict_proba`` (``LinearSVC``,
    ``RidgeClassifier``, ...) whose bundle probabilities are *defined* as that softmax (binary:
    ``sigmoid(d)``); :class:`KernelSVC` (the kernel against its support vectors, the softmax of its
    one-vs-rest decision function, in float64); a brute-force, uniform, Euclidean
    ``KNeighborsClassifier`` (distances in float64, top-k, the share of each class). ``None`` for
    anything else (export then uses skl2onnx).
    """
    from sklearn.neighbors import KNeighborsClassifier

    if isinstance(estimator, TorchHead):
        return Probabilities(estimator.to_torch()).eval()
    steps = pipeline_steps(estimator)
    if isinstance(steps[-1], KernelSVC):
        return kernel_svc_to_torch(steps[:-1], steps[-1])
    if isinstance(steps[-1], KNeighborsClassifier):
        return knn_to_torch(steps[:-1], steps[-1])
    return _sk_linear_to_torch(steps[:-1], steps[-1])
