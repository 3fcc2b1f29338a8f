"""MLPHead: a small MLP trained with AdamW and early stopping on a validation set."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .._device import resolve_device
from ._features import Features
from ._torch_head import (
    BOOLEAN,
    CLASS_WEIGHT,
    DEVICE,
    Constraint,
    Preprocess,
    TorchHead,
    TrainingRows,
    evaluate_logits,
    integer,
    real,
    train_one_epoch,
    validate_head_params,
)

__all__ = ["MLPHead", "build_mlp"]


def build_mlp(d: int, hidden: tuple[int, ...], k: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)]
        d = h
    layers.append(nn.Linear(d, k))
    return nn.Sequential(*layers)


def _hidden_tuple(h: Any) -> tuple[int, ...] | None:
    """``hidden_sizes`` as a tuple of ints, or None when it is not one."""
    if isinstance(h, (bool, np.bool_)):
        return None
    if isinstance(h, (int, np.integer)):
        h = (h,)
    if not isinstance(h, (tuple, list)):
        return None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in h):
        return None
    return tuple(int(v) for v in h)


class MLPHead(TorchHead):
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

    parameter_constraints = {
        "hidden_sizes": Constraint("a positive int or a tuple of positive ints, e.g. (512,) or (512, 256)",
                                   lambda v: _hidden_tuple(v) is not None),
        "dropout": real(0, 1, closed="left"), "lr": real(0, None, closed="neither"), "weight_decay": real(0, None),
        "batch_size": integer(1), "max_epochs": integer(1), "patience": integer(1), "early_stopping": BOOLEAN,
        "validation_fraction": real(0, 1, closed="neither"), "standardize": BOOLEAN, "l2_normalize": BOOLEAN,
        "class_weight": CLASS_WEIGHT, "device": DEVICE,
        "random_state": Constraint("None, an int >= 0 or a numpy RandomState",
                                   lambda v: v is None or isinstance(v, np.random.RandomState)
                                   or (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0)),
    }

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
        validate_head_params(self)
        return _hidden_tuple(self.hidden_sizes)  # type: ignore[return-value]

    def fit(self, X: Any, y: Any, sample_weight: Any = None, eval_set: tuple[Any, Any] | None = None) -> MLPHead:
        """Train; ``eval_set=(X_val, y_val)`` turns on early stopping on that set."""
        hidden = self._hidden()
        feats, y_enc, sw = self._prepare_fit(X, y, sample_weight)
        rs = check_random_state(self.random_state)
        seed = int(rs.randint(0, 2**31 - 1))
        gen = np.random.default_rng(seed)
        feats, y_enc, sw, val_feats, yv = self._stopping_set(feats, y_enc, sw, eval_set, seed)
        dev = resolve_device(self.device)
        k, d = len(self.classes_), feats.embed_dim
        pre = Preprocess(self.l2_normalize, self.mean_, self.scale_).to(dev)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            net = build_mlp(d, hidden, k, float(self.dropout)).to(dev)
            opt = torch.optim.AdamW(net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
            best_state, best_loss, best_epoch, bad = None, np.inf, 0, 0
            rows = TrainingRows(feats, y_enc, sw.astype(np.float32))
            self.n_epochs_ = 0
            for epoch in range(1, int(self.max_epochs) + 1):
                train_one_epoch(net, rows, opt, batch_size=int(self.batch_size), device=dev, generator=gen,
                                transform=pre)
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

    def _stopping_set(self, feats: Features, y_enc: np.ndarray, sw: np.ndarray, eval_set: tuple[Any, Any] | None,
                      seed: int) -> tuple[Features, np.ndarray, np.ndarray, Features | None, np.ndarray | None]:
        """``(fit rows, their labels, weights, early-stopping rows, their labels)``: ``eval_set`` where given;
        else, with ``early_stopping``, ``validation_fraction`` of the rows held out; else none."""
        if eval_set is not None:
            Xv, yv_raw = eval_set
            val_feats = Xv if isinstance(Xv, Features) else Features(np.asarray(Xv, np.float32))
            yv_raw = np.asarray(yv_raw)
            unknown = np.setdiff1d(np.unique(yv_raw), self.classes_)
            if unknown.size:
                raise ValueError(f"eval_set has labels not seen in training: {unknown.tolist()}.")
            return feats, y_enc, sw, val_feats, np.searchsorted(self.classes_, yv_raw).astype(np.int64)
        if not (self.early_stopping and feats.n_samples >= 10):
            return feats, y_enc, sw, None, None
        from sklearn.model_selection import train_test_split

        pos, n_val = np.arange(feats.n_samples), int(np.ceil(self.validation_fraction * feats.n_samples))
        # stratified where scikit-learn can split so: every class twice or more, and each side at least as
        # many rows as classes (10% of a 3-class fold of 12 rows is 2 rows: drawn at random instead)
        k = len(self.classes_)
        stratify = np.bincount(y_enc).min() >= 2 and min(n_val, feats.n_samples - n_val) >= k
        tr, va = train_test_split(pos, test_size=n_val, random_state=seed, stratify=y_enc if stratify else None)
        tr, va = np.sort(tr), np.sort(va)
        return feats.subset(tr), y_enc[tr], sw[tr], feats.subset(va), y_enc[va]

    def _logits(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(self._preprocess_np(X), dtype=torch.float32)
            return self.net_(x).double().numpy()

    def to_torch(self) -> nn.Module:
        check_is_fitted(self)
        import copy

        return nn.Sequential(Preprocess(self.l2_normalize, self.mean_, self.scale_), copy.deepcopy(self.net_)).eval()


# Pickles, skops files and bundle manifests ("trusted_types") record a class by
# `__module__.__qualname__`; keep the path it had when featbank.heads was one module, so files
# written before and after the split name the same type (featbank.heads re-exports it).
MLPHead.__module__ = "featbank.heads"
