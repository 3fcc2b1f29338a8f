"""Head kinds: the registry of what ``fit`` can put in a bundle, each kind owning its whole life cycle.

A kind is one way of being a head: the ``linear`` L-BFGS head, the ``mlp`` head, and ``sklearn``
(any scikit-learn classifier by class name, in a pipeline with its preprocessing). Each kind owns

- ``build``: an unfitted estimator from a :class:`HeadSpec`, every parameter checked before any work;
- ``select``: its hyperparameter choice on a validation split (the C sweep, MLP early stopping);
- ``refit``: the fit on train+val with the chosen setting;
- ``save`` / ``load``: the manifest's ``head`` section and weights file, and back (never pickle);
- ``export``: a torch module mapping embeddings to probabilities (``None``: skl2onnx converts it).

Kinds are registered by name with :func:`register_head_kind` (like timm's model registry); a
bundle's ``head.type`` names its kind, and a ``--head`` that names no kind is a scikit-learn class
name (:data:`DEFAULT_KIND`). Nothing outside this module tests a head's kind by its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from ..errors import BundleError, ConfigError
from ._estimator import Estimator
from ._features import Features
from ._sklearn import estimator_proba, make_sklearn_head
from ._sweep import COARSE_GRID, SKLEARN_C_GRID, ValSplit, fit_sklearn, sweep_linear, sweep_sklearn

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "HeadSpec",
    "Selected",
    "HeadKind",
    "HEAD_KINDS",
    "DEFAULT_KIND",
    "jsonable",
    "register_head_kind",
    "head_kind",
    "kind_of",
    "head_state",
    "ValSplit",
]


@dataclass(frozen=True)
class HeadSpec:
    """A head to build and select: its name, parameters, preprocessing and the C grid of the sweep."""

    head: str
    params: dict[str, Any] = field(default_factory=dict)
    standardize: bool = True
    l2_normalize: bool = False
    class_weight: str | None = None
    device: str = "auto"
    grid: Sequence[float] | None = None

    @property
    def kind(self) -> HeadKind:
        return head_kind(self.head)

    @property
    def is_torch(self) -> bool:
        """Whether the head streams rows from the cache (the torch kinds) rather than needing them in memory."""
        return self.kind.streams


@dataclass
class Selected:
    """A kind's choice on validation: the estimator fitted on the training rows, the setting, the evidence."""

    estimator: Estimator
    chosen: dict[str, Any]
    sweep: list[dict[str, Any]]
    val_proba: np.ndarray | None


class HeadKind:
    """One kind of head. Subclass, set ``name``, implement ``build``/``select``/``refit``/``save``/``load``."""

    name: ClassVar[str] = ""
    #: Fits on rows streamed from the cache in chunks (``--max-memory`` below the data size).
    streams: ClassVar[bool] = False
    #: The coarse C grid of its sweep, when its classifier has a ``C``.
    c_grid: ClassVar[Sequence[float]] = ()

    def build(self, spec: HeadSpec, seed: int) -> Estimator:
        raise NotImplementedError

    def owns(self, est: Estimator) -> bool:
        """Whether ``est`` is a fitted head of this kind (for estimators built elsewhere, e.g. ``--auto``)."""
        raise NotImplementedError

    def classifier(self, est: Estimator) -> Estimator:
        """The classifier itself (the last step of a pipeline)."""
        return est

    def rows(self, X: Features) -> Features | np.ndarray:
        """What the estimator reads: streamed features, or an array."""
        return X

    def fit(self, est: Estimator, X: np.ndarray, y: np.ndarray, class_weight: str | None = None) -> Estimator:
        """Fit with the estimator's own settings (no selection): one CV fold, say."""
        return est.fit(X, y)

    def select(self, est: Estimator, data: ValSplit, spec: HeadSpec) -> Selected:
        raise NotImplementedError

    def refit(self, est: Estimator, chosen: dict[str, Any], X: Features, y: np.ndarray, spec: HeadSpec) -> None:
        raise NotImplementedError

    def save(self, est: Estimator, chosen: dict[str, Any], spec: HeadSpec) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The manifest's ``head`` section and the weights file (name -> bytes) of a fitted head."""
        raise NotImplementedError

    def load(self, data: bytes, info: dict[str, Any], where: str) -> Estimator:
        """The fitted head from its weights file's bytes and the manifest's ``head`` section."""
        raise NotImplementedError

    def export(self, est: Estimator) -> nn.Module | None:
        """A torch module mapping embeddings to probabilities where torch expresses the head exactly."""
        from ._state import head_to_torch

        return head_to_torch(est)

    def _section(self, est: Estimator, chosen: dict[str, Any], spec: HeadSpec) -> dict[str, Any]:
        return {"type": self.name, "estimator": type(self.classifier(est)).__name__,
                "preprocessing": {"standardize": spec.standardize, "l2_normalize": spec.l2_normalize},
                "class_weight": spec.class_weight, "chosen": chosen}


