"""Using a fine-tuned bundle: as a backbone, as a classifier over image files."""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..backbones import Backbone, load_backbone
from ..errors import BundleError, RandomWeightsWarning
from ..images import ImageReadError, PreprocessConfig, load_image
from .data import _ImageSet
from .._device import autocast_dtype, default_num_workers, resolve_device
from .loop import _loader
from .model import FinetuneModel

__all__ = ["FinetunedPredictions", "load_finetuned_backbone", "load_finetuned_model", "predict_images"]

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

    from ..bundle import load_bundle

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
    path = bundle.path if hasattr(bundle, "path") else Path(bundle)
    bb, head = load_finetuned_model(path)
    dev = resolve_device(device)
    model = FinetuneModel(bb.features, head, bb.preprocess.mean, bb.preprocess.std).eval().to(dev)
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    amp = autocast_dtype(dev)
    plist = [Path(p) for p in paths]
    ds = _ImageSet(Path("/"), [str(p.resolve()) for p in plist], np.zeros(len(plist), np.int64), bb.preprocess, False)
    batches = [list(range(i, min(i + batch_size, len(plist)))) for i in range(0, len(plist), batch_size)]
    workers = num_workers if num_workers is not None else default_num_workers(dev, training=True)
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
