"""Fine-tuning settings (strategies, optimizers, learning-rate presets, the hashed settings) and the
atomic per-epoch checkpoints and RNG states that make ``resume`` exact."""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import atomic_write
from ..errors import ConfigError

__all__ = ["FinetuneSettings", "STRATEGIES", "OPTIMIZERS", "METRICS", "LR_PRESETS", "GROUP_ALIASES", "CHECKPOINT_FORMAT",
           "CHECKPOINT_VERSION", "settings_from_kwargs", "rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint",
           "settings_diff", "json_digest"]

STRATEGIES = ("frozen", "partial", "full")
OPTIMIZERS = ("sgd", "adamw")
METRICS = ("balanced_accuracy", "accuracy")
CHECKPOINT_FORMAT = "featbank-finetune-checkpoint"
CHECKPOINT_VERSION = 1

#: Learning-rate presets. ``seed-resnet`` is the seed tutorial's ResNet table; ``seed-lite`` maps
#: it onto EfficientNet-Lite by output stride: stem..stage2 (stride <= 4, like conv1/layer1) 1e-4,
#: stage3 (stride 8, like layer2) 5e-4, stage4..head_conv (stride 16-32, like layer3/layer4) 1e-3.
LR_PRESETS: dict[str, dict[str, float]] = {
    "seed-resnet": {"stem": 1e-4, "layer1": 1e-4, "layer2": 5e-4, "layer3": 1e-3, "layer4": 1e-3, "head": 1e-2},
    "seed-lite": {
        "stem": 1e-4, "stage1": 1e-4, "stage2": 1e-4, "stage3": 5e-4, "stage4": 1e-3, "stage5": 1e-3,
        "stage6": 1e-3, "stage7": 1e-3, "head_conv": 1e-3, "head": 1e-2,
    },
}
#: Other spellings accepted in ``--lr-groups`` / ``--trainable-from`` (torchvision's ResNet names).
GROUP_ALIASES = {"conv1": "stem", "fc": "head", "classifier": "head"}
_DEFAULT_LR = {"sgd": 1e-2, "adamw": 3e-4}
# LP-FT starts from a tuned head: a 10x smaller step keeps the pretrained features from being
# distorted before the head and the features agree (Kumar et al. 2022 tune it far lower still).
_DEFAULT_LR_LPFT = {"sgd": 1e-3, "adamw": 3e-5}
_DEFAULT_WD = {"sgd": 1e-4, "adamw": 0.05}


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that changes the fine-tuned weights (hashed; ``resume`` refuses other values).

    Attributes:
        backbone, weights, weights_file: the starting network (see ``featbank backbones``).
        strategy: ``frozen``, ``partial`` or ``full``.
        trainable_from: for ``partial``: the first group that trains (default: the middle one).
        lr: the rate of every group no preset or list names (default 1e-2 for SGD, 3e-4 AdamW).
        lr_groups: a preset name (``seed``, ``seed-resnet``, ``seed-lite``) or ``group=lr,...``.
        layer_decay: rate of group ``k`` places below the head is ``lr * layer_decay**k``.
        optimizer: ``sgd`` (momentum 0.9, Nesterov off) or ``adamw``.
        weight_decay: default 1e-4 (SGD) / 0.05 (AdamW); never on biases and norm weights.
        init_head: a linear head bundle from ``featbank fit --head linear`` (LP-FT).
        epochs, batch_size, seed: as usual; ``seed`` fixes init, split, order and augmentation.
        val_split: fraction of each class held out for validation when DATA has no val split
            (LP-FT uses its probe's held-out images instead, when they are images of DATA).
        train_bn: BatchNorm of frozen groups trains too (statistics and affine parameters).
        bn_stats: ``frozen`` keeps every BatchNorm layer in eval mode (running statistics fixed,
            affine parameters of trainable groups still train); ``train`` updates the statistics
            of trainable groups; ``auto`` (default) is ``frozen`` for LP-FT, since the probe was
            fitted on features computed with the pretrained statistics (batch statistics of a
            domain far from ImageNet would change them at step 0), and ``train`` otherwise.
        patience: stop after this many epochs without a better validation metric (0: never).
        metric: validation metric for early stopping and the best checkpoint.
        warmup_epochs: linear warmup length (at most a fifth of the run), then cosine to zero.
        clip_grad: max gradient norm (0: no clipping).
        crop_scale: area range of the random resized crop; ``hflip``: random horizontal flips.
        vflip, rot90: random vertical flips and random multiples of 90 degrees (off by default:
            label-preserving only where up/down has no meaning, e.g. solar cells, microscopy, aerial).
        cache_frozen: run the frozen groups once per training image and view and train the rest on
            their outputs, kept in memory (``partial``/``frozen`` only). Augmentation is then the
            fixed set of views that ``hflip``/``vflip``/``rot90`` generate (of the eval transform's
            crop; ``crop_scale`` does not apply), and each epoch costs only the trainable groups.
    """

    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    weights_file: str | None = None
    strategy: str = "partial"
    trainable_from: str | None = None
    lr: float | None = None
    lr_groups: str | None = None
    layer_decay: float | None = None
    optimizer: str = "sgd"
    weight_decay: float | None = None
    init_head: str | None = None
    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    val_split: float = 0.2
    train_bn: bool = False
    bn_stats: str = "auto"
    patience: int = 5
    metric: str = "balanced_accuracy"
    warmup_epochs: float = 1.0
    clip_grad: float = 5.0
    crop_scale: tuple[float, float] = (0.25, 1.0)
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    cache_frozen: bool = False

    def __post_init__(self) -> None:
        self._check_values()
        self._check_combinations()

    def _check_values(self) -> None:
        """Each setting alone in its range (the message names the parameter, the rule and the value)."""
        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"The '{name}' parameter of finetune must be {allowed}. Got {getattr(self, name)!r} instead.")

        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"one of {', '.join(STRATEGIES)}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"one of {', '.join(OPTIMIZERS)}")
        if self.metric not in METRICS:
            raise bad("metric", f"one of {', '.join(METRICS)}")
        if self.bn_stats not in ("auto", "frozen", "train"):
            raise bad("bn_stats", "one of auto, frozen, train")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "a positive integer")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise bad("patience", "an integer >= 0")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "a positive number")
        if self.layer_decay is not None and not (0 < self.layer_decay <= 1):
            raise bad("layer_decay", "in (0, 1]")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise bad("weight_decay", "a number >= 0")
        if not (0 < self.val_split < 1):
            raise bad("val_split", "a fraction between 0 and 1")
        if self.clip_grad < 0 or self.warmup_epochs < 0:
            raise bad("clip_grad" if self.clip_grad < 0 else "warmup_epochs", "a number >= 0")
        lo, hi = self.crop_scale
        if not (0 < lo <= hi <= 1):
            raise bad("crop_scale", "(min, max) with 0 < min <= max <= 1")
        object.__setattr__(self, "crop_scale", (float(lo), float(hi)))

    def _check_combinations(self) -> None:
        """Settings that contradict one another (each message says which to drop)."""
        if self.trainable_from is not None and self.strategy != "partial":
            raise ConfigError(
                f"--trainable-from {self.trainable_from} only applies to --strategy partial (got "
                f"--strategy {self.strategy}). Drop it, or use --strategy partial."
            )
        if self.cache_frozen and self.strategy == "full":
            raise ConfigError(
                "--cache-frozen caches the output of frozen groups, and --strategy full freezes none. Use "
                "--strategy partial --trainable-from GROUP, or drop --cache-frozen."
            )
        if self.cache_frozen and self.train_bn:
            raise ConfigError(
                "--cache-frozen caches the output of frozen groups, and --train-bn makes their BatchNorm "
                "layers train. Pass only one of them."
            )
        if self.lr_groups is not None and self.layer_decay is not None:
            raise ConfigError(
                "--lr-groups and --layer-decay both set per-group rates; pass only one of them."
            )

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return (_DEFAULT_LR_LPFT if self.init_head else _DEFAULT_LR)[self.optimizer]

    @property
    def resolved_bn_stats(self) -> str:
        if self.bn_stats != "auto":
            return self.bn_stats
        return "frozen" if self.init_head else "train"

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else _DEFAULT_WD[self.optimizer]


def settings_from_kwargs(kwargs: dict[str, Any]) -> FinetuneSettings:
    names = {f.name for f in fields(FinetuneSettings)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ConfigError(f"Unknown finetune setting(s) {unknown}. Valid settings: {', '.join(sorted(names))}.")
    return FinetuneSettings(**kwargs)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        torch.save(payload, fh)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure: the file is not usable
        raise ConfigError(
            f"Cannot read checkpoint {str(path)!r} ({type(e).__name__}: {e}). Start over with --overwrite."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{str(path)!r} is not a featbank finetune checkpoint. Start over with --overwrite.")
    return ckpt


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
