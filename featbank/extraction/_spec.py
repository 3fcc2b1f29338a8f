"""The layers and views one extract run stores, checked against the backbone (``--layers``,
``--views``, ``--augment``, ``--pooling``) and resolved into a :class:`~featbank.features.FeatureSpec`."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..features import AUGMENTS, DIHEDRAL_ORDER, FIXED_VIEWS, MAX_VIEWS, POOLINGS, FeatureSpec

__all__ = ["resolve_features"]


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise ConfigError(f"The '{name}' parameter must be an integer >= {low}. Got {value!r} instead.")
    return int(value)


def _check_views(views: int, augment: str, square: bool) -> None:
    if views and not augment:
        raise ConfigError(f"--views {views} needs --augment: one of {', '.join(AUGMENTS)} "
                          "(e.g. 'featbank extract DATA --views 1 --augment hflip').")
    if augment == "hflip" and views != 1:
        raise ConfigError(f"--augment hflip has exactly one view (the mirror image); got --views {views}. "
                          "Use --views 1, or --augment dihedral / crops for more.")
    n_dihedral = len(DIHEDRAL_ORDER) if square else 2
    if augment == "dihedral" and views > n_dihedral:
        raise ConfigError(f"--augment dihedral has at most {n_dihedral} views on this backbone's "
                          f"{'square' if square else 'non-square'} input; got --views {views}.")


def resolve_features(
    backbone: str | os.PathLike, weights: str | None, weights_file: str | os.PathLike | None, *,
    layers: Any = None, pooling: str = "gap+2x2", views: int = 0, augment: str | None = None,
    view_seed: int = 0,
) -> FeatureSpec:
    """Check the layer and view options of an extract run and fill in the layers' sizes.

    A plain run (``layers`` None or ``final``, no views) loads nothing. Otherwise the backbone is
    loaded to name its layers and measure their pooled sizes.

    Raises:
        ConfigError: an unknown layer, pooling or augmentation, or an impossible number of views.
    """
    views = _int("views", views, 0)
    if views > MAX_VIEWS:
        raise ConfigError(f"--views {views} is more than featbank stores: at most {MAX_VIEWS} augmented views per image "
                          "(each one is stored like the image's own embedding and layers). Use --views 4 to 16.")
    view_seed = _int("view_seed", view_seed, 0)
    augment = augment or ""
    if augment not in ("", *AUGMENTS):
        raise ConfigError(f"The 'augment' parameter must be one of {AUGMENTS}. Got {augment!r} instead.")
    if augment and not views:
        views = FIXED_VIEWS.get(augment, 0)
        if not views:
            raise ConfigError("--augment crops needs --views K (how many crops per image), e.g. --views 4.")
    if pooling not in POOLINGS:
        raise ConfigError(f"The 'pooling' parameter must be one of {POOLINGS}. Got {pooling!r} instead.")
    plain = (layers is None or layers == "final" or list(layers) == ["final"]) and views == 0
    if plain:
        return FeatureSpec(pooling=pooling)
    from ..backbones import layer_dims, load_backbone, parse_layers

    bb = load_backbone(os.fspath(backbone), weights, weights_file)
    # The embedding is always stored ('embeddings'), so 'final' is always among the layers: '--layers
    # stage3' and '--layers stage3,final' are the same cache, with the same key.
    taps = tuple(dict.fromkeys((*parse_layers(layers, bb), "final")))
    h, w = bb.preprocess.input_size
    _check_views(views, augment, h == w)
    dims = layer_dims(bb, taps, pooling)
    return FeatureSpec(taps, dims, pooling, views, augment if views else "", view_seed if views else 0)
