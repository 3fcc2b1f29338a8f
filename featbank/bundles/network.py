"""A fine-tuned bundle as a network: its base architecture with the fine-tuned weights.

Here rather than in :mod:`featbank.finetuning` so that opening a bundle (``predict``, ``export``,
``extract --backbone models/<name>``) needs only :mod:`featbank.backbones`: the layers are
backbones <- bundle (+ this) <- finetuning, with no cycle.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

from torch import nn

from ..backbones import Backbone, load_backbone
from ..errors import BundleError, ConfigError, RandomWeightsWarning
from ..images import PreprocessConfig

__all__ = ["finetuned_network"]


def finetuned_network(bundle: Any) -> tuple[Backbone, nn.Linear]:
    """The fine-tuned network of an opened :class:`featbank.bundles.Bundle`: ``(backbone, head)``.

    ``backbone.embedder()`` maps uint8 NHWC images to embeddings, ``head`` maps embeddings to
    logits (``softmax`` gives the bundle's probabilities, columns in ``manifest["classes"]``).
    ``backbone.identity()`` keys caches on the sha256 of ``model.safetensors``.

    Raises:
        BundleError: not a fine-tuned bundle, weights missing or changed (sha256), or weights
            that do not fit the recorded base architecture.
    """
    from safetensors.torch import load as st_load

    path = bundle.path
    if bundle.kind != "finetuned":
        raise BundleError(
            f"{str(path)!r} is a {bundle.kind!r} bundle (a head fitted on cached embeddings), not a fine-tuned "
            "network; as --backbone pass the backbone it was fitted on, or a bundle made by 'featbank finetune'."
        )
    ft = bundle.manifest["finetune"]
    wfile = bundle.path / ft["file"]
    data = bundle.read_weights()  # confined to the bundle folder, sha256-checked
    sha = hashlib.sha256(data).hexdigest()
    try:
        state = st_load(data)
    except Exception as e:  # noqa: BLE001
        raise BundleError(f"Cannot read {str(wfile)!r}: {e}. Re-create the bundle.") from None
    base = ft["base_backbone"]
    with warnings.catch_warnings():
        # The architecture only: every tensor is replaced by the fine-tuned weights below.
        warnings.simplefilter("ignore", RandomWeightsWarning)
        try:  # a name, never a folder (the manifest reader refuses paths): no bundle loads itself
            arch = load_backbone(base["backbone"].removeprefix("finetuned:"), weights="random")
        except ConfigError as e:
            raise BundleError(f"Bundle {str(bundle.path)!r}: its base backbone cannot be built: {e}") from None
    try:
        preprocess = PreprocessConfig.from_dict(base["transform"])
    except Exception as e:  # noqa: BLE001 - a manifest value of the wrong shape
        raise BundleError(f"Bundle {str(bundle.path)!r}: field 'finetune.base_backbone.transform' is not a "
                          f"transform ({type(e).__name__}: {e}). Re-create the bundle.") from None
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
        preprocess=preprocess,
        embed_dim=arch.embed_dim,
        features=arch.features.eval(),
        classifier=head.eval(),
        family="finetuned",
        embedding_note=f"pooled features of {base['backbone']} fine-tuned by featbank ({ft.get('strategy')})",
        extra={"bundle": str(bundle.path), "classes": classes, "base": base, "base_family": ft.get("base_family")},
    )
    return bb, head