#: The registered kinds by name (a bundle's ``head.type``).
HEAD_KINDS: dict[str, HeadKind] = {}
#: The kind of a ``--head`` that names no registered kind: a scikit-learn classifier class name.
DEFAULT_KIND = "sklearn"

K = TypeVar("K", bound=type[HeadKind])


def register_head_kind(cls: K) -> K:
    """Class decorator: register one instance of a :class:`HeadKind` under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name; set the class attribute 'name'.")
    HEAD_KINDS[cls.name] = cls()
    return cls


def head_kind(name: str) -> HeadKind:
    """The kind of a ``--head`` value or a bundle's ``head.type``: a registered kind, else scikit-learn."""
    return HEAD_KINDS.get(name) or HEAD_KINDS[DEFAULT_KIND]


def kind_of(est: Estimator) -> HeadKind:
    """The kind a fitted estimator belongs to.

    Raises:
        ConfigError: no kind holds it (a bundle could not store it).
    """
    for kind in HEAD_KINDS.values():
        if kind.owns(est):
            return kind
    raise ConfigError(f"internal error: a {type(est).__name__} is no head kind's estimator, so a bundle cannot hold it "
                      f"(kinds: {', '.join(HEAD_KINDS)}).")


def jsonable(v: Any) -> Any:
    """``v`` as JSON can hold it: tuples as lists, numpy scalars as Python numbers, dict keys as strings."""
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return v


