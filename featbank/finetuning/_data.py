"""Training and evaluation images: seeded augmentation, batches, the train/val/test split."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._device import quiet_worker_init
from ..errors import DatasetError
from ..images import RESAMPLE, ImageReadError, PreprocessConfig, load_image, preprocess_image
from ..splits import n_holdout, stratified_holdout

if TYPE_CHECKING:
    from ..bundles import Bundle
    from ..sources import ImageIndex

__all__ = ["Augmentation", "ImageSet", "DataSplit", "ProbeHoldout", "shuffled_batches", "split_index", "probe_holdout",
           "probe_overlap_note", "image_loader"]

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


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation: a random resized crop (``crop_scale`` of the area), flips, quarter turns,
    drawn from a generator seeded by ``(seed, epoch, image)``."""

    seed: int = 0
    crop_scale: tuple[float, float] = (0.25, 1.0)
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False


class ImageSet:
    """Map-style dataset. With ``augment``, items are keyed ``(epoch, i)`` and augmented with a
    generator seeded by (seed, epoch, i); without, items are keyed ``i`` and get the backbone's eval
    transform."""

    def __init__(self, root: Path, paths: list[str], labels: np.ndarray, cfg: PreprocessConfig,
                 augment: Augmentation | None = None):
        self.root, self.paths, self.labels, self.cfg = root, paths, labels, cfg
        self.augment = augment
        self.train = augment is not None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Any) -> tuple[np.ndarray | None, int, str]:
        from PIL import Image

        epoch, i = key if self.train else (0, key)
        try:
            img = load_image(self.root / self.paths[i], window=self.cfg.window)
            if not self.train:
                return preprocess_image(img, self.cfg), int(self.labels[i]), ""
            aug = self.augment
            rng = np.random.default_rng((aug.seed, epoch, i))
            box = _resized_crop_box(img.width, img.height, aug.crop_scale, rng)
            h, w = self.cfg.input_size
            out = img.resize((w, h), resample=RESAMPLE[self.cfg.interpolation], box=box)
            if aug.hflip and rng.random() < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if aug.vflip and rng.random() < 0.5:
                out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
            if aug.rot90 and w == h:
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


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    order = np.random.default_rng((seed, 10_000 + epoch)).permutation(n)
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:  # a batch of one breaks BatchNorm in train mode
        chunks[-2] = np.concatenate([chunks[-2], chunks[-1]])
        chunks.pop()
    return [[(epoch, int(i)) for i in c] for c in chunks]


@dataclass
class DataSplit:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_source: str


@dataclass
class ProbeHoldout:
    """What the LP-FT starting head (``init_head``) was fitted on, as its bundle records it."""

    root: str
    val_paths: list[str]
    fitted_on: str  # "train+val" (fit's default refit) or "train" (fit --no-refit)


def probe_holdout(bundle: Bundle) -> ProbeHoldout | None:
    """From the ``init_head`` bundle (``None``: no LP-FT); other kinds are refused later."""
    if bundle is None or bundle.kind != "head":
        return None
    m = bundle.manifest
    val, training = m.get("validation") or {}, m.get("training") or {}
    if not val.get("root"):
        return None
    # Bundles written before fit recorded it were always refitted on train+val.
    return ProbeHoldout(str(val["root"]), list(val.get("paths") or []), training.get("fitted_on", "train+val"))


def _same_root(index: ImageIndex, probe: ProbeHoldout) -> bool:
    try:
        return Path(probe.root).resolve() == Path(index.root).resolve()
    except OSError:
        return False


def split_index(index: ImageIndex, val_split: float, seed: int, probe: ProbeHoldout | None = None) -> DataSplit:
    """Train / val / test rows of DATA: its val folder; else the LP-FT probe's validation images
    (``probe``, when it was fitted on a cache of this folder); else a stratified ``val_split``."""
    labels, splits, classes = index.labels, index.splits, index.classes
    if index.layout == "splits":
        train = np.flatnonzero(splits == 0)
        val = np.flatnonzero(splits == 1)
        test = np.flatnonzero(splits == 2)
        source = "val folder"
    else:
        train, val, test = np.arange(len(labels)), np.array([], np.int64), np.array([], np.int64)
        source = ""
    if len(val) == 0 and probe is not None and probe.val_paths and _same_root(index, probe):
        row_of = {p: i for i, p in enumerate(index.paths)}
        held = np.intersect1d([row_of[p] for p in probe.val_paths if p in row_of], train)
        if len(held):
            val, train = held, np.setdiff1d(train, held)
            source = f"the --init-head probe's validation images ({len(held)} of {len(probe.val_paths)} found)"
    if len(val) == 0:
        counts = np.bincount(labels[train], minlength=len(classes))
        if counts[counts > 0].min(initial=2) >= 2:  # else the check below names the classes val lacks
            n_val = n_holdout(len(train), int((counts > 0).sum()), val_split)
            train, val = stratified_holdout(train, labels[train], min(n_val, len(train) - int((counts > 0).sum())), seed)
        source = f"stratified {val_split:.0%} of train (seed {seed})"
    for name, rows in (("train", train), ("val", val)):
        missing = [classes[c] for c in range(len(classes)) if not np.any(labels[rows] == c)]
        if missing:
            raise DatasetError(
                f"The {name} split of '{index.root}' has no image of class(es) {missing} "
                f"({len(rows)} image(s) in it). Every class needs images in train and val: add images, "
                "or remove the class folder" + (", or lower --val-split." if name == "train" else ".")
            )
    return DataSplit(train, val, test, source)


def probe_overlap_note(index: ImageIndex, split: DataSplit, probe: ProbeHoldout | None) -> str | None:
    """A warning when the LP-FT probe was fitted on images this run validates on."""
    if probe is None or not len(split.val) or not _same_root(index, probe):
        return None
    if probe.fitted_on == "train":
        held = set(probe.val_paths)
        seen = sum(index.paths[i] not in held for i in split.val)
    else:  # refitted on every labelled non-test image of the folder
        seen = len(split.val)
    if not seen:
        return None
    why = "fit refits on train+val by default" if probe.fitted_on != "train" else "its validation split differs from this run's"
    return (
        f"the --init-head probe was fitted on {seen} of the {len(split.val)} validation images ({why}), so the "
        "best epoch is chosen on images the starting head has seen and the validation metrics are optimistic. "
        "Fit the probe with 'featbank fit --no-refit' (and the same val folder, if DATA has one) to keep them out."
    )


def image_loader(dataset: ImageSet, batches: Any, num_workers: int, cfg: PreprocessConfig, pin: bool) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_Collate(cfg),
                      pin_memory=pin, persistent_workers=False, worker_init_fn=quiet_worker_init)
