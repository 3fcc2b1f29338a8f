"""The one thing every head is: a scikit-learn style classifier (what each head kind builds and fits)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Estimator", "pipeline_steps"]


@runtime_checkable
class Estimator(Protocol):
    """A scikit-learn style classifier: what every head kind builds and fits."""

    def fit(self, X: Any, y: Any, **kwargs: Any) -> Any: ...

    def predict(self, X: Any) -> np.ndarray: ...

    def get_params(self, deep: bool = True) -> dict[str, Any]: ...

    def set_params(self, **params: Any) -> Any: ...


def pipeline_steps(est: Estimator) -> list[Any]:
    """A scikit-learn ``Pipeline``'s steps in order (preprocessing, then the classifier); ``[est]`` for any other head."""
    from sklearn.pipeline import Pipeline

    return [step for _, step in est.steps] if isinstance(est, Pipeline) else [est]