def head_state(est: Estimator) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, info)`` of a fitted torch head (linear, mlp): arrays for safetensors and JSON-able params."""
    kind = kind_of(est)
    if not isinstance(kind, _TorchKind):
        raise ConfigError(f"{type(est).__name__} is a {kind.name} head, saved with skops, not as tensors.")
    return kind.state(est)


class _TorchKind(HeadKind):
    """The torch heads: built from their class, saved as safetensors tensors plus JSON-able parameters."""

    streams = True

    @property
    def cls(self) -> type:
        raise NotImplementedError

    def owns(self, est: Estimator) -> bool:
        return isinstance(est, self.cls)

    def extra(self, seed: int) -> dict[str, Any]:
        return {}

    def build(self, spec: HeadSpec, seed: int) -> Estimator:
        from ._torch_head import validate_head_params

        valid = self.cls().get_params()
        bad = [k for k in spec.params if k not in valid]
        if bad:
            raise ConfigError(
                f"The {spec.head} head has no parameter {', '.join(map(repr, bad))}. Its parameters are: "
                f"{', '.join(sorted(valid))}."
            )
        kw = {"standardize": spec.standardize, "l2_normalize": spec.l2_normalize, "class_weight": spec.class_weight,
              "device": spec.device, **self.extra(seed), **spec.params}
        est = self.cls(**kw)
        validate_head_params(est)  # now, not at the end of a sweep
        return est

    @staticmethod
    def _val_proba(est: Estimator, data: ValSplit) -> np.ndarray | None:
        return estimator_proba(est, data.Xv, data.n_classes) if data.has_val else None

    def state(self, est: Estimator) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(est)
        params = {k: jsonable(v) for k, v in est.get_params().items()}
        info = {"params": params, "classes_": [jsonable(c) for c in est.classes_],
                "n_features_in": int(est.n_features_in_)}
        tensors = {"mean": np.asarray(est.mean_, np.float32), "scale": np.asarray(est.scale_, np.float32)}
        return tensors, info

    def from_state(self, tensors: dict[str, np.ndarray], info: dict[str, Any]) -> Estimator:
        raise NotImplementedError

    def _restore(self, est: Estimator, tensors: dict[str, np.ndarray], info: dict[str, Any]) -> Estimator:
        est.classes_ = np.asarray(info["classes_"])
        est.n_features_in_ = int(info["n_features_in"])
        est.mean_ = tensors["mean"].astype(np.float32)
        est.scale_ = tensors["scale"].astype(np.float32)
        return est

    def save(self, est: Estimator, chosen: dict[str, Any], spec: HeadSpec) -> tuple[dict[str, Any], dict[str, bytes]]:
        from safetensors.numpy import save as st_save

        tensors, info = self.state(est)
        section = {**self._section(est, chosen, spec), **info, "file": "head.safetensors"}
        data = st_save(tensors, metadata={"format": "featbank-head", "type": self.name})
        return section, {"head.safetensors": data}

    def load(self, data: bytes, info: dict[str, Any], where: str) -> Estimator:
        from safetensors.numpy import load as st_load

        return self.from_state(st_load(data), info)


@register_head_kind
class LinearKind(_TorchKind):
    """Multinomial logistic regression by full-batch L-BFGS; C swept on validation, warm-started."""

    name = "linear"
    c_grid = COARSE_GRID

    @property
    def cls(self) -> type:
        from ._linear_head import LinearHead

        return LinearHead

    def select(self, est: Estimator, data: ValSplit, spec: HeadSpec) -> Selected:
        sweep: list[dict[str, Any]] = []
        if data.has_val and "C" not in spec.params:
            C, sweep, sols = sweep_linear(est, data, spec.grid or self.c_grid)
            est.set_params(C=C, warm_start=False)
            est.set_solution(*sols[C])
        else:
            C = float(spec.params.get("C", est.C))
            est.set_params(C=C).fit(data.Xtr, data.ytr)
        return Selected(est, {"C": C}, sweep, self._val_proba(est, data))

    def refit(self, est: Estimator, chosen: dict[str, Any], X: Features, y: np.ndarray, spec: HeadSpec) -> None:
        est.set_params(warm_start=True)  # from the selected solution
        est.fit(X, y)
        est.set_params(warm_start=False)

    def state(self, est: Estimator) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors, info = super().state(est)
        tensors["weight"] = np.ascontiguousarray(est._w, dtype=np.float64)
        tensors["bias"] = np.ascontiguousarray(est._b, dtype=np.float64)
        info["n_iter"] = int(est.n_iter_)
        return tensors, info

    def save(self, est: Estimator, chosen: dict[str, Any], spec: HeadSpec) -> tuple[dict[str, Any], dict[str, bytes]]:
        section, files = super().save(est, chosen, spec)
        section["chosen_C"] = chosen.get("C")
        return section, files

    def from_state(self, tensors: dict[str, np.ndarray], info: dict[str, Any]) -> Estimator:
        est = self.cls(**dict(info.get("params") or {}))
        est._w = tensors["weight"].astype(np.float64)
        est._b = tensors["bias"].astype(np.float64)
        est.n_iter_ = int(info.get("n_iter", 0))
        self._restore(est, tensors, info)
        est._set_coef()
        return est


@register_head_kind
class MLPKind(_TorchKind):
    """A small MLP trained with AdamW; the epoch count chosen by early stopping on validation."""

    name = "mlp"
    c_grid = COARSE_GRID

    @property
    def cls(self) -> type:
        from ._mlp_head import MLPHead

        return MLPHead

    def extra(self, seed: int) -> dict[str, Any]:
        return {"random_state": seed}

    def select(self, est: Estimator, data: ValSplit, spec: HeadSpec) -> Selected:
        if data.has_val:
            est.fit(data.Xtr, data.ytr, eval_set=(data.Xv, data.yv))
            chosen = {"epochs": int(est.best_epoch_), "best_val_loss": float(est.best_val_loss_)}
        else:
            est.fit(data.Xtr, data.ytr)
            chosen = {"epochs": int(est.n_epochs_)}
        return Selected(est, chosen, [], self._val_proba(est, data))

    def refit(self, est: Estimator, chosen: dict[str, Any], X: Features, y: np.ndarray, spec: HeadSpec) -> None:
        est.set_params(max_epochs=max(1, chosen["epochs"]), early_stopping=False)
        est.fit(X, y)

    def state(self, est: Estimator) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors, info = super().state(est)
        for k, v in est.net_.state_dict().items():
            tensors[f"net.{k}"] = v.detach().cpu().numpy().copy()
        info["best_epoch"] = int(est.best_epoch_)
        return tensors, info

    def from_state(self, tensors: dict[str, np.ndarray], info: dict[str, Any]) -> Estimator:
        import torch

        from ._mlp_head import build_mlp

        params = dict(info.get("params") or {})
        if isinstance(params.get("hidden_sizes"), list):
            params["hidden_sizes"] = tuple(params["hidden_sizes"])
        est = self.cls(**params)
        net = build_mlp(int(info["n_features_in"]), est._hidden(), len(info["classes_"]), float(est.dropout))
        net.load_state_dict({k[4:]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("net.")})
        est.net_ = net.eval()
        est.best_epoch_ = int(info.get("best_epoch", 0))
        est.n_epochs_ = est.best_epoch_
        est.best_val_loss_ = None
        return self._restore(est, tensors, info)


@register_head_kind
class SklearnKind(HeadKind):
    """Any scikit-learn classifier by class name, in a pipeline with its preprocessing; saved with skops."""

    name = "sklearn"
    c_grid = SKLEARN_C_GRID

    def owns(self, est: Estimator) -> bool:
        from sklearn.pipeline import Pipeline

        return isinstance(est, Pipeline)

    def classifier(self, est: Estimator) -> Estimator:
        return est[-1]

    def rows(self, X: Features) -> np.ndarray:
        return X.to_array()

    def fit(self, est: Estimator, X: np.ndarray, y: np.ndarray, class_weight: str | None = None) -> Estimator:
        return fit_sklearn(est, X, y, class_weight)

    def build(self, spec: HeadSpec, seed: int) -> Estimator:
        est = make_sklearn_head(spec.head, spec.params, standardize=spec.standardize,
                                l2_normalize=spec.l2_normalize, random_state=seed)
        if spec.class_weight is None:
            return est
        if "class_weight" in est[-1].get_params():
            est.set_params(clf__class_weight=spec.class_weight)
            return est
        import inspect

        if "sample_weight" not in inspect.signature(est[-1].fit).parameters:
            raise ConfigError(
                f"{type(est[-1]).__name__} takes neither class_weight nor sample weights; drop --class-weight."
            )
        return est

    def select(self, est: Estimator, data: ValSplit, spec: HeadSpec) -> Selected:
        if data.has_val and "C" in est[-1].get_params() and "C" not in spec.params:
            est, chosen, sweep, proba = sweep_sklearn(est, data, spec.grid or self.c_grid, spec.class_weight)
            return Selected(est, chosen, sweep, proba)
        fit_sklearn(est, data.Xtr.to_array(), data.ytr, spec.class_weight)
        proba = estimator_proba(est, data.Xv.to_array(), data.n_classes) if data.has_val else None
        return Selected(est, {}, [], proba)

    def refit(self, est: Estimator, chosen: dict[str, Any], X: Features, y: np.ndarray, spec: HeadSpec) -> None:
        fit_sklearn(est, X.to_array(), y, spec.class_weight)

    def save(self, est: Estimator, chosen: dict[str, Any], spec: HeadSpec) -> tuple[dict[str, Any], dict[str, bytes]]:
        from .skops import serialize_sklearn

        fname, data, trusted = serialize_sklearn(est)
        section = {**self._section(est, chosen, spec), "file": fname,
                   "params": {k: repr(v) for k, v in est[-1].get_params().items()},
                   "user_params": {k: repr(v) for k, v in spec.params.items()},
                   "pipeline": [n for n, _ in est.steps], "trusted_types": trusted}
        return section, {fname: data}

    def load(self, data: bytes, info: dict[str, Any], where: str) -> Estimator:
        from .skops import load_skops

        file = str(info.get("file", ""))
        if not file.endswith(".skops"):
            raise BundleError(f"{where}: head file {file!r} (head.type {self.name!r}) is not .skops; featbank loads "
                              "scikit-learn heads from skops files only (no pickle).")
        return load_skops(data, where)
