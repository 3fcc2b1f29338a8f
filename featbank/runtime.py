"""Run an exported featbank ONNX model with numpy, Pillow and onnxruntime only (no torch).

A service that only needs predictions installs ``numpy pillow onnxruntime`` and this module
(with ``featbank/images.py`` and ``featbank/errors.py``, both torch-free). The model file
carries everything else in its metadata: class names and the exact preprocessing of training.

Example:
    >>> from featbank.runtime import OnnxClassifier
    >>> clf = OnnxClassifier("models/elpv-linear.onnx")
    >>> clf.predict(["cell_0001.png"])[0]  # doctest: +SKIP
    Prediction(label='defective', index=1, probability=0.93)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
from PIL import Image

from .errors import BundleError, DatasetError
from .images import ImageReadError, PreprocessConfig, load_image, preprocess_image

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "OnnxClassifier",
    "Prediction",
    "ImageLike",
    "read_metadata",
    "image_to_pil",
]

#: metadata_props key marking a featbank model, and the format version this module reads.
FORMAT_KEY = "featbank_onnx"
FORMAT_VERSION = "1"
INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "label")
#: metadata keys every featbank ONNX model has.
REQUIRED_KEYS = (FORMAT_KEY, "classes", "preprocessing")

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclass(frozen=True)
class Prediction:
    """The most probable class of one image.

    Attributes:
        label: class name.
        index: column of the class in the probabilities (and in ``OnnxClassifier.classes``).
        probability: its probability.
    """

    label: str
    index: int
    probability: float


def _session(path: Path, providers: Sequence[str] | None, options: Any) -> Any:
    import onnxruntime as ort

    if not path.is_file():
        raise BundleError(f"ONNX model {str(path)!r} does not exist. Export one with 'featbank export MODEL'.")
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # noqa: BLE001 - any load failure means the file is not a usable model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(
            f"Cannot load {str(path)!r} as an ONNX model ({first}). Pass a file written by 'featbank export'."
        ) from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX model file (string -> string), read with onnxruntime.

    Raises:
        BundleError: the file is missing or not an ONNX model.
    """
    return dict(_session(Path(path), None, None).get_modelmeta().custom_metadata_map)


def _check_metadata(path: Path, meta: dict[str, str]) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise BundleError(
            f"{str(path)!r} is an ONNX model but not a featbank model: its metadata lacks "
            f"{', '.join(missing)}. featbank runs only files written by 'featbank export' (they carry "
            "class names and preprocessing); export the bundle with 'featbank export MODEL'."
        )
    if meta[FORMAT_KEY] != FORMAT_VERSION:
        raise BundleError(
            f"{str(path)!r} has featbank ONNX format {meta[FORMAT_KEY]!r}; this featbank reads format "
            f"{FORMAT_VERSION!r}. Upgrade featbank or re-export the model with this version."
        )


