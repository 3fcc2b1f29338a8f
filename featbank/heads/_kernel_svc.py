"""KernelSVC: scikit-learn's ``SVC`` (RBF or linear kernel) fitted through a kernel matrix made with BLAS.

libsvm computes every kernel value with its own scalar loop, and a multiclass fit (one-vs-one)
recomputes them for each pair of classes: on 2,624 x 12,560 features that is minutes per fit.
:class:`KernelSVC` computes the Gram matrix once with one matrix product (numpy, or torch on CUDA),
fits ``SVC(kernel="precomputed")`` on it, and keeps the fitted state as the ``SVC`` with the same
kernel would hold it (support vectors, dual coefficients, intercepts), so ``predict`` and
``decision_function`` are scikit-learn's own for that kernel. The same helpers give the
cross-validated sweep of the ``svm-rbf`` / ``svm-linear`` head families their kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.svm import SVC
from sklearn.utils.validation import validate_data

from ..errors import ConfigError

__all__ = ["KernelSVC", "gamma_of", "gram", "kernel_svc_to_torch", "prefix_module", "rbf_from_gram", "scale_gamma", "sq_norms"]

#: The kernels KernelSVC computes itself (libsvm's names).
KERNELS = ("rbf", "linear")


def _torch_device(device: str) -> Any:
    """None for plain numpy (CPU), else the torch device to multiply on."""
    if str(device) == "cpu":
        return None
    from .._device import resolve_device

    dev = resolve_device(device)
    return None if dev.type == "cpu" else dev


def gram(A: np.ndarray, B: np.ndarray, device: str = "cpu") -> np.ndarray:
    """``A @ B.T`` in float64 (numpy's BLAS, or torch on a CUDA device)."""
    A = np.ascontiguousarray(A, dtype=np.float64)
    B = np.ascontiguousarray(B, dtype=np.float64)
    dev = _torch_device(device)
    return A @ B.T if dev is None else torch_gram(A, B, dev)


def torch_gram(A: np.ndarray, B: np.ndarray, dev: Any) -> np.ndarray:
    """``A @ B.T`` in float64 with torch on ``dev``: :func:`gram`'s CUDA path (any torch device, so it is
    tested on CPU against BLAS)."""
    import torch

    with torch.no_grad():
        return (torch.as_tensor(A, dtype=torch.float64, device=dev)
                @ torch.as_tensor(B, dtype=torch.float64, device=dev).T).cpu().numpy()


def sq_norms(A: np.ndarray) -> np.ndarray:
    A = np.asarray(A, dtype=np.float64)
    return np.einsum("ij,ij->i", A, A)


def rbf_from_gram(G: np.ndarray, sq_rows: np.ndarray, sq_cols: np.ndarray, gamma: float) -> np.ndarray:
    """``exp(-gamma * ||a - b||^2)`` from the Gram matrix and the squared norms (distances clamped at 0)."""
    d2 = sq_rows[:, None] + sq_cols[None, :] - 2.0 * G
    np.maximum(d2, 0.0, out=d2)
    d2 *= -float(gamma)
    return np.exp(d2, out=d2)


def scale_gamma(X: np.ndarray, multiplier: float = 1.0) -> float:
    """scikit-learn's ``gamma="scale"`` (``1 / (n_features * X.var())``, 1 when the variance is 0), times ``multiplier``."""
    X = np.asarray(X, dtype=np.float64)
    return gamma_of(float(X.var()), X.shape[1], multiplier)


def gamma_of(var: float, n_features: int, multiplier: float = 1.0) -> float:
    """:func:`scale_gamma` from the variance of every entry of the rows and their number of columns."""
    return float(multiplier) * (1.0 / (n_features * var) if var != 0 else 1.0)


class KernelSVC(SVC):
    """``SVC(kernel="rbf" | "linear")`` whose kernel matrix is computed with one BLAS product.

    Args:
        C: as in ``SVC``.
        kernel: ``"rbf"`` or ``"linear"``.
        gamma_scale: the RBF width is ``gamma_scale / (n_features * X.var())`` on the rows fitted
            (``gamma_scale=1`` is scikit-learn's ``gamma="scale"``); ignored for ``"linear"``.
        tol, cache_size, class_weight, max_iter, break_ties, random_state: as in ``SVC``.
        device: where the Gram matrix is multiplied: ``"cpu"`` (numpy), ``"cuda"`` or ``"auto"``.

    After ``fit``, the estimator holds exactly the state ``SVC(kernel=kernel, C=C, gamma=_gamma)``
    holds after fitting the same rows with the same libsvm solver, up to the rounding of the
    kernel values (libsvm sums them in its own order). ``predict`` / ``decision_function`` are
    ``SVC``'s libsvm code on the kernel against the support vectors, which is made with one BLAS
    product. No probability estimates (featbank turns the decision function into probabilities
    with a softmax, see :func:`featbank.heads.estimator_proba`).
    """

    def __init__(self, C: float = 1.0, *, kernel: str = "rbf", gamma_scale: float = 1.0, tol: float = 1e-3,
                 cache_size: float = 200, class_weight: Any = None, max_iter: int = -1, break_ties: bool = False,
                 random_state: Any = None, device: str = "cpu"):
        super().__init__(C=C, kernel=kernel, gamma="scale", tol=tol, cache_size=cache_size, class_weight=class_weight,
                         max_iter=max_iter, break_ties=break_ties, random_state=random_state)
        self.gamma_scale = gamma_scale
        self.device = device

    def _check_own_params(self) -> None:
        if self.kernel not in KERNELS:
            raise ConfigError(f"The 'kernel' parameter of KernelSVC must be one of {KERNELS}. Got {self.kernel!r} instead.")
        for name in ("C", "gamma_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not (
                    np.isfinite(v) and v > 0):
                raise ConfigError(f"The {name!r} parameter of KernelSVC must be a float > 0. Got {v!r} instead.")

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> KernelSVC:
        """Fit on ``X`` (N, D) and labels ``y``: one Gram matrix, libsvm on it, then the kernel's SVC state."""
        self._check_own_params()
        X, y = validate_data(self, X, y, dtype=np.float64, order="C")
        gamma = scale_gamma(X, self.gamma_scale) if self.kernel == "rbf" else 1.0 / X.shape[1]
        G = gram(X, X, self.device)
        K = rbf_from_gram(G, sq_norms(X), sq_norms(X), gamma) if self.kernel == "rbf" else G
        pre = SVC(C=self.C, kernel="precomputed", tol=self.tol, cache_size=self.cache_size,
                  class_weight=self.class_weight, max_iter=self.max_iter, break_ties=self.break_ties,
                  random_state=self.random_state).fit(K, y, sample_weight=sample_weight)
        self._take_state(pre, X, gamma)
        return self

    def _kernel_twin(self, X: Any) -> tuple[SVC, np.ndarray]:
        """The fitted ``SVC(kernel="precomputed")`` this estimator came from, and the kernel of ``X``
        against the fitted rows (BLAS; only the support vectors' columns are needed and filled)."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64, order="C")
        sv = self.support_vectors_
        G = gram(X, sv, self.device)
        Ksv = rbf_from_gram(G, sq_norms(X), sq_norms(sv), self._gamma) if self.kernel == "rbf" else G
        K = np.zeros((len(X), int(self.shape_fit_[0])))
        K[:, self.support_] = Ksv
        twin = SVC(kernel="precomputed", C=self.C, break_ties=self.break_ties)
        params = twin.get_params()
        for k, v in vars(self).items():
            if k not in params and k not in ("gamma_scale", "device"):
                setattr(twin, k, v)
        twin.support_vectors_ = np.empty((0, 0))
        twin.shape_fit_ = (int(self.shape_fit_[0]), int(self.shape_fit_[0]))
        twin.n_features_in_ = int(self.shape_fit_[0])
        return twin, K

    def decision_function(self, X: Any) -> np.ndarray:
        """``SVC.decision_function``, with the kernel against the support vectors made by one BLAS
        product instead of libsvm's per-pair loop (minutes on thousands of wide rows); libsvm then
        combines it exactly as for ``SVC``."""
        twin, K = self._kernel_twin(X)
        return twin.decision_function(K)

    def predict(self, X: Any) -> np.ndarray:
        """``SVC.predict`` (libsvm's one-vs-one votes), with the kernel made as in :meth:`decision_function`."""
        twin, K = self._kernel_twin(X)
        return twin.predict(K)

    def _take_state(self, pre: SVC, X: np.ndarray, gamma: float) -> None:
        """Hold ``pre``'s fitted state as the SVC of this kernel: the support vectors become rows of X."""
        params = pre.get_params()
        for k, v in vars(pre).items():
            if k not in params:  # the fitted state (support_, dual_coef_, _intercept_, _n_support, ...)
                setattr(self, k, v)
        self.support_vectors_ = np.ascontiguousarray(X[pre.support_])
        self.shape_fit_ = X.shape
        self.n_features_in_ = X.shape[1]
        self._gamma = float(gamma)
        self._sparse = False


# --------------------------------------------------------------------------------------------
# As a torch module (for ONNX export): embeddings -> featbank's probabilities, in float64
# --------------------------------------------------------------------------------------------


def prefix_module(steps: list[Any]) -> Any:
    """A torch module: float32 embeddings -> the pipeline's preprocessing (``StandardScaler``,
    ``Normalizer``, :class:`~featbank.heads.SignedSqrt`) in float64; None for a step it does not know."""
    import torch
    from torch import nn

    from ._sklearn import affine_prefix

    prefix = affine_prefix(steps)
    if prefix is None:
        return None

    class Float64Prefix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i, (_, mean, scale) in enumerate(prefix):
                if mean is not None:
                    self.register_buffer(f"mean{i}", torch.tensor(mean, dtype=torch.float64))
                if scale is not None:
                    inv = 1.0 / np.where(scale == 0, 1.0, scale)
                    self.register_buffer(f"inv_scale{i}", torch.tensor(inv, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.to(torch.float64)
            for i, (kind, _, _) in enumerate(prefix):
                if kind == "l2":  # scikit-learn's Normalizer leaves a zero row as it is
                    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-300)
                    continue
                if kind == "sqrt":
                    x = torch.sign(x) * torch.sqrt(torch.abs(x))
                    continue
                if hasattr(self, f"mean{i}"):
                    x = x - getattr(self, f"mean{i}")
                if hasattr(self, f"inv_scale{i}"):
                    x = x * getattr(self, f"inv_scale{i}")
            return x

    return Float64Prefix()


def _pair_maps(clf: SVC) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W, A_i, A_j): libsvm's one-vs-one decisions are ``K @ W + _intercept_`` (pair p = (i, j), i < j,
    in libsvm's order); A_i / A_j (P, k) mark each pair's first / second class."""
    k = len(clf.classes_)
    start = np.concatenate([[0], np.cumsum(clf._n_support)])
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    W = np.zeros((int(start[-1]), len(pairs)))
    A_i, A_j = np.zeros((len(pairs), k)), np.zeros((len(pairs), k))
    for p, (i, j) in enumerate(pairs):
        W[start[i]:start[i + 1], p] = clf._dual_coef_[j - 1, start[i]:start[i + 1]]
        W[start[j]:start[j + 1], p] = clf._dual_coef_[i, start[j]:start[j + 1]]
        A_i[p, i], A_j[p, j] = 1.0, 1.0
    return W, A_i, A_j


def kernel_svc_to_torch(steps: list[Any], clf: KernelSVC) -> Any:
    """A float64 torch module: embeddings -> :func:`featbank.heads.estimator_proba` of the pipeline
    ``steps + [clf]`` (the softmax of scikit-learn's one-vs-rest decision function: one-vs-one votes
    plus scaled confidences; for two classes ``sigmoid(d)``). None for preprocessing it does not know."""
    import torch
    from torch import nn

    pre = prefix_module(steps)
    if pre is None:
        return None
    W, A_i, A_j = _pair_maps(clf)
    f64 = {"dtype": torch.float64}
    binary, rbf, gamma = len(clf.classes_) == 2, clf.kernel == "rbf", float(clf._gamma)

    class KernelSVCProba(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = pre
            sv = np.asarray(clf.support_vectors_, np.float64)
            self.register_buffer("sv", torch.tensor(sv, **f64))
            self.register_buffer("sv_sq", torch.tensor(sq_norms(sv), **f64))
            self.register_buffer("W", torch.tensor(W, **f64))
            self.register_buffer("b", torch.tensor(np.asarray(clf._intercept_, np.float64), **f64))
            self.register_buffer("A_i", torch.tensor(A_i, **f64))
            self.register_buffer("A_j", torch.tensor(A_j, **f64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pre(x)
            K = x @ self.sv.T
            if rbf:
                d2 = (x * x).sum(1, keepdim=True) + self.sv_sq[None, :] - 2.0 * K
                K = torch.exp(-gamma * d2)
            dec = K @ self.W + self.b  # libsvm's one-vs-one decision values
            if binary:
                z = torch.cat([torch.zeros_like(dec), -dec], dim=1)  # scikit-learn flips the binary sign
            else:
                pos = (dec >= 0).to(torch.float64)  # scikit-learn: a vote for i unless dec < 0
                votes = pos @ self.A_i + (1.0 - pos) @ self.A_j
                conf = dec @ (self.A_i - self.A_j)
                z = votes + conf / (3.0 * (conf.abs() + 1.0))
            return torch.softmax(z, dim=1).to(torch.float32)

    return KernelSVCProba().eval()


# Bundles name a skops type by `__module__.__qualname__`: keep it at the public path.
KernelSVC.__module__ = "featbank.heads"
