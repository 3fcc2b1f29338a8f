"""What a head reads: one :class:`FeatureSpec` from extraction to the cache, the bundle and ONNX.

A spec names the layers (``--layers``, in network order, with their pooled widths and the taps'
pooling), the augmented views stored per image (``--views K --augment A``, ``view_seed``) and, for
a fitted head, how the views enter it (``views_used``, ``tta``, ``view_pool``). It is validated in
one place and written in two formats, both unchanged from before: the cache index's root
attributes (:meth:`FeatureSpec.to_attrs` / :meth:`FeatureSpec.from_attrs`) and the bundle
manifest's ``features`` section (:meth:`FeatureSpec.to_dict` / :meth:`FeatureSpec.from_dict`).

The view table lives here too. Views are made from the preprocessed image (the backbone's resize +
centre crop, ``uint8`` HWC):

- ``hflip``: K = 1, the mirror image.
- ``dihedral``: K <= 7, the first K of the seven non-identity symmetries of the square, in the
  fixed order :data:`DIHEDRAL_ORDER` (a non-square input allows only the two flips).
- ``crops``: K random resized crops of the preprocessed image (area 0.6-1.0, aspect ratio 3/4-4/3,
  resized back to the input size with the backbone's interpolation) each mirrored on a coin toss.
  The random numbers of view ``k`` of a row come from sha256(row path, k, ``view_seed``), never
  from the row's position, so reruns, resumed runs and incremental runs give the same views.

:func:`make_views` makes them of a numpy image (extraction); :func:`view_transforms` gives the
fixed ones as torch functions of a uint8 NHWC batch (predict, evaluate and the exported graph).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["AUGMENTS", "DIHEDRAL_ORDER", "FIXED_VIEWS", "MAX_VIEWS", "POOLINGS", "DEFAULT_POOLING", "VIEW_POOL",
           "FeatureSpec", "FeatureSpecError", "make_views", "view_transforms"]

AUGMENTS = ("hflip", "dihedral", "crops")
#: (quarter turns counter-clockwise, mirrored first) of the dihedral views, in storage order.
DIHEDRAL_ORDER = ((0, True), (2, True), (2, False), (1, False), (3, False), (1, True), (3, True))
#: The augmentations made by fixed flips and turns (a new image at predict time gets them too): their most views.
FIXED_VIEWS = {"hflip": 1, "dihedral": len(DIHEDRAL_ORDER)}
#: The most augmented views one run may store per image (each is a row's worth of every stored layer).
MAX_VIEWS = 64
#: How a tap's feature map is pooled: global average + 2x2 average; the same plus their maxima; or
#: the global average alone (:mod:`featbank.backbones._taps` has the columns).
POOLINGS = ("gap+2x2", "gap+2x2+max", "gap")
DEFAULT_POOLING = "gap+2x2"
#: A head with pooled views reads ``[mean | max]`` of the features over the plain image and its views.
VIEW_POOL = "mean+max"
_CROP_SCALE, _CROP_RATIO = (0.6, 1.0), (3 / 4, 4 / 3)


class FeatureSpecError(ConfigError):
    """A feature spec field with a bad value. ``field``, ``want`` and ``value`` let the reader of a
    cache or a manifest say which file and which field (the message alone names the field)."""

    def __init__(self, field: str, want: str, value: Any):
        self.field, self.want, self.value = field, want, value
        super().__init__(f"The feature spec's {field!r} must be {want}. Got {value!r} instead.")


@dataclass(frozen=True)
class FeatureSpec:
    """What a cache holds besides the plain embedding, and what a head reads of it.

    Attributes:
        layers: taps in network order. A cache's always end with ``final`` (the embedding is always
            stored); a head's are the ones it reads, concatenated in that order.
        layer_dims: ``{tap: pooled width}`` of each of ``layers``.
        pooling: the taps' pooling, one of :data:`POOLINGS`.
        n_views: K, augmented views per image besides the plain one (0: none).
        augment: ``hflip``, ``dihedral``, ``crops``, or ``""`` without views.
        view_seed: seeds the ``crops`` views.
        views_used: (a head) augmented views per image that entered training.
        tta: (a head) predictions average the plain view and the ``n_views`` augmented ones.
        view_pool: (a head) :data:`VIEW_POOL`: the head reads ``[mean | max]`` over the plain and
            ``n_views`` augmented views, twice the layers' width; ``""``: the plain view.
    """

    layers: tuple[str, ...] = ("final",)
    layer_dims: dict[str, int] = field(default_factory=dict, hash=False)
    pooling: str = DEFAULT_POOLING
    n_views: int = 0
    augment: str = ""
    view_seed: int = 0
    views_used: int = 0
    tta: bool = False
    view_pool: str = ""

    @property
    def is_default(self) -> bool:
        """A plain run: the embedding alone, no views (the cache and its key are as before)."""
        return self.layers == ("final",) and self.n_views == 0

    @property
    def taps(self) -> tuple[str, ...]:
        """The layers stored under ``layers/`` (every one but ``final``)."""
        return tuple(t for t in self.layers if t != "final")

    @property
    def dim(self) -> int:
        """Width of a head's input (the layers' widths summed; twice that with ``view_pool``)."""
        return sum(self.layer_dims[t] for t in self.layers) * (2 if self.view_pool else 1)

    def key_part(self) -> dict[str, Any]:
        """What the cache key covers of the spec (the key's format: ``views`` is ``n_views``)."""
        return {"layers": list(self.layers), "pooling": self.pooling, "views": self.n_views, "augment": self.augment,
                "view_seed": self.view_seed}

    def to_attrs(self) -> dict[str, Any]:
        """Root attributes of a cache with these features (JSON strings for the lists and dicts)."""
        return {"layers": json.dumps(list(self.layers)), "layer_dims": json.dumps(self.layer_dims),
                "pooling": self.pooling, "views": int(self.n_views), "augment": self.augment,
                "view_seed": int(self.view_seed)}

    def datasets(self) -> dict[str, tuple[int, ...]]:
        """``{dataset: trailing shape}`` of the per-row cache datasets besides ``embeddings``."""
        out: dict[str, tuple[int, ...]] = {f"layers/{t}": (self.layer_dims[t],) for t in self.taps}
        if self.n_views:
            out["views/embeddings"] = (self.n_views, self.layer_dims["final"])
            out.update({f"views/layers/{t}": (self.n_views, self.layer_dims[t]) for t in self.taps})
        return out

    def to_dict(self) -> dict[str, Any]:
        """The bundle manifest's ``features`` section (``view_pool`` only when set, as before)."""
        out: dict[str, Any] = {"layers": list(self.layers), "layer_dims": dict(self.layer_dims),
                               "pooling": self.pooling, "views_used": self.views_used, "augment": self.augment,
                               "view_seed": self.view_seed, "n_views": self.n_views, "tta": self.tta}
        if self.view_pool:
            out["view_pool"] = self.view_pool
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        """Read and check a manifest's ``features`` section (unknown keys, e.g. reports, are ignored).

        Raises:
            FeatureSpecError: a missing or ill-typed field, views a new image cannot be given, or a
                ``view_pool`` without the fixed views it needs.
        """
        layers = _layer_names(data.get("layers"), "layers", ending_final=False)
        dims = _widths(data.get("layer_dims"), layers, "layer_dims")
        counts = {key: _count(data.get(key, 0), key) for key in ("views_used", "n_views", "view_seed")}
        tta = data.get("tta", False)
        if not isinstance(tta, bool):
            raise FeatureSpecError("tta", "true or false", tta)
        text = {key: data.get(key, default) for key, default in
                (("pooling", DEFAULT_POOLING), ("augment", ""), ("view_pool", ""))}
        for key, value in text.items():
            if not isinstance(value, str):
                raise FeatureSpecError(key, "a string", value)
        spec = cls(layers, dims, tta=tta, **text, **counts)
        spec._check_fixed_views()
        return spec

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], embed_dim: int) -> FeatureSpec:
        """Read and check a cache's root attributes (absent ones: a plain cache's defaults).

        ``attrs`` holds the decoded attribute values (``str`` and ``int``), ``embed_dim`` the
        width of ``embeddings``.

        Raises:
            FeatureSpecError: an attribute malformed or at odds with the others (``field`` is its name).
        """
        layers = _layer_names(_json(attrs, "layers", ["final"]), "layers", ending_final=True, shown=attrs.get("layers"))
        dims = _widths(_json(attrs, "layer_dims", {"final": embed_dim}), layers, "layer_dims",
                       shown=attrs.get("layer_dims"))
        if dims["final"] != embed_dim:
            raise FeatureSpecError("layer_dims", f"'final' to have the {embed_dim} values 'embeddings' has", dims)
        pooling = attrs.get("pooling", DEFAULT_POOLING)
        if pooling not in POOLINGS:
            raise FeatureSpecError("pooling", f"one of {POOLINGS}", pooling)
        n_views, seed = _count(attrs.get("views", 0), "views"), _count(attrs.get("view_seed", 0), "view_seed")
        augment = attrs.get("augment", "")
        if (n_views > 0) != (augment in AUGMENTS) or (n_views == 0 and augment not in ("", None)):
            raise FeatureSpecError("augment", f"one of {AUGMENTS} with views, '' without (views = {n_views} and "
                                   f"augment = {augment!r} disagree)", augment)
        return cls(layers, dims, str(pooling), n_views, str(augment or ""), seed)

    def _check_fixed_views(self) -> None:
        """Predict and export make a new image's views by flips and turns: at most the table's count of them; a
        pooled head's views must be such views, 1..max of them, and leave no TTA."""
        most = FIXED_VIEWS.get(self.augment)
        if most is not None and self.n_views > most:
            raise FeatureSpecError("n_views", f"at most {most} {self.augment} views", self.n_views)
        if not self.view_pool:
            return
        if self.view_pool != VIEW_POOL:
            raise FeatureSpecError("view_pool", f"{VIEW_POOL!r} or ''", self.view_pool)
        if most is None:
            raise FeatureSpecError("augment", "'hflip' or 'dihedral' (the views of a pooled head)", self.augment)
        if self.n_views < 1:
            raise FeatureSpecError("n_views", f"1 to {most} {self.augment} views for a pooled head", self.n_views)
        if self.tta:
            raise FeatureSpecError("tta", "false for a pooled head (its rows hold every view)", True)


