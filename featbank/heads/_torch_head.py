"""Shared machinery of the torch heads: input checks and prediction, preprocessing and softmax modules,
and the plain minibatch loops (``train_one_epoch``, ``evaluate_logits``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from ..errors import ConfigError
from ._features import Features, feature_stats

__all__ = ["Constraint", "Preprocess", "Probabilities", "TorchHead", "validate_head_params", "TrainingRows",
           "train_one_epoch", "evaluate_logits"]


# --------------------------------------------------------------------------------------------
# Parameter validation (scikit-learn's rule: __init__ stores, fit validates; its wording)
# --------------------------------------------------------------------------------------------


class Constraint:
    """What a parameter must be: a description for the message and a test."""

    def __init__(self, description: str, test: Callable[[Any], bool]):
        self.description = description
        self.test = test


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def real(low: float | None = None, high: float | None = None, *, closed: str = "both") -> Constraint:
    """A real number in an interval; ``closed`` is ``both``, ``left``, ``right`` or ``neither``."""
    lo_in, hi_in = closed in ("both", "left"), closed in ("both", "right")

    def test(v: Any) -> bool:
        if not _is_real(v) or not np.isfinite(float(v)):
            return False
        if low is not None and (v < low or (v == low and not lo_in)):
            return False
        return high is None or not (v > high or (v == high and not hi_in))

    if low is not None and high is not None:
        text = f"a float in {'[' if lo_in else '('}{low:g}, {high:g}{']' if hi_in else ')'}"
    elif low is not None:
        text = f"a float {'>=' if lo_in else '>'} {low:g}"
    else:
        text = "a float"
    return Constraint(text, test)


def integer(low: int) -> Constraint:
    return Constraint(f"an int >= {low}", lambda v: _is_int(v) and v >= low)


BOOLEAN = Constraint("a bool", lambda v: isinstance(v, (bool, np.bool_)))
CLASS_WEIGHT = Constraint("None, 'balanced' or a dict class -> weight >= 0",
                          lambda v: v is None or (isinstance(v, str) and v == "balanced") or (
                              isinstance(v, dict) and all(_is_real(w) and w >= 0 for w in v.values())))
def _is_device(v: Any) -> bool:
    if isinstance(v, torch.device):
        return True
    return isinstance(v, str) and (v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()))


DEVICE = Constraint("'auto', 'cpu', 'cuda' or 'cuda:N'", _is_device)


def validate_head_params(est: TorchHead) -> None:
    """Check every parameter of a torch head against its ``parameter_constraints``.

    Raises:
        ConfigError (a ValueError, as scikit-learn raises for invalid parameters), worded like
        scikit-learn: "The 'C' parameter of LinearHead must be a float > 0. Got -1 instead."
    """
    for name, constraint in type(est).parameter_constraints.items():
        value = getattr(est, name)
        if not constraint.test(value):
            raise ConfigError(
                f"The {name!r} parameter of {type(est).__name__} must be {constraint.description}. Got {value!r} instead."
            )


class Preprocess(nn.Module):
    """Optional L2 normalisation, then (x - mean) / scale."""

    def __init__(self, l2_normalize: bool, mean: np.ndarray | None = None, scale: np.ndarray | None = None):
        super().__init__()
        self.l2_normalize = bool(l2_normalize)
        self.standardize = mean is not None
        if mean is not None:
            self.register_buffer("mean", torch.as_tensor(np.asarray(mean, np.float32)))
            self.register_buffer("scale", torch.as_tensor(np.asarray(scale, np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.l2_normalize:
            x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
        if self.standardize:
            x = (x - self.mean) / self.scale
        return x


class Probabilities(nn.Module):
    def __init__(self, logits: nn.Module):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


def _check_sample_weight(sample_weight: Any, n_samples: int) -> np.ndarray:
    """A float64 copy of ``sample_weight`` (a scalar applies to every row), finite and >= 0."""
    sw = np.array(sample_weight, dtype=np.float64)  # a copy: the caller's array is never changed
    if sw.ndim == 0:
        sw = np.full(n_samples, float(sw))
    if sw.shape != (n_samples,):
        raise ValueError(f"sample_weight.shape == {sw.shape}, expected ({n_samples},)!")
    if not np.all(np.isfinite(sw)):
        raise ValueError("Sample weights must be finite (no NaN or inf).")
    if (sw < 0).any():
        raise ValueError("Negative values in data passed to `sample_weight`: sample weights must be >= 0.")
    return sw


def class_weights(est: TorchHead, y_enc: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row weights of ``est.class_weight``; a dict naming classes not in ``y`` is a parameter error."""
    balanced = isinstance(est.class_weight, str) and est.class_weight == "balanced"
    try:
        return compute_sample_weight(est.class_weight, y_enc if balanced else y)
    except ValueError as e:
        raise ConfigError(
            f"The 'class_weight' parameter of {type(est).__name__} must name classes of the labels "
            f"({str(e).rstrip('.')}). Got {est.class_weight!r} instead."
        ) from None


