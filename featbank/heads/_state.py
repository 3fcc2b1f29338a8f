"""A fitted head as (safetensors tensors, JSON-able info) and back, for bundles; and as a torch module
mapping embeddings to probabilities, where torch expresses it exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._kernel_svc import KernelSVC, kernel_svc_to_torch
from ._linear_head import LinearHead
from ._mlp_head import MLPHead, build_mlp
from ._neighbors import knn_to_torch
from ._sklearn import has_predict_proba
from ._torch_head import Preprocess, Probabilities, TorchHead

__all__ = ["head_from_state", "head_state", "head_to_torch"]


# --------------------------------------------------------------------------------------------
# Serialisation (safetensors tensors + JSON-able info) and torch conversion
# --------------------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return v


def head_state(est: LinearHead | MLPHead) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, info)`` of a fitted torch head: arrays for safetensors and JSON-able params."""
    check_is_fitted(est)
    params = {k: _jsonable(v) for k, v in est.get_params().items()}
    info = {"params": params, "classes_": [_jsonable(c) for c in est.classes_], "n_features_in": int(est.n_features_in_)}
    tensors = {"mean": np.asarray(est.mean_, np.float32), "scale": np.asarray(est.scale_, np.float32)}
    if isinstance(est, LinearHead):
        tensors["weight"] = np.ascontiguousarray(est._w, dtype=np.float64)
        tensors["bias"] = np.ascontiguousarray(est._b, dtype=np.float64)
        info["n_iter"] = int(est.n_iter_)
    else:
        for k, v in est.net_.state_dict().items():
            tensors[f"net.{k}"] = v.detach().cpu().numpy().copy()
        info["best_epoch"] = int(est.best_epoch_)
    return tensors, info


def head_from_state(htype: str, tensors: dict[str, np.ndarray], info: dict[str, Any]) -> LinearHead | MLPHead:
    """Rebuild a fitted torch head from :func:`head_state` output (``info`` = the manifest's head)."""
    params = dict(info.get("params") or {})
    classes = np.asarray(info["classes_"])
    if htype == "linear":
        est: LinearHead | MLPHead = LinearHead(**params)
        est._w = tensors["weight"].astype(np.float64)
        est._b = tensors["bias"].astype(np.float64)
        est.n_iter_ = int(info.get("n_iter", 0))
    elif htype == "mlp":
        if isinstance(params.get("hidden_sizes"), list):
            params["hidden_sizes"] = tuple(params["hidden_sizes"])
        est = MLPHead(**params)
        net = build_mlp(int(info["n_features_in"]), est._hidden(), len(classes), float(est.dropout))
        net.load_state_dict({k[4:]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("net.")})
        est.net_ = net.eval()
        est.best_epoch_ = int(info.get("best_epoch", 0))
        est.n_epochs_ = est.best_epoch_
        est.best_val_loss_ = None
    else:
        raise ValueError(f"Unknown torch head type {htype!r}; expected 'linear' or 'mlp'.")
    est.classes_ = classes
    est.n_features_in_ = int(info["n_features_in"])
    est.mean_ = tensors["mean"].astype(np.float32)
    est.scale_ = tensors["scale"].astype(np.float32)
    if htype == "linear":
        est._set_coef()
    return est


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


def head_to_torch(estimator: Any) -> nn.Module | None:
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
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, TorchHead):
        return Probabilities(estimator.to_torch()).eval()
    steps = [s for _, s in estimator.steps] if isinstance(estimator, Pipeline) else [estimator]
    if isinstance(steps[-1], KernelSVC):
        return kernel_svc_to_torch(steps[:-1], steps[-1])
    if isinstance(steps[-1], KNeighborsClassifier):
        return knn_to_torch(steps[:-1], steps[-1])
    return _sk_linear_to_torch(steps[:-1], steps[-1])
