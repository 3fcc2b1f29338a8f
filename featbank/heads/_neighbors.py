"""A brute-force ``KNeighborsClassifier`` as a float64 torch module (for ONNX export): distances, top-k, votes."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._kernel_svc import prefix_module, sq_norms

__all__ = ["knn_to_torch"]


def _exportable(clf: Any) -> bool:
    """Uniform votes over Euclidean neighbours found by brute force: what the knn head family builds."""
    metric_ok = clf.metric == "euclidean" or (clf.metric == "minkowski" and clf.p == 2 and not clf.metric_params)
    return clf.algorithm == "brute" and clf.weights == "uniform" and metric_ok and clf.outputs_2d_ is False


def knn_to_torch(steps: list[Any], clf: Any) -> Any:
    """Embeddings -> ``predict_proba`` of the pipeline ``steps + [clf]`` (the share of each class among
    the k nearest training rows), computed in float64 as scikit-learn does (||x||^2 - 2 x.t + ||t||^2),
    so the neighbours are the same up to exact ties. None when ``clf`` is not a brute-force, uniform,
    Euclidean ``KNeighborsClassifier`` or a step is unknown (export then uses skl2onnx)."""
    import torch
    from torch import nn

    pre = prefix_module(steps)
    if pre is None or not _exportable(clf):
        return None
    train = np.asarray(clf._fit_X, np.float64)
    onehot = np.eye(len(clf.classes_))[np.asarray(clf._y, np.int64)]
    k = int(clf.n_neighbors)

    class KNNProba(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = pre
            self.register_buffer("fit_rows", torch.tensor(train, dtype=torch.float64))
            self.register_buffer("fit_sq", torch.tensor(sq_norms(train), dtype=torch.float64))
            self.register_buffer("onehot", torch.tensor(onehot, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pre(x)
            d2 = (x * x).sum(1, keepdim=True) - 2.0 * (x @ self.fit_rows.T) + self.fit_sq[None, :]
            idx = torch.topk(d2, k, dim=1, largest=False).indices
            votes = self.onehot[idx].sum(1)  # (N, k, classes) -> (N, classes)
            return (votes / float(k)).to(torch.float32)

    return KNNProba().eval()
