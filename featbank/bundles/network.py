"""A head bundle's feature side as torch modules (uint8 images -> the columns its head reads) with its
test-time views; a fine-tuned bundle's network is :meth:`featbank.bundles.Bundle.finetuned_network`.

Here rather than in :mod:`featbank.finetuning` or :mod:`featbank.export` so that opening a bundle
(``predict``, ``evaluate``, ``export``, ``extract --backbone models/<name>``) needs only
:mod:`featbank.backbones`: the layers are backbones <- bundles <- fitting, finetuning, export.

A bundle fitted on ``final`` alone reads the backbone's embedding (the embedder). A bundle fitted
on several layers reads their pooled taps concatenated in network order, computed by
:class:`~featbank.backbones.TapModel` in one forward pass, so the exported graph holds the taps.
Test-time augmentation (a bundle with ``features.tta``) averages the probabilities over the plain
image and its ``hflip`` / ``dihedral`` views, made by flips and quarter turns of the uint8 batch
(traceable, so they go inside the graph too). ``crops`` views depend on the image's path in the
cache; new images have none, so predictions of such a bundle use the plain view (documented).
A bundle with pooled views (``features.view_pool``) reads ``[mean | max]`` of those features over
the plain image and its views, so its feature module runs the backbone once per view.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbones import Backbone
from ..errors import BundleError
from ..features import FeatureSpecError, view_transforms

if TYPE_CHECKING:
    from .bundle import Bundle

__all__ = ["bundle_views", "check_layer_order", "feature_module", "tta_views", "tta_classifier"]

View = Callable[[torch.Tensor], torch.Tensor]


def check_layer_order(bundle: Bundle, backbone_name: str, got: tuple[str, ...]) -> None:
    """Refuse a bundle whose layers the backbone's taps give in another order (its head reads columns)."""
    want = tuple(bundle.features.layers)
    if tuple(got) != want:
        raise BundleError(f"Bundle {str(bundle.path)!r} reads layers {list(want)}, but backbone {backbone_name!r} "
                          f"gives them in the order {list(got)}; re-fit the bundle.")


def _layer_module(bundle: Bundle, backbone: Backbone) -> nn.Module:
    """``uint8 NHWC -> (N, width of the layers)``: the embedder, or the bundle's taps concatenated."""
    feats = bundle.features
    if bundle.info.features is None or feats.layers == ("final",):
        return backbone.embedder().eval()
    from ..backbones import TapModel

    taps = TapModel(backbone, feats.layers, feats.pooling).eval()
    check_layer_order(bundle, backbone.name, taps.layers)

    class Concat(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat(self.inner(x), dim=1)

    return Concat(taps).eval()


def feature_module(bundle: Bundle, backbone: Backbone) -> nn.Module:
    """``uint8 NHWC -> (N, feature_dim)`` float features, as the bundle's head reads them."""
    inner = _layer_module(bundle, backbone)
    if bundle.info.features is None or not bundle.features.view_pool:
        return inner
    views = bundle_views(bundle, backbone)

    class PooledViews(nn.Module):
        """The features of the plain image and of each view, pooled: ``[mean | max]`` (as ``fit --pool-views``)."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            stack = torch.stack([self.inner(x)] + [self.inner(v(x).contiguous()) for v in views])
            return torch.cat([stack.mean(dim=0), stack.amax(dim=0)], dim=1)

    return PooledViews().eval()


def tta_views(bundle: Bundle, backbone: Backbone) -> list[View]:
    """The augmented views a bundle's TTA averages over, as functions of a uint8 NHWC batch ([] without TTA)."""
    return bundle_views(bundle, backbone) if bundle.features.tta else []


def bundle_views(bundle: Bundle, backbone: Backbone) -> list[View]:
    """The bundle's fixed views (:func:`featbank.features.view_transforms`), the ones it pools or averages over (TTA),
    naming the bundle when they cannot be made.

    Raises:
        BundleError: quarter turns of a non-square input (extraction never makes them: a manifest that asks
            for them was not written by featbank).
    """
    h, w = backbone.preprocess.input_size
    try:
        return view_transforms(bundle.features, (h, w))
    except FeatureSpecError:
        n_views = bundle.features.n_views
        raise BundleError(f"Bundle {str(bundle.path)!r} names {n_views} dihedral views, which include quarter turns, "
                          f"but backbone {backbone.name!r} takes {h}x{w} images: a non-square input has only its two "
                          "flips. The manifest was not written by featbank; re-create the bundle.") from None


def tta_classifier(features: nn.Module, head: nn.Module, views: list[View]) -> nn.Module:
    """uint8 NHWC -> (probabilities averaged over the plain image and ``views``, label)."""

    class TTAClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = features
            self.head = head

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            p = self.head(self.features(x))[0]
            for view in views:
                p = p + self.head(self.features(view(x).contiguous()))[0]
            p = p / float(1 + len(views))
            return p, torch.argmax(p, dim=1)

    return TTAClassifier().eval()