def _l2n(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class TorchHead(ClassifierMixin, BaseEstimator):
    """Shared input handling of the torch heads."""

    #: name -> :class:`Constraint`, checked at the start of ``fit`` by :func:`validate_head_params`.
    parameter_constraints: dict[str, Constraint] = {}

    def _prepare_fit(self, X: Any, y: Any, sample_weight: Any) -> tuple[Features, np.ndarray, np.ndarray]:
        if isinstance(X, Features):
            feats = X
            y = np.asarray(y)
            if len(y) != feats.n_samples:
                raise ValueError(f"X has {feats.n_samples} rows but y has {len(y)} labels.")
            self.n_features_in_ = feats.embed_dim
        else:
            X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], y_numeric=False)
            feats = Features(X)
        check_classification_targets(y)
        self.classes_, y_enc = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes; got 1 class: {self.classes_[0]!r}."
            )
        if sample_weight is None:
            sw = np.ones(len(y_enc), np.float64)
        else:
            sw = _check_sample_weight(sample_weight, feats.n_samples)
            if not sw.sum() > 0:
                raise ValueError("Sample weights must not all be zero.")
            if len(np.unique(y_enc[sw > 0])) < 2:
                raise ValueError(
                    f"{type(self).__name__} needs samples of at least 2 classes with a positive sample weight."
                )
        if self.standardize:
            # Weighted by the caller's sample weights (not class weights): a weight of 2 = a repeated row.
            self.mean_, self.scale_ = feature_stats(feats, self.l2_normalize, None if sample_weight is None else sw)
        else:
            self.mean_ = np.zeros(feats.embed_dim, np.float32)
            self.scale_ = np.ones(feats.embed_dim, np.float32)
        if self.class_weight is not None:
            sw = sw * class_weights(self, y_enc, y)
        return feats, y_enc.astype(np.int64), sw

    def _preprocess_np(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if self.l2_normalize:
            X = _l2n(X)
        return (X - self.mean_) / self.scale_

    def _check_X(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=[np.float32, np.float64])

    def predict_proba(self, X: Any) -> np.ndarray:
        logits = self._logits(self._check_X(X)).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        logits = self._logits(self._check_X(X)).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits; for two classes the logit difference (class 1 - class 0), like scikit-learn."""
        logits = self._logits(self._check_X(X))
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict(self, X: Any) -> np.ndarray:
        logits = self._logits(self._check_X(X))
        return self.classes_[np.argmax(logits, axis=1)]

    def to_torch(self) -> nn.Module:
        """A float32 module mapping embeddings to logits; its softmax equals :meth:`predict_proba`."""
        raise NotImplementedError  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Minibatch loops (torchvision's reference-script shape: one epoch, one evaluation pass)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingRows:
    """The rows an epoch trains on: their features, labels encoded as ``0..k-1``, and per-row weights (or ``None``)."""

    features: Features
    y: np.ndarray
    sample_weight: np.ndarray | None = None


def train_one_epoch(
    model: nn.Module,
    data: TrainingRows,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    device: torch.device,
    generator: np.random.Generator,
    transform: Any = None,
) -> float:
    """One pass over ``data`` in shuffled minibatches; returns the mean training loss."""
    features, y, sample_weight = data.features, data.y, data.sample_weight
    model.train()
    total, count = 0.0, 0
    order = generator.permutation(features.n_chunks)
    for pos, xc in features.chunks(order):
        perm = generator.permutation(len(pos))
        xt = torch.from_numpy(np.ascontiguousarray(xc[perm])).to(device)
        if transform is not None:
            xt = transform(xt)
        yt = torch.from_numpy(y[pos[perm]]).to(device)
        wt = None if sample_weight is None else torch.from_numpy(sample_weight[pos[perm]]).to(device)
        for s in range(0, len(pos), batch_size):
            xb, yb = xt[s : s + batch_size], yt[s : s + batch_size]
            loss_vec = nn.functional.cross_entropy(model(xb), yb, reduction="none")
            if wt is not None:
                wb = wt[s : s + batch_size]
                loss = (loss_vec * wb).sum() / wb.sum().clamp_min(1e-12)
            else:
                loss = loss_vec.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(xb)
            count += len(xb)
    return total / max(1, count)


@torch.no_grad()
def evaluate_logits(model: nn.Module, features: Features, *, device: torch.device, transform: Any = None,
                    batch_size: int = 8192) -> np.ndarray:
    """Logits of ``model`` for every row of ``features`` (eval mode), as float32 numpy."""
    model.eval()
    outs = []
    for _, xc in features.chunks():
        for s in range(0, len(xc), batch_size):
            xt = torch.from_numpy(np.ascontiguousarray(xc[s : s + batch_size])).to(device)
            if transform is not None:
                xt = transform(xt)
            outs.append(model(xt).float().cpu().numpy())
    if not outs:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(outs, axis=0)
