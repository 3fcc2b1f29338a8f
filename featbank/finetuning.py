"""Fine-tune a backbone end to end: three strategies, per-group learning rates, LP-FT.

Strategies (the seed tutorial's three transfer methods):

* ``frozen``: the backbone is frozen (BatchNorm in eval mode), only a new linear head trains —
  feature extraction, but with augmented images instead of cached embeddings;
* ``partial``: the parameter groups before ``trainable_from`` are frozen, the rest train;
* ``full``: every group trains, starting from the pretrained weights.

Parameter groups come from :func:`featbank.backbones.param_groups` (``featbank backbones
--groups NAME``), with ``head`` (the new classifier) last. Learning rates per group come from a
preset (``seed-resnet``: the tutorial's table; ``seed-lite``: the same table mapped onto
EfficientNet-Lite's stages by output stride; ``seed``: whichever fits), an explicit
``group=lr,...`` list, or ``layer_decay`` (``lr * decay**k`` for the group ``k`` places below the
head). LP-FT (Kumar et al. 2022) starts from a linear head fitted by ``featbank fit --head linear``
(``init_head``) with its standardisation folded into the weights, so at step 0 the network
predicts exactly what the probe predicted.

Every epoch ends with an atomic checkpoint (model, optimizer, scheduler, scaler, RNG states,
history, best weights); ``resume=True`` continues it and reaches the weights an uninterrupted run
reaches. Augmentation draws from a generator seeded by (seed, epoch, image), so it does not
depend on worker processes or on where a run was resumed.

The result is a model bundle of kind ``"finetuned"`` (``model.safetensors`` holds ``features.*``
and ``head.*``) that ``featbank evaluate`` / ``predict`` / ``export`` accept, and that
:func:`featbank.backbones.load_backbone` loads as a backbone again (``featbank extract DATA
--backbone models/<name>``).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .backbones import HEAD_GROUP, Backbone, ImageEmbedder, Normalize, load_backbone, param_groups
from .errors import BundleError, ConfigError, DatasetError, Interrupted, RandomWeightsWarning
from .images import ImageReadError, PreprocessConfig, load_image, preprocess_image

__all__ = [
    "STRATEGIES",
    "OPTIMIZERS",
    "LR_PRESETS",
    "FinetuneSettings",
    "FinetuneReport",
    "FinetuneModel",
    "FinetunedPredictions",
    "finetune",
    "parse_lr_groups",
    "resolve_rates",
    "build_optimizer",
    "load_finetuned_backbone",
    "load_finetuned_model",
    "predict_images",
]

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
        val_split: fraction of each class held out for validation when DATA has no val split.
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


def _settings_from(kwargs: dict[str, Any]) -> FinetuneSettings:
    names = {f.name for f in fields(FinetuneSettings)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ConfigError(f"Unknown finetune setting(s) {unknown}. Valid settings: {', '.join(sorted(names))}.")
    return FinetuneSettings(**kwargs)


# --------------------------------------------------------------------------------------------
# Parameter groups and learning rates
# --------------------------------------------------------------------------------------------


def _canonical(name: str, groups: Sequence[str]) -> str | None:
    if name in groups:
        return name
    alias = GROUP_ALIASES.get(name)
    return alias if alias in groups else None


def _unknown_group(name: str, groups: Sequence[str], what: str) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(name, list(groups), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"Unknown parameter group {name!r} in {what}.{hint} Valid groups, input to output: "
        f"{', '.join(groups)} (see 'featbank backbones --groups BACKBONE')."
    )


def parse_lr_groups(text: str, groups: Sequence[str]) -> dict[str, float]:
    """``"seed"``, a preset name, or ``"group=lr,group=lr"`` -> ``{group: lr}`` for known groups.

    Raises:
        ConfigError: a malformed entry, a rate that is not a positive number, an unknown group,
            or a preset that does not fit this backbone.
    """
    text = text.strip()
    if text in ("seed", *LR_PRESETS):
        names = [text] if text != "seed" else list(LR_PRESETS)
        for preset in names:
            table = LR_PRESETS[preset]
            if set(table) == set(groups):
                return dict(table)
        raise ConfigError(
            f"--lr-groups preset {text!r} does not fit this backbone, whose groups are "
            f"{', '.join(groups)}. Presets: seed-resnet (ResNets), seed-lite (EfficientNet-Lite); "
            "or give rates as group=lr,... ."
        )
    out: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        try:
            rate = float(value) if sep else float("nan")
        except ValueError:
            rate = float("nan")
        if not sep or not key or not (rate > 0 and math.isfinite(rate)):
            raise ConfigError(
                f"Malformed --lr-groups entry {part!r} in {text!r}: expected group=rate with a "
                f"positive number, e.g. 'stem=1e-4,{groups[-1]}=1e-2', or a preset "
                f"({', '.join(['seed', *LR_PRESETS])})."
            )
        canon = _canonical(key, groups)
        if canon is None:
            raise _unknown_group(key, groups, "--lr-groups")
        if canon in out:
            raise ConfigError(f"--lr-groups names group {canon!r} twice in {text!r}; give each group once.")
        out[canon] = rate
    if not out:
        raise ConfigError(f"--lr-groups {text!r} names no group; give group=rate,... or a preset name.")
    return out


def resolve_rates(
    groups: Sequence[str], lr: float, lr_groups: str | None = None, layer_decay: float | None = None
) -> dict[str, float]:
    """The learning rate of every group (groups ordered input to output, ``head`` last).

    Groups a ``lr_groups`` list does not name get ``lr``; with ``layer_decay`` the head gets
    ``lr`` and each group one place further from it ``layer_decay`` times the next one's rate.
    """
    if lr_groups is not None:
        named = parse_lr_groups(lr_groups, groups)
        return {g: named.get(g, lr) for g in groups}
    if layer_decay is not None:
        n = len(groups)
        return {g: lr * layer_decay ** (n - 1 - i) for i, g in enumerate(groups)}
    return {g: lr for g in groups}


def _trainable_groups(strategy: str, groups: Sequence[str], trainable_from: str | None) -> list[str]:
    body = [g for g in groups if g != HEAD_GROUP]
    if strategy == "frozen":
        return [HEAD_GROUP]
    if strategy == "full":
        return list(groups)
    if trainable_from is None:
        start = len(body) // 2
    else:
        canon = _canonical(trainable_from, groups)
        if canon is None:
            raise _unknown_group(trainable_from, groups, "--trainable-from")
        start = groups.index(canon)
    return list(groups[start:])


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


def build_optimizer(
    model: "FinetuneModel",
    groups: Sequence[tuple[str, list[str]]],
    rates: dict[str, float],
    trainable: Sequence[str],
    optimizer: str = "sgd",
    weight_decay: float = 1e-4,
    train_bn: bool = False,
) -> torch.optim.Optimizer:
    """Freeze what does not train and build the optimizer with one param group per (group, decay).

    Each ``optimizer.param_groups`` entry carries ``"group"`` (its name) and ``"lr"`` (its rate).
    With ``train_bn``, BatchNorm parameters of frozen groups train too, at their group's rate.
    """
    params = dict(model.named_parameters())
    bn_params = {
        f"{n}.{pn}" for n, m in model.named_modules() if _is_bn(m) for pn, _ in m.named_parameters(recurse=False)
    }
    opt_groups = []
    for gname, pnames in groups:
        train_all = gname in trainable
        chosen = [p for p in pnames if train_all or (train_bn and p in bn_params)]
        for p in pnames:
            params[p].requires_grad_(p in chosen)
        decay = [params[p] for p in chosen if not _no_decay(p, params[p])]
        nodecay = [params[p] for p in chosen if _no_decay(p, params[p])]
        for plist, wd in ((decay, weight_decay), (nodecay, 0.0)):
            if plist:
                opt_groups.append({"params": plist, "lr": rates[gname], "weight_decay": wd, "group": gname})
    if not opt_groups:
        raise ConfigError("No parameter is trainable with these settings; check --strategy and --trainable-from.")
    if optimizer == "sgd":
        return torch.optim.SGD(opt_groups, lr=opt_groups[0]["lr"], momentum=0.9)
    return torch.optim.AdamW(opt_groups, lr=opt_groups[0]["lr"])


def _frozen_bn_modules(model: nn.Module, trainable_params: set[str]) -> list[nn.Module]:
    """BatchNorm layers none of whose parameters train: they stay in eval mode."""
    out = []
    for n, m in model.named_modules():
        if _is_bn(m):
            own = [f"{n}.{pn}" for pn, _ in m.named_parameters(recurse=False)]
            if not any(p in trainable_params for p in own):
                out.append(m)
    return out


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class FinetuneModel(ImageEmbedder):
    """uint8 NHWC RGB images -> class logits: the backbone's embedder plus a linear head."""

    def __init__(self, features: nn.Module, head: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__(Normalize(tuple(mean), tuple(std)), features)
        self.head = head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _logits(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """Forward pass, under autocast when ``amp`` is set (CUDA)."""
    if amp is None:
        return model(x)
    with torch.autocast(x.device.type, dtype=amp):
        return model(x)


def _fold_affine(fn: Callable[[torch.Tensor], torch.Tensor], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W, b of an affine map R^dim -> R^C, evaluated in float64 at 0 and the unit vectors."""
    with torch.no_grad():
        x = torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64)])
        y = fn(x).double()
    b = y[0]
    w = (y[1:] - b).T.contiguous()
    return w, b


def _head_from_probe(path: str | os.PathLike, backbone: Backbone, classes: list[str]) -> tuple[nn.Linear, dict[str, Any]]:
    """A Linear equal to a fitted linear head bundle (standardisation folded in) for LP-FT."""
    from .bundle import load_bundle

    bundle = load_bundle(path)
    if bundle.kind != "head":
        raise BundleError(
            f"--init-head {str(path)!r} is a {bundle.kind!r} bundle; LP-FT needs a linear head made by "
            "'featbank fit --head linear'."
        )
    ident = bundle.backbone
    if bundle.classes != classes:
        raise BundleError(
            f"--init-head {str(path)!r} was fitted on classes {bundle.classes}, but DATA has classes "
            f"{classes}. Fit the probe on a cache of the same data ('featbank extract DATA' then "
            "'featbank fit --head linear')."
        )
    if ident.get("embed_dim") != backbone.embed_dim:
        raise BundleError(
            f"--init-head {str(path)!r} expects {ident.get('embed_dim')}-d embeddings but backbone "
            f"{backbone.name!r} gives {backbone.embed_dim}-d. Pass --backbone {ident.get('backbone')}."
        )
    if ident.get("weights_sha256") != backbone.weights_sha256 or ident.get("transform") != backbone.preprocess.to_dict():
        raise BundleError(
            f"--init-head {str(path)!r} was fitted on embeddings of backbone {ident.get('backbone')!r} "
            f"(weights {ident.get('weights')!r}, sha256 {str(ident.get('weights_sha256'))[:12]}...), not "
            f"of {backbone.name!r} (weights {backbone.weights!r}, sha256 {backbone.weights_sha256[:12]}...). "
            "Use the same --backbone/--weights as the cache the probe was fitted on."
        )
    est = bundle.load_head()
    dim, n_classes = backbone.embed_dim, len(classes)
    module = None
    if hasattr(est, "to_torch"):
        try:
            module = est.to_torch()
        except Exception:  # noqa: BLE001 - fall back to reading the probabilities
            module = None
    if module is not None:
        module = copy.deepcopy(module).double().eval()
        w, b = _fold_affine(module, dim)
    else:
        # Any head whose probabilities are a softmax of an affine map (logistic regression,
        # binary included): log-ratios to class 0 are affine and recover the logits exactly.
        def logits(x: torch.Tensor) -> torch.Tensor:
            p = torch.from_numpy(np.asarray(bundle.predict_proba(x.numpy()), dtype=np.float64))
            lp = torch.log(p.clamp_min(1e-300))
            return lp - lp[:, :1]

        w, b = _fold_affine(logits, dim)
    if w.shape != (n_classes, dim):
        raise BundleError(
            f"--init-head {str(path)!r} gives {tuple(w.shape)} logits weights; expected ({n_classes}, {dim}). "
            "LP-FT needs a linear head made by 'featbank fit --head linear'."
        )
    head = nn.Linear(dim, n_classes)
    with torch.no_grad():
        head.weight.copy_(w.float())
        head.bias.copy_(b.float())
    # The folded head must reproduce the probe: check on embedding-like inputs.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, dim, generator=gen, dtype=torch.float64).abs()
    with torch.no_grad():
        mine = torch.softmax(head.double()(x), 1).numpy()
    head.float()
    ref = np.asarray(bundle.predict_proba(x.float().numpy()), dtype=np.float64)
    err = float(np.abs(mine - ref).max())
    if not err < 1e-4:
        raise BundleError(
            f"--init-head {str(path)!r} is not linear in the embeddings (folded head differs from the "
            f"probe by {err:.2g}). LP-FT needs a linear head made by 'featbank fit --head linear'."
        )
    return head, {"path": str(Path(path).resolve()), "bundle_id": bundle.bundle_id,
                  "estimator": bundle.head_info.get("estimator"), "fold_max_abs_error": err}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _resized_crop_box(w: int, h: int, scale: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawn from ``rng``: (left, top, right, bottom)."""
    area = w * h
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return left, top, left + cw, top + ch
    in_ratio = w / h
    if in_ratio < 3 / 4:
        cw, ch = w, int(round(w / (3 / 4)))
    elif in_ratio > 4 / 3:
        ch, cw = h, int(round(h * (4 / 3)))
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


class _ImageSet:
    """Map-style dataset. Train items are keyed ``(epoch, i)`` and augmented with a generator
    seeded by (seed, epoch, i); eval items are keyed ``i`` and get the backbone's eval transform."""

    def __init__(self, root: Path, paths: list[str], labels: np.ndarray, cfg: PreprocessConfig,
                 train: bool, seed: int = 0, crop_scale: tuple[float, float] = (0.25, 1.0), hflip: bool = True,
                 vflip: bool = False, rot90: bool = False):
        self.root, self.paths, self.labels, self.cfg = root, paths, labels, cfg
        self.train, self.seed, self.crop_scale, self.hflip = train, seed, crop_scale, hflip
        self.vflip, self.rot90 = vflip, rot90

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Any) -> tuple[np.ndarray | None, int, str]:
        from PIL import Image

        epoch, i = key if self.train else (0, key)
        try:
            img = load_image(self.root / self.paths[i])
            if not self.train:
                return preprocess_image(img, self.cfg), int(self.labels[i]), ""
            rng = np.random.default_rng((self.seed, epoch, i))
            box = _resized_crop_box(img.width, img.height, self.crop_scale, rng)
            h, w = self.cfg.input_size
            resample = getattr(Image.Resampling, self.cfg.interpolation.upper())
            out = img.resize((w, h), resample=resample, box=box)
            if self.hflip and rng.random() < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.vflip and rng.random() < 0.5:
                out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
            if self.rot90 and w == h:
                k = int(rng.integers(0, 4))
                if k:
                    out = out.transpose((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                         Image.Transpose.ROTATE_270)[k - 1])
            return np.asarray(out, dtype=np.uint8), int(self.labels[i]), ""
        except ImageReadError as e:
            return None, -100, f"{self.paths[i]}: {e.reason}"


class _Collate:
    def __init__(self, cfg: PreprocessConfig):
        self.shape = (*cfg.input_size, 3)

    def __call__(self, items: list[tuple[np.ndarray | None, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        batch = np.zeros((len(items), *self.shape), np.uint8)
        for j, (arr, _, _) in enumerate(items):
            if arr is not None:
                batch[j] = arr
        labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
        return torch.from_numpy(batch), labels, [it[2] for it in items if it[2]]


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    order = np.random.default_rng((seed, 10_000 + epoch)).permutation(n)
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:  # a batch of one breaks BatchNorm in train mode
        chunks[-2] = np.concatenate([chunks[-2], chunks[-1]])
        chunks.pop()
    return [[(epoch, int(i)) for i in c] for c in chunks]


@dataclass
class _Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_source: str


def _split(index: Any, val_split: float, seed: int) -> _Split:
    labels, splits, classes = index.labels, index.splits, index.classes
    if index.layout == "splits":
        train = np.flatnonzero(splits == 0)
        val = np.flatnonzero(splits == 1)
        test = np.flatnonzero(splits == 2)
        source = "val folder"
    else:
        train, val, test = np.arange(len(labels)), np.array([], np.int64), np.array([], np.int64)
        source = ""
    if len(val) == 0:
        rng = np.random.default_rng(seed)
        pool, keep = train, []
        held = []
        for c in range(len(classes)):
            rows = pool[labels[pool] == c]
            rows = rows[rng.permutation(len(rows))]
            k = int(round(len(rows) * val_split)) if len(rows) >= 2 else 0
            k = max(1, k) if len(rows) >= 2 else 0
            held.append(rows[:k])
            keep.append(rows[k:])
        val = np.sort(np.concatenate(held)) if held else np.array([], np.int64)
        train = np.sort(np.concatenate(keep)) if keep else train
        source = f"stratified {val_split:.0%} of train (seed {seed})"
    for name, rows in (("train", train), ("val", val)):
        missing = [classes[c] for c in range(len(classes)) if not np.any(labels[rows] == c)]
        if missing:
            raise DatasetError(
                f"The {name} split of '{index.root}' has no image of class(es) {missing} "
                f"({len(rows)} image(s) in it). Every class needs images in train and val: add images, "
                "or remove the class folder" + (", or lower --val-split." if name == "train" else ".")
            )
    return _Split(train, val, test, source)


# --------------------------------------------------------------------------------------------
# Metrics and plots
# --------------------------------------------------------------------------------------------


def _metrics(y: np.ndarray, pred: np.ndarray, n_classes: int, loss: float | None = None) -> dict[str, Any]:
    ok = y >= 0
    y, pred = y[ok], pred[ok]
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (y, pred), 1)
    support = cm.sum(1)
    recall = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    out: dict[str, Any] = {
        "n_samples": int(len(y)),
        "accuracy": float((y == pred).mean()) if len(y) else float("nan"),
        "balanced_accuracy": float(np.nanmean(recall)) if np.any(support > 0) else float("nan"),
        "per_class_recall": [None if math.isnan(r) else float(r) for r in recall],
        "confusion_matrix": cm.tolist(),
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _plot_learning_curve(history: list[dict[str, Any]], metric: str, best_epoch: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(ep, [h["val_loss"] for h in history], "o-", label="val")
    a1.set_xlabel("epoch"), a1.set_ylabel("cross-entropy"), a1.legend()
    a2.plot(ep, [h["train_accuracy"] for h in history], "o-", label="train accuracy")
    a2.plot(ep, [h[f"val_{metric}"] for h in history], "o-", label=f"val {metric}")
    a2.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best (epoch {best_epoch})")
    a2.set_xlabel("epoch"), a2.set_ylim(0, 1.02), a2.legend(fontsize=8)
    fig.suptitle("featbank finetune: learning curve")
    return _png(fig)


def _plot_confusion(cm: np.ndarray, classes: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * n))
    ax.imshow(cm, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure: the file is not usable
        raise ConfigError(
            f"Cannot read checkpoint {str(path)!r} ({type(e).__name__}: {e}). Start over with --overwrite."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{str(path)!r} is not a featbank finetune checkpoint. Start over with --overwrite.")
    return ckpt


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneReport:
    """What :func:`finetune` did.

    Attributes:
        path: the bundle folder written.
        epochs_run: epochs trained (fewer than asked when early stopping fired).
        best_epoch: the epoch whose weights were kept (best validation metric).
        val: metrics of the kept weights on the validation split; ``test``: on the test split
            (empty when DATA has none).
        history: one dict per epoch (train/val loss and metrics, seconds, images/s, lr).
        groups: ``[{name, n_params, trainable, lr}]``.
        resumed_from: the epoch a resumed run started after (0 for a fresh run).
        seconds_per_epoch: mean wall time of an epoch (training + validation).
        skipped: unreadable images ``(path, reason)`` (ignored in loss and metrics).
        cache_seconds: time spent computing the frozen groups' outputs (``cache_frozen``), else 0.
    """

    path: Path
    epochs_run: int
    best_epoch: int
    val: dict[str, Any]
    test: dict[str, Any]
    history: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    resumed_from: int = 0
    seconds_per_epoch: float = 0.0
    skipped: list[str] = field(default_factory=list)
    device: str = "cpu"
    cache_seconds: float = 0.0

    def summary(self) -> str:
        m = self.test or self.val
        which = "test" if self.test else "val"
        cached = f", frozen groups cached in {self.cache_seconds:.1f} s" if self.cache_seconds else ""
        return (
            f"Fine-tuned {self.epochs_run} epoch(s) on {self.device} ({self.seconds_per_epoch:.1f} s/epoch{cached}), "
            f"best epoch {self.best_epoch}: {which} accuracy {m['accuracy']:.4f}, balanced accuracy "
            f"{m['balanced_accuracy']:.4f}."
        )


def _default_out(data: Path, settings: FinetuneSettings) -> Path:
    import re

    bb = Path(settings.backbone).name if Path(settings.backbone).is_dir() else settings.backbone
    name = f"{data.name}-{bb}-{settings.strategy}" + ("-lpft" if settings.init_head else "")
    return Path("models") / re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def _autocast(device: torch.device) -> tuple[Any, torch.dtype | None]:
    if device.type != "cuda":
        return None, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dtype, dtype


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate memory" in str(e))


def _loader(dataset: _ImageSet, batches: Any, num_workers: int, cfg: PreprocessConfig, pin: bool) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_Collate(cfg),
                      pin_memory=pin, persistent_workers=False)


def _evaluate(model: FinetuneModel, loader: Any, device: torch.device, amp: torch.dtype | None,
              n_classes: int, skipped: list[str]) -> tuple[dict[str, Any], np.ndarray]:
    model.eval()
    losses, ys, logits_all = [], [], []
    with torch.inference_mode():
        for x, y, bad in loader:
            skipped.extend(bad)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = _logits(model, x, amp).float()
            losses.append(nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum").item())
            ys.append(y.cpu().numpy())
            logits_all.append(logits.cpu().numpy())
    y = np.concatenate(ys)
    logits = np.concatenate(logits_all)
    n = max(1, int((y >= 0).sum()))
    return _metrics(y, logits.argmax(1), n_classes, loss=sum(losses) / n), logits


@dataclass
class _Trunk:
    """What ``cache_frozen`` needs: the split, the views, the suffix+head model and the caches."""

    split: Any
    views: list[tuple[int, bool]]
    model: nn.Module
    train: Any = None
    val: Any = None
    seconds: float = 0.0


class _SuffixModel(nn.Module):
    def __init__(self, suffix: nn.Module, head: nn.Module):
        super().__init__()
        self.suffix, self.head = suffix, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.suffix(x))


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _plan_trunk(model: FinetuneModel, bb: Backbone, cfg: FinetuneSettings, n_train: int, n_val: int) -> _Trunk:
    """Split the model at its first trainable unit and check that the caches fit in memory."""
    from .trunk import TrunkCache, available_memory, split_features, view_group

    h, w = bb.preprocess.input_size
    split = split_features(model.features, (h, w), bb.name)
    views = view_group(cfg.hflip, cfg.vflip, cfg.rot90, square=(h == w))
    need = TrunkCache.nbytes(n_train, len(views), split.out_shape) + TrunkCache.nbytes(n_val, 1, split.out_shape)
    avail = available_memory()
    if avail is not None and need > 0.7 * avail:
        raise ConfigError(
            f"--cache-frozen needs {_size(need)} of memory for {n_train} training image(s) x {len(views)} "
            f"view(s) of {tuple(split.out_shape)} float16 outputs (and the val images), and "
            f"{_size(avail)} are available. Use a later --trainable-from (smaller outputs), fewer "
            "views (drop --rot90/--vflip), or drop --cache-frozen."
        )
    return _Trunk(split=split, views=views, model=_SuffixModel(split.suffix, model.head))


def _fill_trunk(trunk: _Trunk, model: FinetuneModel, eval_set: "_ImageSet", split: "_Split", batch_size: int,
                workers: int, cfg: PreprocessConfig, pin: bool, dev: torch.device, amp: torch.dtype | None,
                skipped: list[str], progress: bool) -> None:
    """Run the frozen prefix over every training image under every view, and over val once."""
    from tqdm.auto import tqdm

    from .trunk import TrunkCache

    shape = trunk.split.out_shape
    t0 = time.perf_counter()
    n_views = len(trunk.views)
    bar = tqdm(total=len(split.train) * n_views + len(split.val), unit="img", disable=not progress,
               desc=f"caching {trunk.split.prefix_names[0]}..{trunk.split.prefix_names[-1]}",
               mininterval=0.1 if sys.stderr.isatty() else 10.0, dynamic_ncols=True, file=sys.stderr)

    def embed_input(x: torch.Tensor) -> torch.Tensor:
        x = model.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x

    for name, rows, views in (("train", split.train, trunk.views), ("val", split.val, trunk.views[:1])):
        cache = TrunkCache(len(rows), views, shape)
        batches = [list(map(int, rows[i:i + batch_size])) for i in range(0, len(rows), batch_size)]

        def step(n: int, bad: list[str], k: int = len(views)) -> None:
            skipped.extend(bad)
            bar.update(n * k)

        cache.fill(_loader(eval_set, batches, workers, cfg, pin), embed_input, trunk.split.prefix, dev, amp, step)
        setattr(trunk, name, cache)
    bar.close()
    trunk.seconds = time.perf_counter() - t0


def finetune(
    data: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    num_workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    **settings: Any,
) -> FinetuneReport:
    """Fine-tune a backbone plus a new linear head on an image folder and write a bundle.

    Args:
        data: an ImageFolder (``DATA/<class>/<image>``) or ``DATA/{train,val,test}/<class>/...``.
            Without a val folder, a stratified ``val_split`` of train is held out (seeded).
        out: the bundle folder (default ``models/<data>-<backbone>-<strategy>[-lpft]``).
            Checkpoints go to ``<out>.ckpt/checkpoint.pt`` and are removed once the bundle is written.
        device: ``auto``, ``cpu`` or ``cuda`` (autocast bf16/fp16 on CUDA; channels_last on CPU).
        num_workers: image-decoding processes (default: CPU count - 1, at most 8; 0 on CPU
            when there are two cores or fewer).
        resume: continue the checkpoint of an interrupted run with the same settings.
        overwrite: replace an existing bundle and discard an existing checkpoint.
        progress: a tqdm bar per epoch (loss, metric, images/s) on stderr.
        on_epoch_end: called as ``on_epoch_end(epoch, history_row)`` after each checkpoint.
        **settings: the fields of :class:`FinetuneSettings` (``backbone``, ``strategy``,
            ``trainable_from``, ``lr``, ``lr_groups``, ``layer_decay``, ``optimizer``,
            ``init_head``, ``epochs``, ``batch_size``, ``seed``, ...).

    Returns:
        A :class:`FinetuneReport`.

    Raises:
        ConfigError: a bad setting, unknown group, malformed ``lr_groups``, a checkpoint of other
            settings, out of memory (with a smaller batch size to try), an existing bundle.
        DatasetError: a missing folder, or a class absent from train or val.
        BundleError: an ``init_head`` that does not fit the data or backbone.
        Interrupted: Ctrl-C; the last finished epoch's checkpoint is kept for ``resume``.

    Example:
        >>> featbank.finetune("data/elpv", backbone="resnet50", strategy="partial",
        ...                   trainable_from="layer3", lr_groups="seed-resnet", epochs=10)
    """
    from .data import scan_folder
    from .extraction import resolve_device

    cfg = _settings_from(settings)
    dev = torch.device(resolve_device(device))
    index = scan_folder(data, require_labels=True)
    split = _split(index, cfg.val_split, cfg.seed)
    out_path = Path(out).expanduser() if out is not None else _default_out(index.root, cfg)
    ckpt_path = out_path.with_name(out_path.name + ".ckpt") / "checkpoint.pt"
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them.")
    if not resume and not overwrite:
        if ckpt_path.exists():
            raise ConfigError(
                f"A checkpoint of an earlier run exists at {str(ckpt_path)!r}. Pass --resume to continue "
                "it, or --overwrite to start over (it is discarded)."
            )
        if out_path.exists():
            raise ConfigError(f"{str(out_path)!r} already exists. Pass --overwrite to replace it, or choose another --out.")
    if resume and not ckpt_path.exists():
        raise ConfigError(f"--resume: there is no checkpoint at {str(ckpt_path)!r} to continue. Run without --resume.")

    with warnings.catch_warnings():
        warnings.simplefilter("always", RandomWeightsWarning)
        bb = load_backbone(cfg.backbone, cfg.weights, cfg.weights_file)
    classes = list(index.classes)
    n_classes = len(classes)
    groups = [(g, [f"features.{p}" for p in ps]) for g, ps in param_groups(bb)]
    if any(g == HEAD_GROUP for g, _ in groups):
        raise ConfigError(f"Backbone {bb.name!r} has a parameter group named 'head', which featbank reserves.")

    torch.manual_seed(cfg.seed)
    init_info = None
    if cfg.init_head is not None:
        head, init_info = _head_from_probe(cfg.init_head, bb, classes)
    else:
        head = nn.Linear(bb.embed_dim, n_classes)
    features = bb.features
    model = FinetuneModel(features, head, bb.preprocess.mean, bb.preprocess.std)
    groups.append((HEAD_GROUP, [f"head.{p}" for p, _ in head.named_parameters()]))
    names = [g for g, _ in groups]
    rates = resolve_rates(names, cfg.resolved_lr, cfg.lr_groups, cfg.layer_decay)
    trainable = _trainable_groups(cfg.strategy, names, cfg.trainable_from)
    optimizer = build_optimizer(model, groups, rates, trainable, cfg.optimizer, cfg.resolved_weight_decay, cfg.train_bn)
    trainable_params = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_bn = _frozen_bn_modules(model, trainable_params)
    pcount = dict((n, p.numel()) for n, p in model.named_parameters())
    group_rows = [
        {"name": g, "modules": None, "n_params": int(sum(pcount[p] for p in ps)), "trainable": g in trainable,
         "n_trainable": int(sum(pcount[p] for p in ps if p in trainable_params)), "lr": rates[g]}
        for g, ps in groups
    ]
    from .backbones import _group_modules

    for row, (g, ps) in zip(group_rows, groups):
        row["modules"] = _group_modules(model, ps)

    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    model.to(dev)
    amp, _ = _autocast(dev)
    scaler = torch.amp.GradScaler("cuda", enabled=(amp == torch.float16))

    train_set = _ImageSet(index.root, index.paths, index.labels, bb.preprocess, True, cfg.seed, cfg.crop_scale, cfg.hflip,
                           cfg.vflip, cfg.rot90)
    eval_set = _ImageSet(index.root, index.paths, index.labels, bb.preprocess, False)
    trunk = _plan_trunk(model, bb, cfg, len(split.train), len(split.val)) if cfg.cache_frozen else None
    epoch_batches = [_batches(len(split.train), cfg.batch_size, cfg.seed, 0)]
    steps_per_epoch = len(epoch_batches[0])
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(min(cfg.warmup_epochs * steps_per_epoch, 0.2 * total_steps)))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    data_digest = _digest([index.paths, index.labels.tolist(), index.splits.tolist(), index.fingerprints.tolist(),
                           split.train.tolist(), split.val.tolist()])
    hashed = {**asdict(cfg), "backbone_identity": bb.identity(), "data": data_digest,
              "init_head_id": init_info["bundle_id"] if init_info else None, "classes": classes}
    hashed["crop_scale"] = list(cfg.crop_scale)
    settings_hash = _digest(hashed)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "metric": -1.0, "loss": float("inf"), "model": None}
    bad_epochs, start_epoch, stopped = 0, 0, False
    if resume:
        ckpt = _load_checkpoint(ckpt_path)
        if ckpt.get("settings_hash") != settings_hash:
            diff = _settings_diff(ckpt.get("settings", {}), json.loads(json.dumps(hashed, default=str)))
            raise ConfigError(
                f"--resume: the checkpoint {str(ckpt_path)!r} was made with other settings ("
                + "; ".join(diff[:6]) + "). Rerun with the original settings, or pass --overwrite to "
                "start over (the checkpoint is discarded)."
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        history = list(ckpt["history"])
        best = dict(ckpt["best"])
        bad_epochs, start_epoch, stopped = int(ckpt["bad_epochs"]), int(ckpt["epoch"]), bool(ckpt["stopped"])
    elif overwrite and ckpt_path.exists():
        ckpt_path.unlink()

    workers = num_workers if num_workers is not None else _default_workers(dev.type)
    pin = dev.type == "cuda"
    val_batches = [list(map(int, split.val[i:i + cfg.batch_size])) for i in range(0, len(split.val), cfg.batch_size)]
    skipped: list[str] = []
    train_rows = split.train
    from tqdm.auto import tqdm

    if trunk is not None:
        _fill_trunk(trunk, model, eval_set, split, cfg.batch_size, workers, bb.preprocess, pin, dev, amp, skipped, progress)

    def train_batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        order = _batches(len(train_rows), cfg.batch_size, cfg.seed, epoch)
        if trunk is None:
            batches = [[(e, int(train_rows[i])) for e, i in b] for b in order]
            yield from _loader(train_set, batches, workers, bb.preprocess, pin)
            return
        # One view per image and epoch, drawn from a generator of (seed, epoch): resumable.
        rng = np.random.default_rng((cfg.seed, 20_000 + epoch))
        for b in order:
            rows = np.array([i for _, i in b], np.int64)
            x, y = trunk.train.batch(rows, rng.integers(0, len(trunk.views), len(rows)), dev)
            yield x, y, []

    def val_metrics() -> dict[str, Any]:
        if trunk is None:
            loader = _loader(eval_set, val_batches, workers, bb.preprocess, pin)
            return _evaluate(model, loader, dev, amp, n_classes, skipped)[0]
        starts = range(0, len(split.val), cfg.batch_size)
        rows = [np.arange(i, min(i + cfg.batch_size, len(split.val))) for i in starts]
        loader = ((*trunk.val.batch(r, np.zeros(len(r), np.int64), dev), []) for r in rows)
        return _evaluate(trunk.model, loader, dev, amp, n_classes, skipped)[0]

    def run_epoch(epoch: int) -> dict[str, Any]:
        model.train()
        if trunk is not None:
            trunk.model.train()
        for m in frozen_bn:
            m.eval()
        if cfg.resolved_bn_stats == "frozen":
            for m in model.modules():
                if _is_bn(m):
                    m.eval()
        if cfg.strategy == "frozen" and not cfg.train_bn:
            model.features.eval()
        t0 = time.perf_counter()
        seen, loss_sum, correct, n_ok = 0, 0.0, 0, 0
        bar = tqdm(total=len(train_rows), unit="img", desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
                   mininterval=0.1 if sys.stderr.isatty() else 10.0,
                   leave=True, dynamic_ncols=True, file=sys.stderr)
        params = [p for p in model.parameters() if p.requires_grad]
        net = model if trunk is None else trunk.model
        for x, y, bad in train_batches(epoch):
            skipped.extend(bad)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            logits = _logits(net, x, amp)
            loss = nn.functional.cross_entropy(logits.float(), y, ignore_index=-100)
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"Training diverged at epoch {epoch} (loss is {loss.item()}). Lower --lr (now "
                    f"{cfg.resolved_lr:g}) or --lr-groups rates; earlier checkpoints are intact."
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            k = int((y >= 0).sum())
            loss_sum += loss.item() * k
            correct += int((logits.argmax(1) == y).sum())
            n_ok += k
            seen += len(y)
            bar.update(len(y))
            bar.set_postfix(loss=f"{loss_sum / max(1, n_ok):.4f}", acc=f"{correct / max(1, n_ok):.3f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.1f}")
        train_seconds = time.perf_counter() - t0
        val = val_metrics()
        seconds = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_sum / max(1, n_ok):.4f}", **{f"val_{cfg.metric}": f"{val[cfg.metric]:.4f}"},
                        img_s=f"{seen / train_seconds:.1f}")
        bar.close()
        return {
            "epoch": epoch, "train_loss": loss_sum / max(1, n_ok), "train_accuracy": correct / max(1, n_ok),
            "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_balanced_accuracy": val["balanced_accuracy"],
            "lr_head": optimizer.param_groups[-1]["lr"], "seconds": seconds, "images_per_second": seen / train_seconds,
        }

    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            if stopped:
                break
            row = run_epoch(epoch)
            history.append(row)
            metric, vloss = row[f"val_{cfg.metric}"], row["val_loss"]
            if metric > best["metric"] + 1e-12 or (abs(metric - best["metric"]) <= 1e-12 and vloss < best["loss"]):
                best = {"epoch": epoch, "metric": metric, "loss": vloss,
                        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                bad_epochs = 0
            else:
                bad_epochs += 1
            stopped = cfg.patience > 0 and bad_epochs >= cfg.patience
            _save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "featbank_version": __version__,
                "settings": json.loads(json.dumps(hashed, default=str)), "settings_hash": settings_hash,
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "rng": _rng_state(), "history": history, "best": best, "bad_epochs": bad_epochs, "stopped": stopped,
            })
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
    except KeyboardInterrupt:
        done = history[-1]["epoch"] if history else start_epoch
        raise Interrupted(
            f"Interrupted: {done} epoch(s) are checkpointed in {str(ckpt_path)!r}. Run the same command "
            "with --resume to continue."
        ) from None
    except Exception as e:
        if _is_oom(e):
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            raise ConfigError(
                f"Out of memory on {dev.type} with --batch-size {cfg.batch_size}. Try --batch-size "
                f"{max(1, cfg.batch_size // 2)} (and --resume to keep finished epochs; the batch size "
                "is part of the settings, so a smaller one starts over with --overwrite)."
            ) from None
        raise

    # Final metrics with the best weights.
    model.load_state_dict(best["model"])
    val, _ = _evaluate(model, _loader(eval_set, val_batches, workers, bb.preprocess, pin), dev, amp, n_classes, skipped)
    test: dict[str, Any] = {}
    if len(split.test):
        test_batches = [list(map(int, split.test[i:i + cfg.batch_size])) for i in range(0, len(split.test), cfg.batch_size)]
        test, _ = _evaluate(model, _loader(eval_set, test_batches, workers, bb.preprocess, pin), dev, amp, n_classes, skipped)

    model.to("cpu")
    from safetensors.torch import save as st_save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights_bytes = st_save(state, metadata={"format": "featbank-finetuned", "classes": json.dumps(classes)})
    identity = {
        "backbone": f"finetuned:{bb.name}",
        "weights": "finetuned",
        "weights_sha256": hashlib.sha256(weights_bytes).hexdigest(),
        "transform": bb.preprocess.to_dict(),
        "embed_dim": bb.embed_dim,
    }
    spe = float(np.mean([h["seconds"] for h in history])) if history else 0.0
    if trunk is None:
        train_aug: dict[str, Any] = {"random_resized_crop": {"scale": list(cfg.crop_scale), "ratio": [0.75, 4 / 3]},
                                     "hflip": cfg.hflip, "vflip": cfg.vflip, "rot90": cfg.rot90}
        trunk_info = None
    else:
        from .trunk import VIEW_NAMES

        train_aug = {"views": [VIEW_NAMES[v] for v in trunk.views], "of": "backbone eval transform",
                     "one_view_per_image_and_epoch": True}
        trunk_info = {"prefix": trunk.split.prefix_names, "suffix": trunk.split.suffix_names,
                      "output_shape": list(trunk.split.out_shape), "dtype": "float16",
                      "n_views": len(trunk.views), "seconds": trunk.seconds}
    metrics = {"val": val, "test": test, "best_epoch": best["epoch"], "metric": cfg.metric}
    manifest: dict[str, Any] = {
        "kind": "finetuned",
        "classes": classes,
        "backbone": identity,
        "cache_key": None,
        "finetune": {
            "file": "model.safetensors",
            "base_backbone": bb.identity(),
            "base_family": bb.family,
            "strategy": cfg.strategy,
            "trainable_from": trainable[0] if cfg.strategy == "partial" else None,
            "train_bn": cfg.train_bn,
            "bn_stats": cfg.resolved_bn_stats,
            "groups": group_rows,
            "rates": rates,
            "lr": cfg.resolved_lr, "lr_groups": cfg.lr_groups, "layer_decay": cfg.layer_decay,
            "optimizer": cfg.optimizer, "momentum": 0.9 if cfg.optimizer == "sgd" else None,
            "weight_decay": cfg.resolved_weight_decay,
            "init_head": init_info,
            "epochs": cfg.epochs, "epochs_run": len(history), "best_epoch": best["epoch"],
            "batch_size": cfg.batch_size, "seed": cfg.seed, "metric": cfg.metric, "patience": cfg.patience,
            "schedule": {"type": "cosine", "warmup_steps": warmup, "total_steps": total_steps, "clip_grad": cfg.clip_grad},
            "augmentation": {"train": train_aug, "eval": "backbone eval transform (resize shorter side + centre crop)"},
            "cache_frozen": trunk_info,
            "head": {"type": "linear", "in_features": bb.embed_dim, "out_features": n_classes},
            "device": dev.type, "precision": str(amp).replace("torch.", "") if amp else "float32",
            "seconds_per_epoch": spe,
            "settings_hash": settings_hash,
            "history": history,
        },
        "metrics": metrics,
        "data": {"root": str(index.root), "layout": index.layout, "n_train": int(len(split.train)),
                 "n_val": int(len(split.val)), "n_test": int(len(split.test)), "val_source": split.val_source},
        "validation": {"root": str(index.root), "paths": [index.paths[i] for i in split.val]},
    }
    cm_src, cm_name = (test, "test") if test else (val, "val")
    files = {
        "model.safetensors": weights_bytes,
        "metrics.json": (json.dumps({**metrics, "history": history}, indent=2) + "\n").encode(),
        "learning_curve.png": _plot_learning_curve(history, cfg.metric, best["epoch"]),
        "confusion_matrix.png": _plot_confusion(np.asarray(cm_src["confusion_matrix"]), classes,
                                                f"{cm_name} ({cm_src['n_samples']} images)"),
    }
    from .bundle import save_bundle

    save_bundle(out_path, manifest, files, overwrite=True)
    try:
        ckpt_path.unlink()
        ckpt_path.parent.rmdir()
    except OSError:
        pass
    return FinetuneReport(
        path=out_path, epochs_run=len(history), best_epoch=best["epoch"], val=val, test=test, history=history,
        groups=group_rows, resumed_from=start_epoch, seconds_per_epoch=spe, skipped=sorted(set(skipped)),
        device=dev.type, cache_seconds=trunk.seconds if trunk is not None else 0.0,
    )


def _default_workers(device: str) -> int:
    n = os.cpu_count() or 1
    if device == "cpu":
        return 0 if n <= 2 else min(8, n - 1)
    return min(12, n)


# --------------------------------------------------------------------------------------------
# Using a fine-tuned bundle
# --------------------------------------------------------------------------------------------


def load_finetuned_model(path: str | os.PathLike) -> tuple[Backbone, nn.Linear]:
    """The fine-tuned network of a bundle: ``(backbone, head)``.

    ``backbone.embedder()`` maps uint8 NHWC images to embeddings, ``head`` maps embeddings to
    logits (``softmax`` gives the bundle's probabilities, columns in ``manifest["classes"]``).
    ``backbone.identity()`` keys caches on the sha256 of ``model.safetensors``.

    Raises:
        BundleError: not a fine-tuned bundle, weights missing or changed (sha256), or weights
            that do not fit the recorded base architecture.
    """
    from safetensors.torch import load as st_load

    from .bundle import load_bundle

    bundle = load_bundle(path)
    if bundle.kind != "finetuned":
        raise BundleError(
            f"{str(path)!r} is a {bundle.kind!r} bundle (a head fitted on cached embeddings), not a fine-tuned "
            "network; as --backbone pass the backbone it was fitted on, or a bundle made by 'featbank finetune'."
        )
    ft = bundle.manifest["finetune"]
    wfile = bundle.path / ft["file"]
    data = wfile.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if sha != ft.get("sha256"):
        raise BundleError(
            f"{str(wfile)!r} does not match the sha256 in its manifest (got {sha[:12]}..., recorded "
            f"{str(ft.get('sha256'))[:12]}...): the file was changed or corrupted. Re-create the bundle."
        )
    try:
        state = st_load(data)
    except Exception as e:  # noqa: BLE001
        raise BundleError(f"Cannot read {str(wfile)!r}: {e}. Re-create the bundle.") from None
    base = ft["base_backbone"]
    with warnings.catch_warnings():
        # The architecture only: every tensor is replaced by the fine-tuned weights below.
        warnings.simplefilter("ignore", RandomWeightsWarning)
        arch = load_backbone(base["backbone"], weights="random")
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    classes = bundle.classes
    head = nn.Linear(arch.embed_dim, len(classes))
    try:
        arch.features.load_state_dict(feats, strict=True)
        head.load_state_dict(head_state, strict=True)
    except RuntimeError as e:
        raise BundleError(
            f"The weights in {str(wfile)!r} do not fit {base['backbone']!r}: {str(e).splitlines()[0]}"
        ) from None
    bb = Backbone(
        name=bundle.backbone.get("backbone", f"finetuned:{base['backbone']}"),
        weights="finetuned",
        weights_sha256=sha,
        preprocess=PreprocessConfig.from_dict(base["transform"]),
        embed_dim=arch.embed_dim,
        features=arch.features.eval(),
        classifier=head.eval(),
        family="finetuned",
        embedding_note=f"pooled features of {base['backbone']} fine-tuned by featbank ({ft['strategy']})",
        extra={"bundle": str(bundle.path), "classes": classes, "base": base, "base_family": ft.get("base_family")},
    )
    return bb, head


def load_finetuned_backbone(path: str | os.PathLike) -> Backbone:
    """A fine-tuned bundle as a :class:`Backbone` (``load_backbone(models/<name>)`` lands here)."""
    return load_finetuned_model(path)[0]


@dataclass
class FinetunedPredictions:
    """Output of :func:`predict_images`.

    Attributes:
        proba: ``(n_images, n_classes)`` float64 probabilities; rows of unreadable images are NaN.
        ok: ``(n_images,)`` bool, False where the image could not be read.
        skipped: ``[(path, reason)]`` of the unreadable images.
        classes: column names of ``proba``.
    """

    proba: np.ndarray
    ok: np.ndarray
    skipped: list[tuple[str, str]]
    classes: list[str]


def predict_images(
    bundle: Any,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int | None = None,
    progress: bool = False,
) -> FinetunedPredictions:
    """Class probabilities of image files under a fine-tuned bundle (eval transform, no cache).

    Args:
        bundle: a bundle folder or a :class:`featbank.bundle.Bundle` of kind ``"finetuned"``.
        paths: image files.

    Returns:
        :class:`FinetunedPredictions` (softmax of the network's logits, float64).
    """
    from .extraction import resolve_device

    path = bundle.path if hasattr(bundle, "path") else Path(bundle)
    bb, head = load_finetuned_model(path)
    dev = torch.device(resolve_device(device))
    model = FinetuneModel(bb.features, head, bb.preprocess.mean, bb.preprocess.std).eval().to(dev)
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    amp, _ = _autocast(dev)
    plist = [Path(p) for p in paths]
    ds = _ImageSet(Path("/"), [str(p.resolve()) for p in plist], np.zeros(len(plist), np.int64), bb.preprocess, False)
    batches = [list(range(i, min(i + batch_size, len(plist)))) for i in range(0, len(plist), batch_size)]
    workers = num_workers if num_workers is not None else _default_workers(dev.type)
    proba = np.full((len(plist), len(bb.extra["classes"])), np.nan)
    ok = np.zeros(len(plist), bool)
    skipped: list[tuple[str, str]] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(plist), unit="img", desc="predict", disable=not progress, file=sys.stderr)
    with torch.inference_mode():
        for b, (x, y, _bad) in zip(batches, _loader(ds, batches, workers, bb.preprocess, dev.type == "cuda")):
            good = (y >= 0).numpy()
            if amp is not None:
                with torch.autocast(dev.type, dtype=amp):
                    logits = model(x.to(dev))
            else:
                logits = model(x.to(dev))
            p = torch.softmax(logits.double(), 1).cpu().numpy()
            rows = np.asarray(b)
            proba[rows[good]] = p[good]
            ok[rows[good]] = True
            for r in rows[~good]:
                try:
                    load_image(plist[r])
                    reason = "unreadable"
                except ImageReadError as e:
                    reason = e.reason
                skipped.append((str(paths[r]), reason))
            bar.update(len(b))
    bar.close()
    return FinetunedPredictions(proba=proba, ok=ok, skipped=skipped, classes=list(bb.extra["classes"]))


class _CallableModule(type(sys)):
    """Keeps ``featbank.finetune(...)`` working once this submodule is imported (the import binds
    the module to the package attribute ``finetune``, shadowing the re-exported function)."""

    def __call__(self, *args: Any, **kwargs: Any) -> FinetuneReport:
        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