def image_to_pil(image: ImageLike) -> Image.Image:
    """An RGB Pillow image from a path, a Pillow image of any mode, or an array.

    Arrays are decoded pixels in RGB order: ``(H, W)`` grey, ``(H, W, 1|3|4)``; ``uint8`` as is,
    ``uint16`` scaled by 1/257, ``bool`` to 0/255, floats on the 0..1 scale when their maximum is
    at most 1, else on the 0..255 scale. Alpha is dropped (as at training time).

    Raises:
        DatasetError: the file cannot be read, or the array has an unusable shape or dtype.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else _rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            return load_image(image)
        except ImageReadError as e:
            raise DatasetError(f"Cannot read image {str(image)!r}: {e.reason}.") from None
    raise DatasetError(
        f"An image must be a file path, a PIL.Image or a numpy array. Got {type(image).__name__} instead."
    )


def _rgb(img: Image.Image) -> Image.Image:
    # Same mode conversion as load_image (16-bit scaled, palettes with transparency, alpha dropped).
    from .images import _to_uint8_rgb

    return _to_uint8_rgb(img)


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    a = arr
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
        raise DatasetError(
            f"An image array must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4). Got {arr.shape} instead."
        )
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer):
        f = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if np.issubdtype(a.dtype, np.floating) and f.size and f.max() <= 1.0 else 1.0
        a = np.clip(np.rint(f * scale), 0, 255).astype(np.uint8)
    else:
        raise DatasetError(f"Cannot use an image array of dtype {arr.dtype}; pass uint8 RGB pixels.")
    a = np.ascontiguousarray(a)
    if a.ndim == 2:
        return Image.fromarray(a, mode="L").convert("RGB")
    if a.shape[2] == 4:
        return Image.fromarray(a, mode="RGBA").convert("RGB")
    return Image.fromarray(a, mode="RGB")


class OnnxClassifier:
    """An exported featbank model: images in, class probabilities out.

    Args:
        path: an ``.onnx`` file written by ``featbank export``.
        providers: onnxruntime execution providers (default: CPU).
        session_options: an ``onnxruntime.SessionOptions`` (threads, optimisation level).

    Attributes:
        path: the model file.
        classes: class names; column ``i`` of :meth:`predict_proba` is ``classes[i]``.
        preprocess_config: resize / crop / interpolation / mean / std used at training time.
        metadata: every ``metadata_props`` entry (strings).
        input_size: ``(height, width)`` of the model input.

    Raises:
        BundleError: the file is missing, not an ONNX model, or not a featbank model.

    Example:
        >>> clf = OnnxClassifier("model.onnx")
        >>> probs = clf.predict_proba(["a.jpg", "b.png"])   # (2, n_classes) float32
        >>> [p.label for p in clf.predict(["a.jpg"])]
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        providers: Sequence[str] | None = None,
        session_options: Any = None,
    ):
        self.path = Path(path)
        self.session = _session(self.path, providers, session_options)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        _check_metadata(self.path, self.metadata)
        try:
            self.classes: list[str] = [str(c) for c in json.loads(self.metadata["classes"])]
            self.preprocess_config = PreprocessConfig.from_dict(json.loads(self.metadata["preprocessing"]))
        except (ValueError, KeyError, TypeError) as e:
            raise BundleError(
                f"{str(self.path)!r} has unreadable featbank metadata ({type(e).__name__}: {e}); re-export it."
            ) from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if INPUT_NAME not in inputs or not set(OUTPUT_NAMES) <= outputs:
            raise BundleError(
                f"{str(self.path)!r} has inputs {sorted(inputs)} and outputs {sorted(outputs)}; a featbank "
                f"model has input {INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)}. Re-export it."
            )
        self.input_size: tuple[int, int] = self.preprocess_config.input_size

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def preprocess(self, image: ImageLike) -> np.ndarray:
        """One image -> ``(H, W, 3)`` uint8 at the model's input size, exactly as at training time."""
        try:
            return preprocess_image(image_to_pil(image), self.preprocess_config)
        except ImageReadError as e:  # e.g. an extreme aspect ratio, found once the image is known
            where = str(image) if isinstance(image, (str, os.PathLike)) else type(image).__name__
            raise DatasetError(f"Cannot read image {where!r}: {e.reason}.") from None

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph on preprocessed pixels.

        Args:
            batch: ``(N, H, W, 3)`` uint8 RGB at :attr:`input_size` (see :meth:`preprocess`).

        Returns:
            ``(probabilities (N, C) float32, label (N,) int64)``.
        """
        x = np.asarray(batch)
        h, w = self.input_size
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (h, w, 3):
            raise DatasetError(
                f"The model input must be uint8 of shape (N, {h}, {w}, 3) (NHWC RGB). Got {x.dtype} "
                f"{x.shape} instead; use OnnxClassifier.preprocess or predict_proba on raw images."
            )
        probs, label = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(x)})
        return probs, label

    def predict_proba(self, images: Iterable[ImageLike], batch_size: int = 32) -> np.ndarray:
        """``(N, C)`` float32 probabilities of images (paths, PIL images or arrays, any size/mode).

        Raises:
            DatasetError: an image cannot be read (the message names it).
        """
        if batch_size < 1:
            raise DatasetError(f"The 'batch_size' parameter must be >= 1. Got {batch_size} instead.")
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        out: list[np.ndarray] = []
        batch: list[np.ndarray] = []
        for image in images:
            batch.append(self.preprocess(image))
            if len(batch) == batch_size:
                out.append(self.run(np.stack(batch))[0])
                batch = []
        if batch:
            out.append(self.run(np.stack(batch))[0])
        if not out:
            return np.zeros((0, self.n_classes), dtype=np.float32)
        return np.concatenate(out)

    def predict(self, images: Iterable[ImageLike], batch_size: int = 32) -> list[Prediction]:
        """The most probable class of each image, as :class:`Prediction` (label, index, probability)."""
        probs = self.predict_proba(images, batch_size=batch_size)
        idx = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
        return [Prediction(self.classes[int(i)], int(i), float(p[i])) for i, p in zip(idx, probs, strict=True)]

    def __repr__(self) -> str:
        return (
            f"OnnxClassifier({str(self.path)!r}, backbone={self.metadata.get('backbone')!r}, "
            f"n_classes={self.n_classes}, input_size={self.input_size})"
        )
