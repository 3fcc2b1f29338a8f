"""LinearHead: multinomial logistic regression fitted with preconditioned full-batch L-BFGS."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .._device import resolve_device
from ._features import Features
from ._torch_head import (
    BOOLEAN,
    CLASS_WEIGHT,
    DEVICE,
    Preprocess,
    TorchHead,
    class_weights,
    integer,
    real,
    validate_head_params,
)

__all__ = ["LinearHead"]


#: Standardised copies of in-memory Features, shared by the refits of one C sweep; entries go
#: away with the Features object they belong to.
_PREP_MEMO: weakref.WeakKeyDictionary[Features, tuple] = weakref.WeakKeyDictionary()


#: Precondition L-BFGS when the embedding has at most this many dimensions (eigh of a D x D
#: matrix: ~0.3 s at 1280 here, ~2 s at 2048; beyond that plain L-BFGS).
_PRECONDITION_MAX_DIM = 2048
#: Rows used to estimate the second-moment matrix (the preconditioner needs no exact one).
_PRECONDITION_ROWS = 8192
#: Softmax curvature assumed by the preconditioner (p * (1 - p) at p = 1/2; measured best of 0.02-0.25).
_CURVATURE = 0.25


def _second_moment_eig(Xs: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of the ``w``-weighted ``Xs^T Xs / sum(w)`` over
    at most ``_PRECONDITION_ROWS`` evenly spaced rows, in float64."""
    n = Xs.shape[0]
    if n > _PRECONDITION_ROWS:
        pick = torch.linspace(0, n - 1, _PRECONDITION_ROWS, device=Xs.device).long()
        Xs, w = Xs[pick], w[pick]
    if not float(w.sum()) > 0:
        w = torch.ones_like(w)
    cov = (Xs.T @ (Xs * w[:, None])).to(torch.float64) / float(w.sum())
    e, V = torch.linalg.eigh(cov)
    return e.clamp_min(0.0), V