def _json(attrs: Mapping[str, Any], name: str, default: Any) -> Any:
    if name not in attrs:
        return default
    try:
        return json.loads(attrs[name]) if isinstance(attrs[name], str) else None
    except ValueError:
        return None


def _layer_names(value: Any, name: str, *, ending_final: bool, shown: Any = None) -> tuple[str, ...]:
    ok = (isinstance(value, list) and value and all(isinstance(t, str) and t and "/" not in t for t in value)
          and len(set(value)) == len(value) and (not ending_final or value[-1] == "final"))
    if not ok:
        want = "a list of distinct layer names" + (' ending with "final"' if ending_final else "")
        raise FeatureSpecError(name, want, value if shown is None else shown)
    return tuple(value)


def _widths(value: Any, layers: tuple[str, ...], name: str, shown: Any = None) -> dict[str, int]:
    if not isinstance(value, dict) or set(value) != set(layers) or not all(
            _is_int(d) and d > 0 for d in value.values()):
        raise FeatureSpecError(name, f"a positive size for each of the layers {list(layers)}",
                               value if shown is None else shown)
    return {t: int(value[t]) for t in layers}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any, name: str) -> int:
    if not _is_int(value) or value < 0:
        raise FeatureSpecError(name, "an integer >= 0", value)
    return int(value)


