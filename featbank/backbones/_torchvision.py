"""Any torchvision classification model by its own name and weight enum, weights from the torch hub cache."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, WeightsUnavailable
from ..images import PreprocessConfig
from ._registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM,
    Backbone,
    BackboneInfo,
    hub_checkpoint,
    load_state_into,
    random_init,
    read_state_dict,
    sha256_file,
    sha256_tensors,
    warn_random,
)

__all__ = ["torchvision_models", "build_torchvision", "torchvision_info"]

def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


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


def _weights_enum(name: str, weights: str | None) -> Any:
    """The torchvision weights entry ``weights`` names (``DEFAULT`` when None); None for ``random`` or a
    model without pretrained weights."""
    import torchvision

    try:
        weights_cls = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None
    wname = weights or "DEFAULT"
    if wname == RANDOM:
        return None
    try:
        return weights_cls[wname] if wname != "DEFAULT" else weights_cls.DEFAULT
    except KeyError:
        names = [w.name for w in weights_cls]
        raise ConfigError(
            f"Unknown weights {wname!r} for torchvision {name!r}. Choose one of "
            f"{', '.join(names)}, 'random', or --weights-file PATH."
        ) from None


def _tv_state(name: str, model: nn.Module, weights: str | None, weights_file: Path | None,
              enum: Any) -> tuple[dict[str, torch.Tensor] | None, str, str]:
    """``(state dict or None, weights tag, sha256)``: from ``--weights-file``, random (initialised in
    place, state None), or torchvision's checkpoint already in the hub cache (never downloaded)."""
    if weights_file is not None:
        return read_state_dict(weights_file), f"file:{weights_file.name}", sha256_file(weights_file)
    if weights == RANDOM or enum is None:
        if weights != RANDOM:
            raise WeightsUnavailable(
                f"torchvision {name!r} has no pretrained weights; pass --weights-file PATH or "
                "--weights random."
            )
        warn_random(name)
        random_init(model)
        return None, RANDOM, sha256_tensors(model.state_dict())
    path = hub_checkpoint(enum.url)
    if not path.is_file():
        raise WeightsUnavailable(
            f"Weights {name}.{enum.name} are not available offline: expected {path}. Copy "
            f"{enum.url} there from a machine with internet access (or set TORCH_HOME), or "
            "pass --weights-file PATH."
        )
    return torch.load(path, map_location="cpu", weights_only=True), enum.name, sha256_file(path)


def build_torchvision(name: str, weights: str | None, weights_file: Path | None) -> Backbone:
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    enum = _weights_enum(name, weights)
    state, tag, sha = _tv_state(name, model, weights, weights_file, enum)
    pre = _tv_preprocess(enum) if enum is not None else _default_pre_for(name)
    if state is not None:
        load_state_into(model, state, tag, name)
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


def torchvision_info(name: str) -> BackboneInfo:
    import torchvision

    try:
        wcls = torchvision.models.get_model_weights(name)
        enum = wcls.DEFAULT
    except Exception:  # noqa: BLE001
        return BackboneInfo(name, "torchvision", "-", None, None, False, "no pretrained weights")
    path = hub_checkpoint(enum.url)
    pre = _tv_preprocess(enum)
    dim = None
    try:
        with torch.device("meta"), warnings.catch_warnings():
            # GoogLeNet / Inception v3 warn about a future default init; irrelevant to a listing.
            warnings.filterwarnings("ignore", category=FutureWarning, message=r"The default weight initialization")
            m = torchvision.models.get_model(name)
        dim = _last_linear(m)[1].in_features
    except Exception:  # noqa: BLE001 - listing must not fail on one model
        pass
    return BackboneInfo(
        name, "torchvision", enum.name, dim, pre.input_size, path.is_file(), str(path),
        "other weights: " + ", ".join(w.name for w in wcls),
    )
