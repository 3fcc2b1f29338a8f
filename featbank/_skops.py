"""skops, the only format of scikit-learn heads: exact trusted types, computed from what featbank saves.

A skops file names every type it needs; skops constructs only types the caller trusts. featbank
trusts the exact names of the estimators it saves and the types their fitted state needs, never a
module prefix (a prefix such as ``numpy.`` would let any callable in that package, for instance
``numpy.testing``'s ``runstring``, run when a file names it).
"""

from __future__ import annotations

from typing import Any

from .errors import BundleError, ConfigError

__all__ = ["trusted_skops_types", "serialize_sklearn", "load_skops"]

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
})


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"  # skops' spelling of a type


def trusted_skops_types() -> frozenset[str]:
    """Exact type names a ``head.skops`` file may contain beyond skops' own defaults.

    The scikit-learn classifiers ``fit --head`` accepts, :class:`featbank.heads.KernelSVC`, the pipeline steps featbank builds
    (``Pipeline``, ``StandardScaler``, ``Normalizer``), the distance metrics their neighbour
    indexes name (all but the Python-callable one), and :data:`_SKLEARN_STATE_TYPES`.
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    from .heads import KernelSVC, sklearn_classifiers

    # KernelSVC: featbank's SVC fitted through a BLAS kernel matrix (fit --auto's SVMs); its state is SVC's.
    classes = [*sklearn_classifiers().values(), KernelSVC, Pipeline, StandardScaler, Normalizer]
    return frozenset(map(_type_name, classes + _distance_metric_types())) | _SKLEARN_STATE_TYPES


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


def _untrusted(data: bytes) -> list[str]:
    """Types named in a skops file that featbank does not trust (skops' defaults aside)."""
    import skops.io as sio

    allowed = trusted_skops_types()
    return sorted(t for t in sio.get_untrusted_types(data=data) if t not in allowed)


def serialize_sklearn(estimator: Any) -> tuple[str, bytes, list[str]]:
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
    return "head.skops", data, sorted(sio.get_untrusted_types(data=data))


def load_skops(data: bytes, what: str) -> Any:
    """The estimator in a skops file, if every type it names is trusted.

    Raises:
        BundleError: not a skops archive, or it names a type featbank does not trust (listed).
    """
    import skops.io as sio

    try:
        bad = _untrusted(data)
        trusted = sorted(sio.get_untrusted_types(data=data))
    except Exception as e:  # noqa: BLE001 - not a readable skops archive
        raise BundleError(f"Cannot read head file ({what}): {type(e).__name__}: {e}. Re-create the bundle.") from None
    if bad:
        raise BundleError(
            f"{what} names types featbank does not trust: {', '.join(bad)}. Refusing to load it (a bundle is "
            "data; only the exact types of the heads featbank saves are loaded)."
        )
    return sio.loads(data, trusted=trusted)