def view_transforms(spec: FeatureSpec, input_size: tuple[int, int]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The spec's ``n_views`` fixed views (extraction's dihedral order; ``hflip`` is its first) as flips and
    quarter turns of a uint8 NHWC batch, traceable into an ONNX graph ([] for ``crops`` or no views).

    Raises:
        FeatureSpecError: quarter turns of a non-square input (extraction never makes them).
    """
    if spec.augment not in FIXED_VIEWS:
        return []
    import torch

    h, w = input_size
    if h != w and any(turns % 2 for turns, _ in DIHEDRAL_ORDER[:spec.n_views]):
        most = next(k for k, (turns, _) in enumerate(DIHEDRAL_ORDER) if turns % 2)
        raise FeatureSpecError("n_views", f"at most {most} views of the non-square {h}x{w} input (the later ones "
                               "turn it a quarter)", spec.n_views)

    def make(turns: int, mirror: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def view(x: torch.Tensor) -> torch.Tensor:
            if mirror:
                x = torch.flip(x, dims=(2,))
            return torch.rot90(x, turns, dims=(1, 2)) if turns else x

        return view

    return [make(*DIHEDRAL_ORDER[k]) for k in range(spec.n_views)]


def _rng(path: str, view: int, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{path}\0{view}\0{seed}".encode("utf-8", "surrogateescape")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _dihedral(img: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    if mirror:
        img = img[:, ::-1]
    return np.rot90(img, turns, axes=(0, 1)) if turns else img


def _crop(img: np.ndarray, rng: np.random.Generator, interpolation: str) -> np.ndarray:
    from PIL import Image

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
    # A PreprocessConfig's interpolation names are Pillow's filter names in lower case (featbank.images.RESAMPLE);
    # looked up here by name so that this ground-floor module stands on nothing but errors.
    out = Image.fromarray(np.ascontiguousarray(img)).crop(box).resize((w, h), Image.Resampling[interpolation.upper()])
    arr = np.asarray(out, dtype=np.uint8)
    return arr[:, ::-1] if flip else arr


def make_views(img: np.ndarray, path: str, spec: FeatureSpec, interpolation: str = "bicubic") -> np.ndarray:
    """The K augmented views of one preprocessed image (``uint8`` HWC) as ``(K, H, W, 3)``.

    Deterministic in (``path``, view index, ``spec.view_seed``).
    """
    k = spec.n_views
    if spec.augment == "crops":
        views = [_crop(img, _rng(path, v, spec.view_seed), interpolation) for v in range(k)]
    else:
        order = DIHEDRAL_ORDER if spec.augment == "dihedral" else DIHEDRAL_ORDER[:1]
        views = [_dihedral(img, *order[v]) for v in range(k)]
    return np.stack([np.ascontiguousarray(v) for v in views]) if views else np.zeros((0, *img.shape), np.uint8)
