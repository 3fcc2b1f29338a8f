"""What a run stores besides the embedding: intermediate layers (``--layers``) and augmented views
(``--views K --augment A``), their validation, and the deterministic view transforms.

Views are made from the preprocessed image (the backbone's resize + centre crop, ``uint8`` HWC):

- ``hflip``: K = 1, the mirror image.
- ``dihedral``: K <= 7, the first K of the seven non-identity symmetries of the square, in the
  fixed order :data:`DIHEDRAL_ORDER` (a non-square input allows only the two flips).
- ``crops``: K random resized crops of the preprocessed image (area 0.6-1.0, aspect ratio 3/4-4/3,
  resized back to the input size with the backbone's interpolation) each mirrored on a coin toss.
  The random numbers of view ``k`` of a row come from sha256(row path, k, ``view_seed``), never
  from the row's position, so reruns, resumed runs and incremental runs give the same views.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["AUGMENTS", "DIHEDRAL_ORDER", "FIXED_VIEWS", "MAX_VIEWS", "FeatureOptions", "resolve_features", "make_views"]

AUGMENTS = ("hflip", "dihedral", "crops")
#: (quarter turns counter-clockwise, mirrored first) of the dihedral views, in storage order.
DIHEDRAL_ORDER = ((0, True), (2, True), (2, False), (1, False), (3, False), (1, True), (3, True))
#: The augmentations made by fixed flips and turns (a new image at predict time gets them too): their most views.
FIXED_VIEWS = {"hflip": 1, "dihedral": len(DIHEDRAL_ORDER)}
#: The most augmented views one run may store per image (each is a row's worth of every stored layer).
MAX_VIEWS = 64
_CROP_SCALE, _CROP_RATIO = (0.6, 1.0), (3 / 4, 4 / 3)


@dataclass(frozen=True)
class FeatureOptions:
    """The layers and views one run stores (validated by :func:`resolve_features`).

    Attributes:
        layers: taps in network order, always ending with ``final`` (the embedding is always stored).
        pooling: the taps' pooling name.
        views: K, augmented views per image (0: none).
        augment: ``hflip``, ``dihedral``, ``crops`` or ``""``.
        view_seed: seeds the ``crops`` views.
        layer_dims: ``{tap: pooled size}``, filled once the backbone is known.
    """

    layers: tuple[str, ...] = ("final",)
    pooling: str = "gap+2x2"
    views: int = 0
    augment: str = ""
    view_seed: int = 0
    layer_dims: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def is_default(self) -> bool:
        """A plain run: the embedding alone, no views (the cache and its key are as before)."""
        return self.layers == ("final",) and self.views == 0

    @property
    def taps(self) -> tuple[str, ...]:
        """The layers stored under ``layers/`` (every requested one but ``final``)."""
        return tuple(t for t in self.layers if t != "final")

    def key_part(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "pooling": self.pooling, "views": self.views, "augment": self.augment,
                "view_seed": self.view_seed}

    def attrs(self) -> dict[str, Any]:
        """Root attributes of a cache with these features (JSON strings for the lists and dicts)."""
        import json

        return {"layers": json.dumps(list(self.layers)), "layer_dims": json.dumps(self.layer_dims),
                "pooling": self.pooling, "views": int(self.views), "augment": self.augment,
                "view_seed": int(self.view_seed)}

    def datasets(self) -> dict[str, tuple[int, ...]]:
        """``{dataset: trailing shape}`` of the per-row datasets besides ``embeddings``."""
        out: dict[str, tuple[int, ...]] = {f"layers/{t}": (self.layer_dims[t],) for t in self.taps}
        if self.views:
            out["views/embeddings"] = (self.views, self.layer_dims["final"])
            out.update({f"views/layers/{t}": (self.views, self.layer_dims[t]) for t in self.taps})
        return out


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
) -> FeatureOptions:
    """Check the layer and view options of an extract run and fill in the layers' sizes.

    A plain run (``layers`` None or ``final``, no views) loads nothing. Otherwise the backbone is
    loaded to name its layers and measure their pooled sizes.

    Raises:
        ConfigError: an unknown layer, pooling or augmentation, or an impossible number of views.
    """
    from ..backbones import POOLINGS

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
        return FeatureOptions(pooling=pooling)
    from ..backbones import layer_dims, load_backbone, parse_layers

    bb = load_backbone(os.fspath(backbone), weights, weights_file)
    # The embedding is always stored ('embeddings'), so 'final' is always among the layers: '--layers
    # stage3' and '--layers stage3,final' are the same cache, with the same key.
    taps = tuple(dict.fromkeys((*parse_layers(layers, bb), "final")))
    h, w = bb.preprocess.input_size
    _check_views(views, augment, h == w)
    dims = layer_dims(bb, taps, pooling)
    return FeatureOptions(taps, pooling, views, augment if views else "", view_seed if views else 0, dims)


def _rng(path: str, view: int, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{path}\0{view}\0{seed}".encode("utf-8", "surrogateescape")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _dihedral(img: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    if mirror:
        img = img[:, ::-1]
    return np.rot90(img, turns, axes=(0, 1)) if turns else img


def _crop(img: np.ndarray, rng: np.random.Generator, interpolation: str) -> np.ndarray:
    from PIL import Image

    from ..images import RESAMPLE

    h, w = img.shape[:2]
    area = h * w
    # torchvision's RandomResizedCrop rule (10 tries, then the whole image), with our generator.
    box = (0, 0, w, h)
    for _ in range(10):
        target = area * rng.uniform(*_CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            box = (left, top, left + cw, top + ch)
            break
    flip = bool(rng.integers(0, 2))
    out = Image.fromarray(np.ascontiguousarray(img)).crop(box).resize((w, h), RESAMPLE[interpolation])
    arr = np.asarray(out, dtype=np.uint8)
    return arr[:, ::-1] if flip else arr


def make_views(img: np.ndarray, path: str, features: FeatureOptions, interpolation: str = "bicubic") -> np.ndarray:
    """The K augmented views of one preprocessed image (``uint8`` HWC) as ``(K, H, W, 3)``.

    Deterministic in (``path``, view index, ``features.view_seed``).
    """
    k = features.views
    if features.augment == "crops":
        views = [_crop(img, _rng(path, v, features.view_seed), interpolation) for v in range(k)]
    else:
        order = DIHEDRAL_ORDER if features.augment == "dihedral" else DIHEDRAL_ORDER[:1]
        views = [_dihedral(img, *order[v]) for v in range(k)]
    return np.stack([np.ascontiguousarray(v) for v in views]) if views else np.zeros((0, *img.shape), np.uint8)
