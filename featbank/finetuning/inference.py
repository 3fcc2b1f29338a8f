"""Using a fine-tuned bundle: as a backbone, as a classifier over image files."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._device import autocast_dtype, default_num_workers, resolve_device
from .._network import finetuned_network
from ..backbones import Backbone
from ..images import ImageReadError, load_image
from .data import _ImageSet, image_loader
from .model import FinetuneModel

__all__ = ["FinetunedPredictions", "load_finetuned_backbone", "load_finetuned_model", "predict_images"]


def load_finetuned_model(path: Any) -> tuple[Backbone, torch.nn.Linear]:
    """The fine-tuned network of a bundle (a folder or an opened Bundle): ``(backbone, head)``.

    ``backbone.embedder()`` maps uint8 NHWC images to embeddings, ``head`` maps embeddings to
    logits (``softmax`` gives the bundle's probabilities, columns in ``manifest["classes"]``).

    Raises:
        BundleError: not a fine-tuned bundle, weights missing or changed (sha256), or weights
            that do not fit the recorded base architecture.
    """
    from ..bundle import Bundle, load_bundle

    return finetuned_network(path if isinstance(path, Bundle) else load_bundle(path))


def load_finetuned_backbone(path: str | os.PathLike) -> Backbone:
    """A fine-tuned bundle as a :class:`Backbone` (as ``featbank.load_backbone(models/<name>)``)."""
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
    bb, head = load_finetuned_model(bundle)
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
        for b, (x, y, _bad) in zip(batches, image_loader(ds, batches, workers, bb.preprocess, dev.type == "cuda")):
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
