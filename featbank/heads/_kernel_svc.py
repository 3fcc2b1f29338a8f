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

__all__ = ["KernelSVC", "gram", "rbf_from_gram", "scale_gamma", "sq_norms"]

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
    if dev is None:
        return A @ B.T
    import torch

    with torch.no_grad():
        return (torch.as_tensor(A, device=dev) @ torch.as_tensor(B, device=dev).T).cpu().numpy()


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
    var = float(X.var())
    return float(multiplier) * (1.0 / (X.shape[1] * var) if var != 0 else 1.0)


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
    kernel values (libsvm sums them in its own order), so ``predict`` / ``decision_function`` are
    ``SVC``'s. No probability estimates (featbank turns the decision function into probabilities
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


# Bundles name a skops type by `__module__.__qualname__`: keep it at the public path.
KernelSVC.__module__ = "featbank.heads"
