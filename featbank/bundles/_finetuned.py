"""A fine-tuned bundle's network, built from plain data: its folder, the manifest's ``finetune``
section, the weights file's bytes (already confined to the folder and sha256-checked by the bundle)
and its classes. :meth:`featbank.bundles.Bundle.finetuned_network` hands them over; this module needs
torch and safetensors, so the bundle imports it only when a fine-tuned network is asked for.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..backbones import Backbone, load_backbone
from ..errors import BundleError, ConfigError, RandomWeightsWarning
from ..images import PreprocessConfig

__all__ = ["build_finetuned"]


def build_finetuned(path: Path, finetune: dict[str, Any], data: bytes, classes: list[str],
                    name: str | None) -> tuple[Backbone, nn.Linear]:
    """``(backbone, head)`` of the fine-tuned bundle at ``path`` (its ``name`` as the backbone's name).

    Raises:
        BundleError: weights that cannot be read or do not fit the recorded base architecture.
    """
    from safetensors.torch import load as st_load

    wfile = path / finetune["file"]
    try:
        state = st_load(data)
    except Exception as e:  # noqa: BLE001
        raise BundleError(f"Cannot read {str(wfile)!r}: {e}. Re-create the bundle.") from None
    base = finetune["base_backbone"]
    arch, preprocess = _base_architecture(path, base)
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    head = nn.Linear(arch.embed_dim, len(classes))
    try:
        arch.features.load_state_dict(feats, strict=True)
        head.load_state_dict(head_state, strict=True)
    except RuntimeError as e:
        raise BundleError(
            f"The weights in {str(wfile)!r} do not fit {base['backbone']!r}: {str(e).splitlines()[0]}"
        ) from None
    bb = Backbone(
        name=name or f"finetuned:{base['backbone']}",
        weights="finetuned",
        weights_sha256=hashlib.sha256(data).hexdigest(),
        preprocess=preprocess,
        embed_dim=arch.embed_dim,
        features=arch.features.eval(),
        classifier=head.eval(),
        family="finetuned",
        embedding_note=f"pooled features of {base['backbone']} fine-tuned by featbank ({finetune.get('strategy')})",
        extra={"bundle": str(path), "classes": classes, "base": base, "base_family": finetune.get("base_family")},
    )
    return bb, head


def _base_architecture(path: Path, base: dict) -> tuple[Backbone, PreprocessConfig]:
    """The base network, randomly initialised (every tensor is replaced by the fine-tuned weights), and
    the transform the manifest records for it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        try:  # a name, never a folder (the manifest reader refuses paths): no bundle loads itself
            arch = load_backbone(base["backbone"].removeprefix("finetuned:"), weights="random")
        except ConfigError as e:
            raise BundleError(f"Bundle {str(path)!r}: its base backbone cannot be built: {e}") from None
    try:
        return arch, PreprocessConfig.from_dict(base["transform"])
    except Exception as e:  # noqa: BLE001 - a manifest value of the wrong shape
        raise BundleError(f"Bundle {str(path)!r}: field 'finetune.base_backbone.transform' is not a "
                          f"transform ({type(e).__name__}: {e}). Re-create the bundle.") from None
