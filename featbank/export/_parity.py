"""The parity check: the exported graph against featbank's PyTorch pipeline on real images."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..images import IMAGE_EXTENSIONS, ImageReadError, load_and_preprocess
from ..runtime import INPUT_NAME, OUTPUT_NAMES
from ..sources import is_image_file

if TYPE_CHECKING:
    from ..bundles import Bundle

__all__ = [
    "check_parity",
    "DEFAULT_ATOL",
    "PARITY_BATCH_SIZES",
    "MAX_CHECK_IMAGES",
    "collect_images",
    "parity_json_path",
    "torch_batches",
    "load_batch",
]

#: Export fails when any probability differs from PyTorch's by more than this.
DEFAULT_ATOL = 1e-4
PARITY_BATCH_SIZES = (1, 7)
#: At most this many images are used by the parity check (the first ones, in a fixed order).
MAX_CHECK_IMAGES = 64


def collect_images(bundle: Bundle, check_images: Sequence[str | os.PathLike] | str | os.PathLike | None,
                    limit: int) -> tuple[list[Path], str]:
    if check_images is not None:
        items = [check_images] if isinstance(check_images, (str, os.PathLike)) else list(check_images)
        paths: list[Path] = []
        for item in items:
            p = Path(item)
            if p.is_dir():
                paths += sorted(f for f in p.rglob("*") if is_image_file(f))
            elif p.is_file():
                paths.append(p)
            else:
                raise ConfigError(f"--check-images {str(p)!r} does not exist. Pass image files or a folder of images.")
        if not paths:
            raise ConfigError(
                f"--check-images {', '.join(map(str, items))} holds no image files "
                f"({', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, ...)."
            )
        return paths[:limit], "check-images"
    if not bundle.validation_paths():  # fit --auto / --cv: every train+val image was in a fold
        return _cache_images(bundle, limit), "the fit's cache, test images first"
    val = [p for p in bundle.validation_paths() if p.is_file()]
    return val[:limit], "validation"


def _cache_images(bundle: Bundle, limit: int) -> list[Path]:
    """The images of the cache a head bundle was fitted on (``training.cache``) that are on this machine,
    its test split first (in the cache's order): the check images of a bundle that records no validation
    images. [] when the path is not a regular file, the cache is unreadable (the verified reader refuses
    it), or it is not the bundle's (another ``cache_key``); the caller then says what to pass instead."""
    from ..cache import open_cache
    from ..errors import FeatbankError

    path = (bundle.manifest.get("training") or {}).get("cache")
    if not isinstance(path, str) or not Path(path).is_file():  # never a FIFO or a device
        return []
    try:
        with open_cache(path) as c:
            if not c.cache_key or c.cache_key != bundle.manifest.get("cache_key"):
                return []
            order = np.argsort(~c.split_mask("test"), kind="stable")  # test rows first
            out = []
            for r in order:
                p = Path(c.abspath(c.paths[r]))
                if p.is_file():
                    out.append(p)
                    if len(out) == limit:
                        break
            return out
    except (FeatbankError, OSError):
        return []


def check_parity(
    onnx_path: str | os.PathLike,
    reference: Callable[[np.ndarray], np.ndarray],
    batch: np.ndarray,
    *,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    atol: float = DEFAULT_ATOL,
    input_name: str = INPUT_NAME,
) -> dict[str, Any]:
    """Compare an exported graph with a reference on the same preprocessed pixels (or embeddings).

    Args:
        onnx_path: the ONNX file.
        reference: uint8 NHWC batch -> (N, C) probabilities (featbank's PyTorch pipeline).
        batch: (N, H, W, 3) uint8 images.
        batch_sizes: the graph is run with exactly these batch sizes (the last chunk is padded
            with repeated images, whose outputs are dropped).
        atol: the largest allowed |Δprobability|.
        input_name: the graph's input (``embeddings`` for a head-only graph).

    Returns:
        ``passed``, ``max_abs_diff``, ``top1_agreement``, per batch size figures, ``n_images``.
        A top-1 disagreement where the reference's two best classes are within ``atol`` of each
        other counts as a near tie (agreement), and is counted in ``n_near_ties``.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = np.asarray(reference(batch), dtype=np.float64)
    n = len(batch)
    ref_top = ref.argmax(axis=1)
    srt = np.sort(ref, axis=1)
    gap = srt[:, -1] - srt[:, -2] if ref.shape[1] > 1 else np.full(n, np.inf)
    per: dict[str, Any] = {}
    worst, agree_all, ties_all, labels_ok = 0.0, 1.0, 0, True
    for bs in batch_sizes:
        probs, labels = [], []
        for start in range(0, n, bs):
            idx = np.arange(start, start + bs) % n
            p, lab = sess.run(list(OUTPUT_NAMES), {input_name: np.ascontiguousarray(batch[idx])})
            keep = min(bs, n - start)
            probs.append(p[:keep])
            labels.append(lab[:keep])
        p = np.concatenate(probs).astype(np.float64)
        lab = np.concatenate(labels)
        diff = float(np.abs(p - ref).max())
        same = lab == ref_top
        ties = int(np.sum(~same & (gap <= atol)))
        agree = float(np.mean(same | (gap <= atol)))
        label_is_argmax = bool(np.array_equal(lab, p.argmax(axis=1)))
        per[str(bs)] = {"max_abs_diff": diff, "top1_agreement": agree, "n_near_ties": ties,
                        "label_is_argmax": label_is_argmax, "label_dtype": str(lab.dtype)}
        worst, agree_all = max(worst, diff), min(agree_all, agree)
        ties_all = max(ties_all, ties)
        labels_ok = labels_ok and label_is_argmax and lab.dtype == np.int64
    return {
        "passed": bool(worst <= atol and agree_all == 1.0 and labels_ok),
        "n_images": n,
        "batch_sizes": list(batch_sizes),
        "atol": atol,
        "max_abs_diff": worst,
        "top1_agreement": agree_all,
        "n_near_ties": ties_all,
        "per_batch_size": per,
    }


def parity_json_path(out: Path) -> Path:
    return out.with_name((out.stem if out.suffix == ".onnx" else out.name) + ".parity.json")


def torch_batches(fn: Callable[[Any], Any], x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    import torch

    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            outs.append(fn(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).float().numpy())
    return np.concatenate(outs)


def load_batch(paths: Sequence[Path], cfg: Any) -> tuple[np.ndarray, list[list[str]]]:
    arrays, skipped = [], []
    for p in paths:
        try:
            arrays.append(load_and_preprocess(p, cfg))
        except ImageReadError as e:
            skipped.append([str(p), e.reason])
    if not arrays:
        raise ConfigError(
            f"None of the {len(paths)} check image(s) could be read (first: {skipped[0][0]}: {skipped[0][1]}). "
            "Pass readable images with --check-images."
        )
    return np.stack(arrays), skipped
