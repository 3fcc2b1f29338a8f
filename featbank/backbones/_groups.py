"""Parameter groups (for finetune: freezing, per-group learning rates, layer decay)."""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch import nn

from ..errors import RandomWeightsWarning, WeightsUnavailable
from ._factory import load_backbone
from ._registry import RANDOM, Backbone

__all__ = ["HEAD_GROUP", "param_groups", "backbone_groups", "group_modules"]

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
        for (_, prefixes), (_, out) in zip(spec, groups):
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


def param_groups(backbone: Backbone | nn.Module) -> list[tuple[str, list[str]]]:
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


def group_modules(features: nn.Module, pnames: list[str]) -> list[str]:
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


def backbone_groups(name_or_backbone: str | os.PathLike | Backbone, n_classes: int | None = None) -> dict[str, dict[str, Any]]:
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
            "modules": group_modules(bb.features, pnames),
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
