"""Parameter groups, per-group learning rates, the network and LP-FT's head from a probe; a fine-tuned
bundle loaded as a network (a backbone, a classifier over image files)."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..backbones import HEAD_GROUP, Backbone, ImageEmbedder, Normalize
from ..errors import BundleError, ConfigError
from ._settings import GROUP_ALIASES, LR_PRESETS

if TYPE_CHECKING:
    from ..bundles import Bundle

__all__ = ["FinetuneModel", "build_optimizer", "parse_lr_groups", "resolve_rates", "trainable_groups", "is_batchnorm",
           "frozen_bn_modules", "forward_logits", "head_from_probe", "load_finetuned_backbone",
           "load_finetuned_model"]

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


def trainable_groups(strategy: str, groups: Sequence[str], trainable_from: str | None) -> list[str]:
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


def is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


def build_optimizer(
    model: FinetuneModel,
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
        f"{n}.{pn}" for n, m in model.named_modules() if is_batchnorm(m) for pn, _ in m.named_parameters(recurse=False)
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


def frozen_bn_modules(model: nn.Module, trainable_params: set[str]) -> list[nn.Module]:
    """BatchNorm layers none of whose parameters train: they stay in eval mode."""
    out = []
    for n, m in model.named_modules():
        if is_batchnorm(m):
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


def forward_logits(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
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


def head_from_probe(path: str | os.PathLike, backbone: Backbone, classes: list[str],
                    bundle: Bundle = None) -> tuple[nn.Linear, dict[str, Any]]:
    """A Linear equal to a fitted linear head bundle (standardisation folded in) for LP-FT;
    ``bundle``: that bundle already opened."""
    from ..bundles import load_bundle

    bundle = bundle if bundle is not None else load_bundle(path)
    _check_init_head(path, bundle, backbone, classes)
    dim, n_classes = backbone.embed_dim, len(classes)
    w, b = _probe_affine(bundle, dim)
    if w.shape != (n_classes, dim):
        raise BundleError(
            f"--init-head {str(path)!r} gives {tuple(w.shape)} logits weights; expected ({n_classes}, {dim}). "
            "LP-FT needs a linear head made by 'featbank fit --head linear'."
        )
    head = nn.Linear(dim, n_classes)
    with torch.no_grad():
        head.weight.copy_(w.float())
        head.bias.copy_(b.float())
    err = _fold_error(head, bundle, dim)
    if not err < 1e-4:
        raise BundleError(
            f"--init-head {str(path)!r} is not linear in the embeddings (folded head differs from the "
            f"probe by {err:.2g}). LP-FT needs a linear head made by 'featbank fit --head linear'."
        )
    return head, {"path": str(Path(path).resolve()), "bundle_id": bundle.bundle_id,
                  "estimator": bundle.head_info.get("estimator"), "fold_max_abs_error": err}


def _check_init_head(path: str | os.PathLike, bundle: Bundle, backbone: Backbone, classes: list[str]) -> None:
    """Refuse an ``--init-head`` bundle that is not a probe of this backbone's final embedding on these classes."""
    if bundle.kind != "head":
        raise BundleError(
            f"--init-head {str(path)!r} is a {bundle.kind!r} bundle; LP-FT needs a linear head made by "
            "'featbank fit --head linear'."
        )
    feats = bundle.info.features
    if feats is not None and (feats.layers != ("final",) or feats.view_pool):
        raise BundleError(
            f"--init-head {str(path)!r} reads {bundle.reads}, not the final embedding of the plain image that "
            "the network's head sees; LP-FT needs a probe fitted with 'featbank fit CACHE --head linear --no-refit' "
            "(without --layers or --pool-views)."
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


def _probe_affine(bundle: Bundle, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's logits as ``(W, b)`` over ``dim``-d embeddings: from its torch module where it has one,
    else from its probabilities (any softmax of an affine map, binary logistic regression included:
    log-ratios to class 0 are affine and recover the logits exactly)."""
    est = bundle.load_head()
    module = None
    if hasattr(est, "to_torch"):
        try:
            module = est.to_torch()
        except Exception:  # noqa: BLE001 - fall back to reading the probabilities
            module = None
    if module is not None:
        return _fold_affine(copy.deepcopy(module).double().eval(), dim)

    def logits(x: torch.Tensor) -> torch.Tensor:
        p = torch.from_numpy(np.asarray(bundle.predict_proba(x.numpy()), dtype=np.float64))
        lp = torch.log(p.clamp_min(1e-300))
        return lp - lp[:, :1]

    return _fold_affine(logits, dim)


def _fold_error(head: nn.Linear, bundle: Bundle, dim: int) -> float:
    """The largest difference of the folded head's probabilities from the probe's, on embedding-like inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, dim, generator=gen, dtype=torch.float64).abs()
    with torch.no_grad():
        mine = torch.softmax(head.double()(x), 1).numpy()
    head.float()
    ref = np.asarray(bundle.predict_proba(x.float().numpy()), dtype=np.float64)
    return float(np.abs(mine - ref).max())


# --------------------------------------------------------------------------------------------
# A fine-tuned bundle in use: its network, as a backbone (predict: featbank.inference)
# --------------------------------------------------------------------------------------------


def load_finetuned_model(path: Any) -> tuple[Backbone, torch.nn.Linear]:
    """The fine-tuned network of a bundle (a folder or an opened Bundle): ``(backbone, head)``.

    ``backbone.embedder()`` maps uint8 NHWC images to embeddings, ``head`` maps embeddings to
    logits (``softmax`` gives the bundle's probabilities, columns in ``manifest["classes"]``).

    Raises:
        BundleError: not a fine-tuned bundle, weights missing or changed (sha256), or weights
            that do not fit the recorded base architecture.
    """
    from ..bundles import Bundle, load_bundle

    return (path if isinstance(path, Bundle) else load_bundle(path)).finetuned_network()


def load_finetuned_backbone(path: str | os.PathLike) -> Backbone:
    """A fine-tuned bundle as a :class:`Backbone` (as ``featbank.load_backbone(models/<name>)``)."""
    return load_finetuned_model(path)[0]
