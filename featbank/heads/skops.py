"""skops, the only format of scikit-learn heads: exact trusted types, computed from what featbank saves.

A skops file names every type it needs; skops constructs only types the caller trusts. featbank
trusts the exact names of the estimators it saves and the types their fitted state needs, never a
module prefix (a prefix such as ``numpy.`` would let any callable in that package, for instance
``numpy.testing``'s ``runstring``, run when a file names it). :func:`trusted_skops_types` is the
whole list: skops' own defaults (every scikit-learn estimator, numpy ufuncs, ...) load only
where featbank lists them too, since every type a file names is checked against featbank's list
before skops sees the file.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import TYPE_CHECKING

from ..errors import BundleError, ConfigError

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator

__all__ = ["trusted_skops_types", "named_types", "serialize_sklearn", "load_skops"]

# Types below scikit-learn's public estimators that the state of the heads featbank saves needs
# (trees, neighbour indexes and their metrics, MLP optimisers, calibrators, GP kernels). Found by
# fitting every classifier 'fit --head' accepts and listing skops' untrusted types;
# tests/test_bundle.py re-derives it. Exact names only: a module prefix would let any callable
# in that module (numpy.testing's runstring, say) run when a file names it.
_SKLEARN_STATE_TYPES = frozenset({
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.gaussian_process._gpc._BinaryGaussianProcessClassifierLaplace",
    "sklearn.gaussian_process.kernels.ConstantKernel",
    "sklearn.gaussian_process.kernels.Product",
    "sklearn.gaussian_process.kernels.RBF",
    # labels, isotonic calibration, boosting and SGD losses (skops trusts these by default; featbank lists them)
    "sklearn.preprocessing._label.LabelBinarizer",
    "sklearn.preprocessing._label.LabelEncoder",
    "sklearn.isotonic.IsotonicRegression",
    "sklearn.tree._classes.DecisionTreeRegressor",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "sklearn._loss.link.Interval",
    "sklearn._loss.link.IdentityLink",
    "sklearn._loss.link.LogitLink",
    "sklearn._loss.link.HalfLogitLink",
    "sklearn._loss.link.MultinomialLogit",
    "sklearn._loss.loss.HalfBinomialLoss",
    "sklearn._loss.loss.HalfMultinomialLoss",
    "sklearn._loss.loss.ExponentialLoss",
    "sklearn._loss._loss.CyHalfBinomialLoss",
    "sklearn._loss._loss.CyHalfMultinomialLoss",
    "sklearn._loss._loss.CyExponentialLoss",
    "sklearn.linear_model._sgd_fast.Hinge",
    "sklearn.linear_model._sgd_fast.SquaredHinge",
    "sklearn.linear_model._sgd_fast.ModifiedHuber",
    "sklearn.linear_model._sgd_fast.Log",
})

# Containers, numbers and arrays a fitted state is made of (JSON values need no type: skops builds them with
# json.loads). Exact names: no builtin callable (eval, exec, getattr, __import__) is among them.
_DATA_TYPES = frozenset({
    *(f"builtins.{t}" for t in ("dict", "list", "tuple", "set", "str", "int", "float", "bool", "NoneType")),
    "numpy.ndarray", "numpy.dtype", "numpy.bool_",
    *(f"numpy.{t}" for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                             "uint32", "uint64")),
    "numpy.random._generator.Generator", "numpy.random.mtrand.RandomState",
})
#: A ``schema.json`` larger than this (as the archive declares it) is refused before it is read.
_MAX_SCHEMA_BYTES = 64 << 20


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"  # skops' spelling of a type


def trusted_skops_types() -> frozenset[str]:
    """Every exact type name a ``head.skops`` file may contain; nothing else loads (not even skops' own defaults).

    The scikit-learn classifiers ``fit --head`` accepts, :class:`featbank.heads.KernelSVC`, the pipeline
    steps featbank builds
    (``Pipeline``, ``StandardScaler``, ``Normalizer``, :class:`~featbank.heads.SignedSqrt`), the distance metrics their neighbour
    indexes name (all but the Python-callable one), :data:`_SKLEARN_STATE_TYPES`, and the
    containers, numbers and arrays of :data:`_DATA_TYPES`.
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    from ._preprocess import SignedSqrt
    from .trust import trusted_head_classes

    classes = [*trusted_head_classes(), Pipeline, StandardScaler, Normalizer, SignedSqrt]
    return frozenset(map(_type_name, classes + _distance_metric_types())) | _SKLEARN_STATE_TYPES | _DATA_TYPES


def _distance_metric_types() -> list[type]:
    """The classes of the distance metrics neighbour heads can name, through public API only."""
    import numpy as np
    from sklearn.metrics import DistanceMetric
    from sklearn.neighbors import VALID_METRICS

    names = {n for v in VALID_METRICS.values() for n in v if isinstance(n, str)} | {"matching", "kulsinski"}
    params = {"seuclidean": {"V": np.ones(1)}, "mahalanobis": {"VI": np.eye(1)}, "minkowski": {"p": 3},
              "wminkowski": {"p": 3, "w": np.ones(1)}}
    types = []
    for name in sorted(names - {"pyfunc"}):  # a Python callable is code: never trusted
        try:
            types.append(type(DistanceMetric.get_metric(name, np.float64, **params.get(name, {}))))
        except (ValueError, TypeError):  # names only scipy or the brute-force path know
            continue
    return types


def named_types(data: bytes) -> set[str]:
    """Every type a skops file names, read from its ``schema.json`` (skops' defaults included).

    Each node of the schema names ``__module__.__class__``; a method node adds its method's name.
    JSON values (``JsonNode``) are built with ``json.loads`` and name no type.

    Raises:
        ValueError: not a skops archive, or its schema is not what skops writes.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo("schema.json")
        if info.file_size > _MAX_SCHEMA_BYTES:
            raise ValueError(f"schema.json declares {info.file_size} bytes (at most {_MAX_SCHEMA_BYTES})")
        schema = json.loads(z.read(info))
    names: set[str] = set()
    stack = [schema]
    while stack:  # iterative: a deeply nested crafted schema cannot exhaust the recursion limit
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if "__class__" in node and node.get("__loader__") != "JsonNode":
            name = f"{node.get('__module__')}.{node['__class__']}"
            content = node.get("content")
            if node.get("__loader__") == "MethodNode" and isinstance(content, dict):
                name += f".{content.get('func')}"
            names.add(name)
        stack.extend(node.values())
    return names


def _untrusted(data: bytes) -> list[str]:
    """Types named in a skops file that featbank does not list (skops' own defaults count as untrusted too)."""
    return sorted(named_types(data) - trusted_skops_types())


def serialize_sklearn(estimator: BaseEstimator) -> tuple[str, bytes, list[str]]:
    """``(file name, bytes, trusted types)`` of a fitted scikit-learn estimator, as skops.

    Raises:
        ConfigError: the estimator's state needs a type featbank does not load (it would write
            a bundle that cannot be opened).
    """
    import skops.io as sio

    data = sio.dumps(estimator)
    bad = _untrusted(data)
    if bad:
        raise ConfigError(
            f"featbank cannot save {type(estimator).__name__} safely: its state holds types featbank does not "
            f"load from a bundle ({', '.join(bad)}). Use another head or other --param values."
        )
    return "head.skops", data, sorted(named_types(data))


def load_skops(data: bytes, what: str) -> BaseEstimator:
    """The estimator in a skops file, if every type it names is trusted.

    Raises:
        BundleError: not a skops archive, or it names a type featbank does not trust (listed).
    """
    import skops.io as sio

    try:
        trusted = sorted(named_types(data))
        bad = sorted(set(trusted) - trusted_skops_types())
    except Exception as e:  # noqa: BLE001 - not a readable skops archive
        raise BundleError(f"Cannot read head file ({what}): {type(e).__name__}: {e}. Re-create the bundle.") from None
    if bad:
        raise BundleError(
            f"{what} names types featbank does not trust: {', '.join(bad)}. Refusing to load it (a bundle is "
            "data; only the exact types of the heads featbank saves are loaded)."
        )
    return sio.loads(data, trusted=trusted)
