"""Heads as torch modules mapping embeddings to probabilities, where torch expresses them exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ._torch_head import _Preprocess, _Probabilities, _TorchHead

__all__ = ["head_to_torch"]


def _sk_linear_to_torch(steps: list[Any], clf: Any) -> nn.Module | None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import Normalizer, StandardScaler

    if not hasattr(clf, "coef_") or not hasattr(clf, "intercept_"):
        return None
    proba_is_softmax = isinstance(clf, LogisticRegression)
    has_proba = hasattr(clf, "predict_proba")  # False where the property raises (SVC without probability)
    if has_proba and not proba_is_softmax:
        return None  # e.g. SGDClassifier(loss="log_loss"): one-vs-rest probabilities, not a softmax
    mods: list[nn.Module] = []
    for s in steps:
        if isinstance(s, Normalizer) and s.norm == "l2":
            mods.append(_Preprocess(True))
        elif isinstance(s, StandardScaler):
            mean = s.mean_ if s.with_mean else np.zeros(s.n_features_in_)
            scale = s.scale_ if s.with_std else np.ones(s.n_features_in_)
            mods.append(_Preprocess(False, mean, scale))
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
    return _Probabilities(nn.Sequential(*mods, lin)).eval()


def head_to_torch(estimator: Any) -> nn.Module | None:
    """An nn.Module mapping embeddings -> PROBABILITIES for heads that torch can express exactly.

    LinearHead and MLPHead; a scikit-learn linear classifier (possibly in a Pipeline after
    ``Normalizer``/``StandardScaler``) whose probabilities are a softmax of its decision function:
    ``LogisticRegression``, and linear models without ``predict_proba`` (``LinearSVC``,
    ``RidgeClassifier``, ...) whose bundle probabilities are *defined* as that softmax (binary:
    ``sigmoid(d)``). ``None`` for anything else (export then uses skl2onnx).
    """
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, _TorchHead):
        return _Probabilities(estimator.to_torch()).eval()
    if isinstance(estimator, Pipeline):
        steps = [s for _, s in estimator.steps]
        return _sk_linear_to_torch(steps[:-1], steps[-1])
    return _sk_linear_to_torch([], estimator)