class _Objective:
    """The weighted cross-entropy data term of one fit, in memory (``Xs``) or streamed chunk by chunk."""

    def __init__(self, head: LinearHead, feats: Features, y_enc: np.ndarray, sw: np.ndarray, dev: torch.device,
                 dtype: torch.dtype):
        self.feats, self.dev, self.dtype, self.l2_normalize = feats, dev, dtype, head.l2_normalize
        self.mean = torch.as_tensor(head.mean_, dtype=dtype, device=dev)
        self.scale = torch.as_tensor(head.scale_, dtype=dtype, device=dev)
        self.yt_all = torch.as_tensor(y_enc, device=dev)
        # scikit-learn's scaling: sum_i w_i CE_i / sum(w) + ||W||^2 / (2 C sum(w)), w including class weights.
        sw_sum = float(sw.sum())
        self.sw_all = torch.as_tensor(sw, dtype=dtype, device=dev) / sw_sum
        self.reg = 1.0 / (2.0 * float(head.C) * sw_sum)
        self.Xs: torch.Tensor | None = None  # the standardised rows, when they sit in memory

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        if self.l2_normalize:
            x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
        return (x - self.mean) / self.scale

    def loss_grad(self, xs: torch.Tensor, yt: torch.Tensor, swt: torch.Tensor, W: torch.Tensor, b: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sum_i w_i/S * CE_i and its gradients (closed form: no autograd graph)."""
        z = torch.addmm(b, xs, W.T)
        lse = torch.logsumexp(z, dim=1)
        ce = lse - z.gather(1, yt[:, None])[:, 0]
        g = torch.exp(z - lse[:, None])
        g[torch.arange(len(yt), device=self.dev), yt] -= 1.0
        g *= swt[:, None]
        return (ce * swt).sum(dtype=torch.float64), g.T @ xs, g.sum(0)

    def data_term(self, W: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.Xs is not None:
            return self.loss_grad(self.Xs, self.yt_all, self.sw_all, W, b)
        loss = torch.zeros((), dtype=torch.float64, device=self.dev)
        gW, gb = torch.zeros_like(W), torch.zeros_like(b)
        for pos, xc in self.feats.chunks():
            p = torch.as_tensor(pos, device=self.dev)
            lc, gWc, gbc = self.loss_grad(self.prep(torch.from_numpy(xc).to(self.dev, self.dtype)), self.yt_all[p],
                                          self.sw_all[p], W, b)
            loss += lc
            gW += gWc
            gb += gbc
        return loss, gW, gb


class LinearHead(TorchHead):
    """Multinomial logistic regression on embeddings, fitted with full-batch L-BFGS (scipy + torch).

    Args:
        C: inverse L2 strength, as in scikit-learn's ``LogisticRegression`` (same objective).
        standardize: standardise each feature with the training mean / std (stored with the head).
        l2_normalize: L2-normalise each embedding first (before standardising).
        class_weight: None, ``"balanced"`` or a dict class -> weight.
        max_iter: L-BFGS iterations at most.
        tol: stop when the largest gradient entry is below this (scikit-learn's default, 1e-4).
        warm_start: start from the previous solution when refitting (used by the C sweep).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Attributes:
        classes_, n_features_in_, coef_ (n_classes, n_features), intercept_ (n_classes,) acting on
        the (optionally L2-normalised) raw features, mean_, scale_, n_iter_.

    Example:
        >>> head = LinearHead(C=0.1).fit(X_train, y_train)
        >>> head.predict_proba(X_test)
    """

    parameter_constraints = {
        "C": real(0, None, closed="neither"), "standardize": BOOLEAN, "l2_normalize": BOOLEAN,
        "class_weight": CLASS_WEIGHT, "max_iter": integer(1), "tol": real(0, None), "warm_start": BOOLEAN,
        "device": DEVICE,
    }

    def __init__(self, C: float = 1.0, *, standardize: bool = True, l2_normalize: bool = False,
                 class_weight: Any = None, max_iter: int = 500, tol: float = 1e-4, warm_start: bool = False,
                 device: str = "cpu"):
        self.C = C
        self.standardize = standardize
        self.l2_normalize = l2_normalize
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start
        self.device = device

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> LinearHead:
        validate_head_params(self)
        prev = (getattr(self, "_w", None), getattr(self, "_b", None), getattr(self, "classes_", None))
        feats, y_enc, sw, Xs_memo = self._fit_inputs(X, y, sample_weight)
        n, d, k = feats.n_samples, feats.embed_dim, len(self.classes_)
        dev = torch.empty(0, device=resolve_device(self.device)).device  # "cuda" -> "cuda:0", comparable
        # Small in-memory problems run in float64: cheap, and exact enough for tight comparisons.
        dtype = torch.float64 if (not feats.streaming and n * d <= 2_000_000 and dev.type == "cpu") else torch.float32
        W0 = np.zeros((k, d), np.float64)
        b0 = np.zeros(k, np.float64)
        if self.warm_start and prev[0] is not None and prev[0].shape == (k, d) and np.array_equal(prev[2], self.classes_):
            W0, b0 = np.asarray(prev[0], np.float64), np.asarray(prev[1], np.float64)
        obj = _Objective(self, feats, y_enc, sw, dev, dtype)
        U = U64 = None
        if not feats.streaming:
            eig = self._in_memory(obj, X, sample_weight, y_enc, sw, Xs_memo)
            self._eig = None if eig is None else (eig[0].cpu(), eig[1].cpu())
            if eig is not None:
                # Optimise M = W U^-T: the same objective, with a Hessian close to the identity.
                e, V = eig
                sdiag = 1.0 / torch.sqrt((_CURVATURE * e + 2.0 * obj.reg).clamp_min(1e-8))  # C = inf: no reg
                U64 = V * sdiag
                U = U64.to(dtype)
                W0 = (torch.as_tensor(W0, dtype=torch.float64, device=dev) @ (V / sdiag)).cpu().numpy()
        # The intercepts' curvature is ~p(1-p) at p = 1/k: scaled so that they, like M, see a Hessian
        # near the identity (measured: 2.5x fewer iterations on the 50,000 x 1280 benchmark's refit).
        bscale = 1.0 if U is None else 1.0 / float(np.sqrt((1.0 / k) * (1.0 - 1.0 / k)))
        res = self._minimize(obj, U, bscale, np.concatenate([W0.reshape(-1), b0 / bscale]), k, d)
        self.n_iter_ = int(res.nit)
        P = torch.as_tensor(res.x[: k * d].reshape(k, d), dtype=torch.float64, device=dev)
        W = P if U is None else P @ U64.T
        self._w = W.cpu().numpy()
        self._b = np.asarray(res.x[k * d:], np.float64) * bscale
        self._set_coef()
        return self

    def _fit_inputs(self, X: Any, y: Any, sample_weight: Any) -> tuple[Features, np.ndarray, np.ndarray, Any]:
        """(features, encoded labels, sample weights, memoised standardised copy or None)."""
        memo_key = (self.standardize, self.l2_normalize, str(self.device))
        memo = _PREP_MEMO.get(X) if isinstance(X, Features) and sample_weight is None else None
        if memo is not None and memo[0] == memo_key:
            # The C sweep refits on the same rows: reuse their statistics and standardised copy.
            _, self.classes_, y_enc, sw, self.mean_, self.scale_, self.n_features_in_, Xs_memo = memo
            if self.class_weight is not None:
                sw = sw * class_weights(self, y_enc, y)
            return X, y_enc, sw, Xs_memo
        feats, y_enc, sw = self._prepare_fit(X, y, sample_weight)
        return feats, y_enc, sw, None

    def _in_memory(self, obj: _Objective, X: Any, sample_weight: Any, y_enc: np.ndarray, sw: np.ndarray,
                   Xs_memo: Any) -> Any:
        """Standardise the rows once (or reuse the sweep's copy); returns the preconditioner's eigh or None."""
        d = obj.feats.embed_dim
        if Xs_memo is not None and Xs_memo[0].dtype == obj.dtype and Xs_memo[0].device == obj.dev:
            obj.Xs, eig = Xs_memo
            return eig
        obj.Xs = obj.prep(torch.as_tensor(obj.feats.X, device=obj.dev).to(obj.dtype))
        hint = getattr(self, "_eig", None) if self.warm_start else None
        if d > _PRECONDITION_MAX_DIM:
            eig = None
        elif hint is not None and hint[1].shape == (d, d):
            eig = (hint[0].to(obj.dev), hint[1].to(obj.dev))  # a refit on similar rows (sweep's train -> train+val)
        else:
            eig = _second_moment_eig(obj.Xs, obj.sw_all)
        if isinstance(X, Features) and sample_weight is None:
            base_sw = sw if self.class_weight is None else np.ones(obj.feats.n_samples, np.float64)
            _PREP_MEMO[X] = ((self.standardize, self.l2_normalize, str(self.device)), self.classes_, y_enc, base_sw,
                             self.mean_, self.scale_, self.n_features_in_, (obj.Xs, eig))
        return eig

    def _minimize(self, obj: _Objective, U: Any, bscale: float, x0: np.ndarray, k: int, d: int) -> Any:
        """scipy's L-BFGS-B on the (preconditioned) objective, stopped by scikit-learn's criterion."""
        last: dict[str, Any] = {}

        def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
            t = torch.as_tensor(x, device=obj.dev).to(obj.dtype)
            P, b = t[: k * d].view(k, d), t[k * d:] * bscale
            W = P if U is None else P @ U.T
            loss, gW, gb = obj.data_term(W, b)
            loss = loss + obj.reg * (W.to(torch.float64) ** 2).sum()
            gW = gW + (2.0 * obj.reg) * W
            gP = gW if U is None else gW @ U
            last["x"], last["gmax"] = x.copy(), max(float(gW.abs().max()), float(gb.abs().max()))
            return float(loss), torch.cat([gP.reshape(-1), gb * bscale]).to(torch.float64).cpu().numpy()

        def converged(intermediate_result: Any) -> None:
            # scikit-learn's criterion: the largest entry of the gradient in W (not in M) below tol.
            if last["gmax"] <= self.tol and np.array_equal(last["x"], intermediate_result.x):
                raise StopIteration

        from scipy.optimize import minimize
        from threadpoolctl import threadpool_limits

        # L-BFGS-B's own BLAS calls are tiny; idle OpenBLAS threads would spin against torch's.
        with threadpool_limits(limits={"libscipy_openblas": 1}):
            return minimize(fun, x0, jac=True, method="L-BFGS-B", callback=converged,
                            options={"maxiter": int(self.max_iter), "maxls": 50, "maxcor": 20,
                                     "gtol": float(self.tol) if U is None else 0.0,
                                     "ftol": 64 * np.finfo(float).eps if self.tol >= 1e-6 else 0.0})

    def solution(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the fitted weights and bias on the preprocessed features (what a warm start resumes from)."""
        return self._w.copy(), self._b.copy()

    def set_solution(self, w: np.ndarray, b: np.ndarray) -> LinearHead:
        """Take ``w``, ``b`` (from :meth:`solution` of a fit on the same rows) as the fitted solution.

        The next fit with ``warm_start=True`` starts from it; ``coef_`` and ``intercept_`` follow it.
        """
        self._w, self._b = np.array(w, copy=True), np.array(b, copy=True)
        self._set_coef()
        return self

    def _set_coef(self) -> None:
        self.coef_ = (self._w / self.scale_.astype(np.float64)).astype(np.float32)
        self.intercept_ = (self._b - self.coef_.astype(np.float64) @ self.mean_.astype(np.float64)).astype(np.float32)

    def _logits(self, X: np.ndarray) -> np.ndarray:
        Xs = self._preprocess_np(X).astype(np.float64)
        return Xs @ self._w.T + self._b

    @classmethod
    def from_coef(cls, coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray, l2_normalize: bool = False) -> LinearHead:
        """A fitted head from raw weights (logits = x @ coef.T + intercept), e.g. a fine-tuned fc."""
        head = cls(standardize=False, l2_normalize=l2_normalize)
        head.classes_ = np.asarray(classes)
        head.n_features_in_ = int(coef.shape[1])
        head.mean_ = np.zeros(coef.shape[1], np.float32)
        head.scale_ = np.ones(coef.shape[1], np.float32)
        head._w = np.asarray(coef, np.float64)
        head._b = np.asarray(intercept, np.float64)
        head.n_iter_ = 0
        head._set_coef()
        return head

    def to_torch(self) -> nn.Module:
        check_is_fitted(self)
        lin = nn.Linear(self.n_features_in_, len(self.classes_))
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(self.coef_))
            lin.bias.copy_(torch.as_tensor(self.intercept_))
        return nn.Sequential(Preprocess(self.l2_normalize), lin).eval()


# Pickles, skops files and bundle manifests ("trusted_types") record a class by
# `__module__.__qualname__`; keep the path it had when featbank.heads was one module, so files
# written before and after the split name the same type (featbank.heads re-exports it).
LinearHead.__module__ = "featbank.heads"
