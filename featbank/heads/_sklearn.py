"""scikit-learn classifiers as heads: the registry by name, ``key=value`` params, the pipeline."""

from __future__ import annotations

import ast
import difflib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ._features import Features

if TYPE_CHECKING:
    from ._estimator import Estimator

__all__ = ["FEATBANK_HEADS", "make_sklearn_head",
           "unknown_head", "parse_param", "sklearn_classifiers", "has_predict_proba", "estimator_proba",
           "affine_prefix"]


# --------------------------------------------------------------------------------------------
# scikit-learn heads by name
# --------------------------------------------------------------------------------------------


#: The heads featbank implements itself (torch, full-batch); every other head name is a scikit-learn classifier.
FEATBANK_HEADS = ("linear", "mlp")


def sklearn_classifiers() -> dict[str, type]:
    """Every scikit-learn classifier class, by name."""
    import warnings

    from sklearn.utils import all_estimators

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(all_estimators(type_filter="classifier"))


def has_predict_proba(estimator: Estimator) -> bool:
    """Whether ``estimator.predict_proba`` exists (``SVC(probability=False)`` hides it behind ``available_if``)."""
    try:
        estimator.predict_proba  # noqa: B018 - the attribute access is the test
    except AttributeError:
        return False
    return True


def estimator_proba(estimator: Estimator, X: Any, n_classes: int | None = None) -> np.ndarray:
    """(N, C) float64 probabilities of a fitted classifier: the one definition featbank uses.

    ``predict_proba`` where the estimator has one, else the softmax of ``decision_function``
    (binary: the softmax of ``[0, d]``, i.e. ``sigmoid(d)`` for the second class). With
    ``n_classes``, columns are placed at the estimator's integer ``classes_`` among ``n_classes``
    (a head that saw a subset of the classes gives 0 for the others). ``X`` may be a
    :class:`featbank.heads.Features` (rows streamed from a cache), read chunk by chunk. ONNX export
    must match this.
    """
    if isinstance(X, Features):
        parts = [estimator_proba(estimator, x, n_classes) for _, x in X.chunks()]
        if parts:
            return np.concatenate(parts)
        return np.zeros((0, n_classes if n_classes is not None else len(estimator.classes_)))
    if has_predict_proba(estimator):
        p = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    else:
        d = np.asarray(estimator.decision_function(X), dtype=np.float64)
        if d.ndim == 1:
            d = np.stack([np.zeros_like(d), d], axis=1)
        d = d - d.max(axis=1, keepdims=True)
        p = np.exp(d)
        p /= p.sum(axis=1, keepdims=True)
    if n_classes is None:
        return p
    cols = np.asarray(getattr(estimator, "classes_", np.arange(p.shape[1]))).astype(np.int64)
    if p.shape[1] == n_classes and np.array_equal(cols, np.arange(n_classes)):
        return p
    out = np.zeros((p.shape[0], n_classes), dtype=np.float64)
    out[:, cols] = p
    return out


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


def unknown_head(name: str, registry: dict[str, type], families: Sequence[str] = ()) -> ConfigError:
    """The error for a head name that is nothing: the closest of featbank's heads, the head ``families``
    given and scikit-learn's classifiers (``registry``), and what a head may be."""
    # featbank's own heads are names too: 'linaer' should suggest 'linear' first.
    names = {**{h: h for h in (*FEATBANK_HEADS, *families)}, **{n.lower(): n for n in registry}}
    close = [names[c] for c in difflib.get_close_matches(name.lower(), list(names), n=4, cutoff=0.5)]
    close += [n for n in registry if name.lower() in n.lower() and n not in close][: 4 - len(close)]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    fams = [f for f in families if f not in FEATBANK_HEADS]
    return ConfigError(
        f"Unknown head {name!r}.{hint} Use 'linear', 'mlp', "
        + (f"a head family of --auto with --cv K ({', '.join(fams)}) " if fams else "")
        + "or a scikit-learn classifier class name (LogisticRegression, SVC, KNeighborsClassifier, ...)."
    )


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
            raise unknown_head(name, registry)
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


def affine_prefix(steps: Sequence[Any]) -> list[tuple[str, np.ndarray | None, np.ndarray | None]] | None:
    """A pipeline's preprocessing steps as ("scale", mean, scale) / ("l2", None, None) / ("sqrt", None, None),
    in float64; None for a step it does not know. What the torch modules and the ONNX graph of a head rebuild."""
    from sklearn.preprocessing import Normalizer, StandardScaler

    from ._preprocess import SignedSqrt

    out: list[tuple[str, np.ndarray | None, np.ndarray | None]] = []
    for step in steps:
        if step is None or step == "passthrough":
            continue
        if isinstance(step, StandardScaler):
            mean = np.asarray(step.mean_, np.float64) if step.with_mean and step.mean_ is not None else None
            scale = np.asarray(step.scale_, np.float64) if step.with_std and step.scale_ is not None else None
            out.append(("scale", mean, scale))
        elif isinstance(step, Normalizer) and step.norm == "l2":
            out.append(("l2", None, None))
        elif type(step) is SignedSqrt:
            out.append(("sqrt", None, None))
        else:
            return None
    return out
