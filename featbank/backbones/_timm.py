"""Any timm model by name, weights from the local Hugging Face or torch hub cache."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsUnavailable
from ..images import PreprocessConfig
from ._registry import (
    RANDOM,
    Backbone,
    hub_checkpoint,
    load_state_into,
    read_state_dict,
    sha256_file,
    sha256_tensors,
    warn_random,
)

__all__ = ["build_timm"]

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
        p = hub_checkpoint(url)
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
        warnings.warn(f"timm crop_mode {crop_mode!r} is approximated by a centre crop", RuntimeWarning, stacklevel=2)
    resize = int(h / crop_pct) if h == w else int(h / crop_pct)
    return PreprocessConfig((h, w), resize, cfg.get("interpolation", "bicubic"), cfg["mean"], cfg["std"])


def build_timm(name: str, weights: str | None, weights_file: Path | None) -> Backbone:
    import timm

    if weights_file is not None:
        model = timm.create_model(name, pretrained=False)
        load_state_into(model, read_state_dict(weights_file), str(weights_file), name)
        tag, sha = f"file:{weights_file.name}", sha256_file(weights_file)
    elif weights == RANDOM:
        warn_random(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False)
        tag, sha = RANDOM, sha256_tensors(model.state_dict())
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
