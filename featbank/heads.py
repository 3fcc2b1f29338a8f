"""Heads on embeddings: torch linear / MLP heads as scikit-learn estimators, sklearn heads by name.

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

Both accept an (N, D) array, or a :class:`featbank.train.Features` that streams rows of an HDF5
cache in chunks (the linear head then accumulates the exact full-batch gradient chunk by chunk,
so a streamed fit equals the in-memory one up to float rounding).
"""

from __future__ import annotations

import weakref

import ast
import difflib
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data
from torch import nn

from .errors import ConfigError
from .train import Features, evaluate_logits, feature_stats, resolve_device, train_one_epoch

__all__ = [
    "LinearHead",
    "MLPHead",
    "head_to_torch",
    "head_state",
    "head_from_state",
    "make_sklearn_head",
    "sklearn_classifiers",
    "parse_param",
]


class _Preprocess(nn.Module):
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


class _Probabilities(nn.Module):
    def __init__(self, logits: nn.Module):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


def _l2n(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


#: Standardised copies of in-memory Features, shared by the refits of one C sweep; entries go
#: away with the Features object they belong to.
_PREP_MEMO: "weakref.WeakKeyDictionary[Features, tuple]" = weakref.WeakKeyDictionary()


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


class _TorchHead(ClassifierMixin, BaseEstimator):
    """Shared input handling of the torch heads."""

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
            sw = _check_sample_weight(sample_weight, np.empty((feats.n_samples, 0)), dtype=np.float64,
                                      ensure_non_negative=True)
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
            sw = sw * compute_sample_weight(self.class_weight, y_enc if self.class_weight == "balanced" else y)
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


class LinearHead(_TorchHead):
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

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "LinearHead":
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            raise ValueError(f"The 'C' parameter of LinearHead must be a float > 0. Got {self.C!r} instead.")
        prev = (getattr(self, "_w", None), getattr(self, "_b", None), getattr(self, "classes_", None))
        memo_key = (self.standardize, self.l2_normalize, str(self.device))
        memo = _PREP_MEMO.get(X) if isinstance(X, Features) and sample_weight is None else None
        if memo is not None and memo[0] == memo_key:
            # The C sweep refits on the same rows: reuse their statistics and standardised copy.
            _, self.classes_, y_enc, sw, self.mean_, self.scale_, self.n_features_in_, Xs_memo = memo
            feats = X
            if self.class_weight is not None:
                sw = sw * compute_sample_weight(self.class_weight, y_enc if self.class_weight == "balanced" else y)
        else:
            feats, y_enc, sw = self._prepare_fit(X, y, sample_weight)
            Xs_memo = None
        n, d, k = feats.n_samples, feats.embed_dim, len(self.classes_)
        dev = torch.empty(0, device=resolve_device(self.device)).device  # "cuda" -> "cuda:0", comparable
        # Small in-memory problems run in float64: cheap, and exact enough for tight comparisons.
        dtype = torch.float64 if (not feats.streaming and n * d <= 2_000_000 and dev.type == "cpu") else torch.float32
        W0 = np.zeros((k, d), np.float64)
        b0 = np.zeros(k, np.float64)
        if self.warm_start and prev[0] is not None and prev[0].shape == (k, d) and np.array_equal(prev[2], self.classes_):
            W0, b0 = np.asarray(prev[0], np.float64), np.asarray(prev[1], np.float64)
        mean = torch.as_tensor(self.mean_, dtype=dtype, device=dev)
        scale = torch.as_tensor(self.scale_, dtype=dtype, device=dev)
        yt_all = torch.as_tensor(y_enc, device=dev)
        # scikit-learn's scaling: sum_i w_i CE_i / sum(w) + ||W||^2 / (2 C sum(w)), w including class weights.
        sw_sum = float(sw.sum())
        sw_all = torch.as_tensor(sw, dtype=dtype, device=dev) / sw_sum
        reg = 1.0 / (2.0 * float(self.C) * sw_sum)

        def prep(x: torch.Tensor) -> torch.Tensor:
            if self.l2_normalize:
                x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
            return (x - mean) / scale

        def loss_grad(xs: torch.Tensor, yt: torch.Tensor, swt: torch.Tensor, W: torch.Tensor, b: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """sum_i w_i/S * CE_i and its gradients (closed form: no autograd graph)."""
            z = torch.addmm(b, xs, W.T)
            lse = torch.logsumexp(z, dim=1)
            ce = lse - z.gather(1, yt[:, None])[:, 0]
            g = torch.exp(z - lse[:, None])
            g[torch.arange(len(yt), device=dev), yt] -= 1.0
            g *= swt[:, None]
            return (ce * swt).sum(dtype=torch.float64), g.T @ xs, g.sum(0)

        U = None
        if not feats.streaming:
            if Xs_memo is not None and Xs_memo[0].dtype == dtype and Xs_memo[0].device == dev:
                Xs, eig = Xs_memo
            else:
                Xs = prep(torch.as_tensor(feats.X, device=dev).to(dtype))
                hint = getattr(self, "_eig", None) if self.warm_start else None
                if d > _PRECONDITION_MAX_DIM:
                    eig = None
                elif hint is not None and hint[1].shape == (d, d):
                    eig = (hint[0].to(dev), hint[1].to(dev))  # a refit on similar rows (sweep's train -> train+val)
                else:
                    eig = _second_moment_eig(Xs, sw_all)
                if isinstance(X, Features) and sample_weight is None:
                    base_sw = sw if self.class_weight is None else np.ones(n, np.float64)
                    _PREP_MEMO[X] = (memo_key, self.classes_, y_enc, base_sw, self.mean_, self.scale_,
                                     self.n_features_in_, (Xs, eig))
            self._eig = None if eig is None else (eig[0].cpu(), eig[1].cpu())
            if eig is not None:
                # Optimise M = W U^-T: the same objective, with a Hessian close to the identity.
                e, V = eig
                sdiag = 1.0 / torch.sqrt((_CURVATURE * e + 2.0 * reg).clamp_min(1e-8))  # C = inf: no reg
                U64 = V * sdiag
                U = U64.to(dtype)
                W0 = (torch.as_tensor(W0, dtype=torch.float64, device=dev) @ (V / sdiag)).cpu().numpy()

            def data_term(W: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                return loss_grad(Xs, yt_all, sw_all, W, b)
        else:

            def data_term(W: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                loss = torch.zeros((), dtype=torch.float64, device=dev)
                gW, gb = torch.zeros_like(W), torch.zeros_like(b)
                for pos, xc in feats.chunks():
                    p = torch.as_tensor(pos, device=dev)
                    lc, gWc, gbc = loss_grad(prep(torch.from_numpy(xc).to(dev, dtype)), yt_all[p], sw_all[p], W, b)
                    loss += lc
                    gW += gWc
                    gb += gbc
                return loss, gW, gb

        # The intercepts' curvature is ~p(1-p) at p = 1/k: scaled so that they, like M, see a Hessian
        # near the identity (measured: 2.5x fewer iterations on the 50,000 x 1280 benchmark's refit).
        bscale = 1.0 if U is None else 1.0 / float(np.sqrt((1.0 / k) * (1.0 - 1.0 / k)))
        last: dict[str, Any] = {}

        def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
            t = torch.as_tensor(x, device=dev).to(dtype)
            P, b = t[: k * d].view(k, d), t[k * d:] * bscale
            W = P if U is None else P @ U.T
            loss, gW, gb = data_term(W, b)
            loss = loss + reg * (W.to(torch.float64) ** 2).sum()
            gW = gW + (2.0 * reg) * W
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
            res = minimize(fun, np.concatenate([W0.reshape(-1), b0 / bscale]), jac=True, method="L-BFGS-B", callback=converged,
                           options={"maxiter": int(self.max_iter), "maxls": 50, "maxcor": 20,
                                    "gtol": float(self.tol) if U is None else 0.0,
                                    "ftol": 64 * np.finfo(float).eps if self.tol >= 1e-6 else 0.0})
        self.n_iter_ = int(res.nit)
        P = torch.as_tensor(res.x[: k * d].reshape(k, d), dtype=torch.float64, device=dev)
        W = P if U is None else P @ U64.T
        self._w = W.cpu().numpy()
        self._b = np.asarray(res.x[k * d:], np.float64) * bscale
        self._set_coef()
        return self

    def _set_coef(self) -> None:
        self.coef_ = (self._w / self.scale_.astype(np.float64)).astype(np.float32)
        self.intercept_ = (self._b - self.coef_.astype(np.float64) @ self.mean_.astype(np.float64)).astype(np.float32)

    def _logits(self, X: np.ndarray) -> np.ndarray:
        Xs = self._preprocess_np(X).astype(np.float64)
        return Xs @ self._w.T + self._b

    @classmethod
    def from_coef(cls, coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray, l2_normalize: bool = False) -> "LinearHead":
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
        return nn.Sequential(_Preprocess(self.l2_normalize), lin).eval()


def _mlp(d: int, hidden: tuple[int, ...], k: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)]
        d = h
    layers.append(nn.Linear(d, k))
    return nn.Sequential(*layers)


class MLPHead(_TorchHead):
    """A small MLP on embeddings: AdamW, minibatches, early stopping on a validation set.

    Args:
        hidden_sizes: widths of the hidden layers, e.g. ``(512,)`` or ``(512, 256)``.
        dropout: dropout after each hidden layer.
        lr, weight_decay: AdamW settings.
        batch_size: minibatch size.
        max_epochs: epochs at most.
        patience: stop after this many epochs without a lower validation loss.
        early_stopping: hold out ``validation_fraction`` of the training data for early stopping
            when no ``eval_set`` is passed to :meth:`fit` (an ``eval_set`` always enables it).
        validation_fraction: see ``early_stopping``.
        standardize, l2_normalize, class_weight, device: as in :class:`LinearHead`.
        random_state: seeds initialisation, shuffling and dropout.

    Attributes:
        classes_, n_features_in_, mean_, scale_, net_ (the trained nn.Module, CPU, eval mode),
        best_epoch_ (epochs of the kept weights), n_epochs_ (epochs run), best_val_loss_.
    """

    def __init__(self, hidden_sizes: Any = (512,), *, dropout: float = 0.2, lr: float = 1e-3,
                 weight_decay: float = 1e-4, batch_size: int = 256, max_epochs: int = 100, patience: int = 10,
                 early_stopping: bool = False, validation_fraction: float = 0.1, standardize: bool = True,
                 l2_normalize: bool = False, class_weight: Any = None, device: str = "cpu",
                 random_state: Any = None):
        self.hidden_sizes = hidden_sizes
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.standardize = standardize
        self.l2_normalize = l2_normalize
        self.class_weight = class_weight
        self.device = device
        self.random_state = random_state

    def _hidden(self) -> tuple[int, ...]:
        h = self.hidden_sizes
        h = (h,) if isinstance(h, (int, np.integer)) else tuple(h)
        if not all(isinstance(v, (int, np.integer)) and v > 0 for v in h):
            raise ValueError(
                f"The 'hidden_sizes' parameter of MLPHead must be a tuple of positive ints. Got {self.hidden_sizes!r} instead."
            )
        return tuple(int(v) for v in h)

    def fit(self, X: Any, y: Any, sample_weight: Any = None, eval_set: tuple[Any, Any] | None = None) -> "MLPHead":
        """Train; ``eval_set=(X_val, y_val)`` turns on early stopping on that set."""
        hidden = self._hidden()
        feats, y_enc, sw = self._prepare_fit(X, y, sample_weight)
        rs = check_random_state(self.random_state)
        seed = int(rs.randint(0, 2**31 - 1))
        gen = np.random.default_rng(seed)
        val_feats, yv = None, None
        if eval_set is not None:
            Xv, yv_raw = eval_set
            val_feats = Xv if isinstance(Xv, Features) else Features(np.asarray(Xv, np.float32))
            yv_raw = np.asarray(yv_raw)
            unknown = np.setdiff1d(np.unique(yv_raw), self.classes_)
            if unknown.size:
                raise ValueError(f"eval_set has labels not seen in training: {unknown.tolist()}.")
            yv = np.searchsorted(self.classes_, yv_raw).astype(np.int64)
        elif self.early_stopping and feats.n_samples >= 10:
            from sklearn.model_selection import train_test_split

            pos = np.arange(feats.n_samples)
            strat = y_enc if np.bincount(y_enc).min() >= 2 else None
            tr, va = train_test_split(pos, test_size=self.validation_fraction, random_state=seed, stratify=strat)
            val_feats, yv = feats.subset(np.sort(va)), y_enc[np.sort(va)]
            feats, y_enc, sw = feats.subset(np.sort(tr)), y_enc[np.sort(tr)], sw[np.sort(tr)]

        dev = resolve_device(self.device)
        k, d = len(self.classes_), feats.embed_dim
        pre = _Preprocess(self.l2_normalize, self.mean_, self.scale_).to(dev)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            net = _mlp(d, hidden, k, float(self.dropout)).to(dev)
            opt = torch.optim.AdamW(net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
            best_state, best_loss, best_epoch, bad = None, np.inf, 0, 0
            sw32 = sw.astype(np.float32)
            self.n_epochs_ = 0
            for epoch in range(1, int(self.max_epochs) + 1):
                train_one_epoch(net, feats, y_enc, sw32, opt, batch_size=int(self.batch_size), device=dev,
                                generator=gen, transform=pre)
                self.n_epochs_ = epoch
                if val_feats is None:
                    continue
                logits = torch.as_tensor(evaluate_logits(net, val_feats, device=dev, transform=pre))
                vloss = float(nn.functional.cross_entropy(logits, torch.as_tensor(yv)))
                if vloss < best_loss - 1e-6:
                    best_loss, best_epoch, bad = vloss, epoch, 0
                    best_state = {kk: v.detach().clone() for kk, v in net.state_dict().items()}
                else:
                    bad += 1
                    if bad >= int(self.patience):
                        break
        if best_state is not None:
            net.load_state_dict(best_state)
        self.best_epoch_ = best_epoch if val_feats is not None else self.n_epochs_
        self.best_val_loss_ = float(best_loss) if val_feats is not None else None
        self.net_ = net.cpu().eval()
        return self

    def _logits(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(self._preprocess_np(X), dtype=torch.float32)
            return self.net_(x).double().numpy()

    def to_torch(self) -> nn.Module:
        check_is_fitted(self)
        import copy

        return nn.Sequential(_Preprocess(self.l2_normalize, self.mean_, self.scale_), copy.deepcopy(self.net_)).eval()


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
        net = _mlp(int(info["n_features_in"]), est._hidden(), len(classes), float(est.dropout))
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
    try:
        getattr(clf, "predict_proba")
        has_proba = True
    except AttributeError:
        has_proba = False
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


# --------------------------------------------------------------------------------------------
# scikit-learn heads by name
# --------------------------------------------------------------------------------------------


def sklearn_classifiers() -> dict[str, type]:
    """Every scikit-learn classifier class, by name."""
    import warnings

    from sklearn.utils import all_estimators

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(all_estimators(type_filter="classifier"))


def parse_param(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``; values are Python literals, else plain strings."""
    if "=" not in text:
        raise ConfigError(f"--param must look like key=value (e.g. --param C=0.5); got {text!r}.")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key.isidentifier():
        raise ConfigError(f"--param key {key!r} is not a valid parameter name (from {text!r}).")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = {"none": None, "true": True, "false": False}.get(raw.lower(), raw)
    return key, value


def make_sklearn_head(name: str, params: dict[str, Any], *, standardize: bool = True, l2_normalize: bool = False,
                      random_state: int | None = 0) -> Any:
    """A scikit-learn ``Pipeline`` ([Normalizer] [StandardScaler] classifier) for a classifier name.

    Raises:
        ConfigError: unknown classifier (with close matches) or parameter (with the valid ones).
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    registry = sklearn_classifiers()
    if name not in registry:
        lower = {n.lower(): n for n in registry}
        if name.lower() in lower:
            name = lower[name.lower()]
        else:
            close = [lower[c] for c in difflib.get_close_matches(name.lower(), list(lower), n=4, cutoff=0.5)]
            close += [n for n in registry if name.lower() in n.lower() and n not in close][: 4 - len(close)]
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"Unknown head {name!r}.{hint} Use 'linear', 'mlp' or a scikit-learn classifier class name "
                "(LogisticRegression, SVC, KNeighborsClassifier, ...)."
            )
    cls = registry[name]
    try:
        clf = cls()
    except TypeError as e:
        raise ConfigError(f"{name} cannot be used as a head on its own ({e}); choose another classifier.") from None
    valid = clf.get_params(deep=False)
    bad = [k for k in params if k not in valid]
    if bad:
        close = {k: difflib.get_close_matches(k, list(valid), n=1) for k in bad}
        hints = "; ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        raise ConfigError(f"{name} has no parameter {hints}. Its parameters are: {', '.join(sorted(valid))}.")
    p = dict(params)
    if "random_state" in valid and "random_state" not in p and random_state is not None:
        p["random_state"] = random_state
    try:
        clf.set_params(**p)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"Invalid parameters for {name}: {e}") from None
    steps: list[tuple[str, Any]] = []
    if l2_normalize:
        steps.append(("l2", Normalizer(norm="l2")))
    if standardize:
        steps.append(("scale", StandardScaler()))
    steps.append(("clf", clf))
    return Pipeline(steps)
