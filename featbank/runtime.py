"""Run an exported featbank ONNX model with numpy, Pillow and onnxruntime only (no torch).

A service that only needs predictions installs ``numpy pillow onnxruntime`` and this module
(with ``featbank/images.py`` and ``featbank/errors.py``, both torch-free). The model file
carries everything else in its metadata: class names and the exact preprocessing of training.
That metadata is validated when the file is opened (sizes, class list, types, agreement with the
graph's input and outputs; see :func:`parse_metadata`), so a damaged or crafted file is a
``BundleError`` naming the field, never a multi-GB resize or a wrong class name.

Example:
    >>> from featbank.runtime import OnnxClassifier
    >>> clf = OnnxClassifier("models/elpv-linear.onnx")
    >>> clf.predict(["cell_0001.png"])[0]  # doctest: +SKIP
    Prediction(label='defective', index=1, probability=0.93)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .errors import BundleError, DatasetError
from .images import RESAMPLE, ImageReadError, PreprocessConfig, check_resizable, load_image, preprocess_image
from .windowing import parse_window

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "OnnxClassifier",
    "Prediction",
    "ImageLike",
    "read_metadata",
    "parse_metadata",
    "image_to_pil",
    "MIN_CLASSES",
    "MAX_CLASSES",
    "MAX_IMAGE_SIDE",
    "INPUT_KINDS",
    "IMAGE_METADATA",
    "input_kind",
]

#: metadata_props key marking a featbank model, and the format version this module reads.
FORMAT_KEY = "featbank_onnx"
FORMAT_VERSION = "1"
INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "label")
#: metadata keys every featbank ONNX model has.
REQUIRED_KEYS = (FORMAT_KEY, "classes", "preprocessing")
#: metadata ``input``: what the graph's ``images`` input takes. ``preprocessed``: pixels already resized and
#: centre-cropped to ``preprocessing.input_size``; ``raw``: a decoded RGB image of any size (the resize and
#: crop are inside the graph). Files without the key (featbank before it existed) are ``preprocessed``.
#: ``embeddings``: a head alone (``export --head-only``), input ``embeddings`` (N, D) float32; not run by OnnxClassifier.
INPUT_KINDS = ("preprocessed", "raw", "embeddings")
#: The image-input conventions of ONNX metadata (Windows ML's ``Image.*`` keys), the only values featbank writes.
IMAGE_METADATA = {"Image.BitmapPixelFormat": "Rgb8", "Image.ColorSpaceGamma": "SRGB",
                  "Image.NominalPixelRange": "NominalRange_0_255"}
#: keys of the ``preprocessing`` JSON the runtime needs.
PREPROCESSING_KEYS = ("input_size", "resize_size", "interpolation", "mean", "std")
RESAMPLING_FILTERS = tuple(sorted(RESAMPLE))

# Bounds on what an ONNX file's metadata may ask for. A classifier needs two classes (as `fit`
# does); 100,000 is far above any image task and keeps a crafted list from costing memory. Image
# sides (the crop and the resize of the shorter side) of 1 to 4096 pixels cover every backbone
# (32..1024 px crops) while a crafted `resize_size: 60000` cannot make each image a multi-GB array.
MIN_CLASSES = 2
MAX_CLASSES = 100_000
MAX_IMAGE_SIDE = 4096

ImageLike = str | os.PathLike | Image.Image | np.ndarray


@dataclass(frozen=True)
class Prediction:
    """The prediction for one image: its most probable class (and the top k), or why there is none.

    One type for :meth:`OnnxClassifier.predict` and :func:`featbank.predict`.

    Attributes:
        label: class name (``None`` when the image could not be used).
        index: column of the class in the probabilities (and in the model's ``classes``).
        probability: its probability.
        path: the image file (:func:`featbank.predict`; ``None`` for an image passed in memory).
        top_k: the ``k`` most probable ``(class, probability)``, best first (:func:`featbank.predict`).
        error: why the image could not be used (then ``label``, ``index`` and ``probability`` are None).
    """

    label: str | None
    index: int | None
    probability: float | None
    path: str | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def __repr__(self) -> str:
        # label, index, probability always; path, top_k and error when set (OnnxClassifier.predict sets none).
        shown = [f"{k}={v!r}" for k, v in (("label", self.label), ("index", self.index), ("probability", self.probability),
                                           ("path", self.path), ("top_k", self.top_k), ("error", self.error))
                 if k in ("label", "index", "probability") or v]
        return f"Prediction({', '.join(shown)})"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``featbank predict --json`` prints."""
        return {"path": self.path, "label": self.label, "probability": self.probability,
                "top_k": [{"label": name, "probability": p} for name, p in self.top_k], "error": self.error}


def _session(path: Path, providers: Sequence[str] | None, options: ort.SessionOptions | None) -> ort.InferenceSession:
    import onnxruntime as ort

    if path.is_dir():
        raise BundleError(f"{str(path)!r} is a folder, not an ONNX model file. Pass the .onnx file 'featbank "
                          "export' wrote (a model bundle folder is run with 'featbank predict BUNDLE IMAGES').")
    if path.exists() and not path.is_file():
        raise BundleError(f"{str(path)!r} is not a regular file; pass the .onnx file 'featbank export' wrote.")
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

    The values are returned as stored, unchecked; :func:`parse_metadata` validates featbank's own.

    Raises:
        BundleError: the file is missing or not an ONNX model.
    """
    return dict(_session(Path(path), None, None).get_modelmeta().custom_metadata_map)


def _invalid(path: Path, field: str, value: Any, allowed: str) -> BundleError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return BundleError(
        f"{str(path)!r} has an invalid featbank metadata field {field!r}: {shown}; {allowed}. The file is "
        "damaged or was not written by 'featbank export'; re-export the model with 'featbank export MODEL'."
    )


def _json_field(path: Path, meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except ValueError as e:
        raise _invalid(path, key, meta[key], f"it must be JSON ({e})") from None


def _int_field(path: Path, field: str, value: Any, low: int, high: int, what: str) -> int:
    # bool is an int subclass in Python; JSON true is not a size.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(path, field, value, f"it must be an integer from {low} to {high} ({what})")
    return value


def _floats_field(path: Path, field: str, value: Any, low: float, high: float, low_open: bool) -> tuple:
    ok = isinstance(value, list) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        and (low < v if low_open else low <= v) and v <= high for v in value
    )
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _invalid(path, field, value, f"it must be 3 numbers (R, G, B) in {interval}, on the 0..1 pixel scale")
    return tuple(float(v) for v in value)


def _parse_classes(path: Path, meta: dict[str, str]) -> list[str]:
    classes = _json_field(path, meta, "classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise _invalid(path, "classes", classes, "it must be a JSON list of class names (non-empty strings)")
    if not MIN_CLASSES <= len(classes) <= MAX_CLASSES:
        raise _invalid(path, "classes", classes, f"it must name {MIN_CLASSES} to {MAX_CLASSES} classes, "
                       f"not {len(classes)}")
    shady = [c for c in classes if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in c)]
    if shady:
        # Names are printed by predict: an escape sequence in one would drive the user's terminal.
        raise _invalid(path, "classes", shady[0], "class names must not contain control characters")
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise _invalid(path, "classes", classes, f"class names must be unique ({dup[:5]} repeat)")
    return classes


def _parse_preprocessing(path: Path, meta: dict[str, str]) -> PreprocessConfig:
    pre = _json_field(path, meta, "preprocessing")
    if not isinstance(pre, dict):
        raise _invalid(path, "preprocessing", pre, "it must be a JSON object")
    missing = [k for k in PREPROCESSING_KEYS if k not in pre]
    if missing:
        raise _invalid(path, "preprocessing", pre, f"it lacks {', '.join(missing)}")
    size = pre["input_size"]
    if not isinstance(size, list) or len(size) != 2:
        raise _invalid(path, "preprocessing.input_size", size, "it must be [height, width]")
    h, w = (_int_field(path, "preprocessing.input_size", v, 1, MAX_IMAGE_SIDE, "pixels") for v in size)
    resize = _int_field(path, "preprocessing.resize_size", pre["resize_size"], 1, MAX_IMAGE_SIDE,
                        "pixels of the shorter image side before the centre crop")
    interp = pre["interpolation"]
    if interp not in RESAMPLING_FILTERS:
        raise _invalid(path, "preprocessing.interpolation", interp, f"it must be one of {list(RESAMPLING_FILTERS)}")
    mean = _floats_field(path, "preprocessing.mean", pre["mean"], 0.0, 1.0, low_open=False)
    std = _floats_field(path, "preprocessing.std", pre["std"], 0.0, 1.0, low_open=True)
    window = pre.get("window", "none")  # absent: a model exported before windows existed, or none
    try:
        window = parse_window(window if isinstance(window, str) else repr(window)).spec
    except ValueError as e:
        raise _invalid(path, "preprocessing.window", window, str(e)) from None
    return PreprocessConfig((h, w), resize, interp, mean, std, window)


def parse_metadata(path: str | os.PathLike, meta: dict[str, str]) -> tuple[list[str], PreprocessConfig]:
    """Validate featbank's own ``metadata_props`` of an ONNX file; return its classes and preprocessing.

    Allowed values: ``classes`` a JSON list of :data:`MIN_CLASSES` to :data:`MAX_CLASSES` unique,
    non-empty names; ``preprocessing.input_size`` ``[height, width]`` and ``resize_size``
    integers from 1 to :data:`MAX_IMAGE_SIDE`; ``interpolation`` a Pillow filter name; ``mean``
    and ``std`` three numbers each on the 0..1 scale (``std`` > 0).

    Raises:
        BundleError: a key is missing, of another format version, not JSON, or out of range; the
            message names the file, the field, the value and what is allowed.
    """
    path = Path(path)
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
    classes, pre = _parse_classes(path, meta), _parse_preprocessing(path, meta)
    input_kind(path, meta)
    return classes, pre


def input_kind(path: str | os.PathLike, meta: dict[str, str]) -> str:
    """What the graph's input takes (:data:`INPUT_KINDS`), with the image conventions checked.

    ``input`` absent means ``preprocessed`` (files written before the key); the ``Image.*`` keys and
    ``model_version``, when present, must hold the values featbank writes (:data:`IMAGE_METADATA`, an
    integer from 1 to 2**63 - 1).

    Raises:
        BundleError: a value out of those, naming the field.
    """
    path = Path(path)
    kind = meta.get("input", "preprocessed")
    if kind not in INPUT_KINDS:
        raise _invalid(path, "input", kind, f"it must be one of {list(INPUT_KINDS)}")
    for key, value in IMAGE_METADATA.items():
        if key in meta and meta[key] != value:
            raise _invalid(path, key, meta[key], f"featbank graphs take {value!r} images")
    version = meta.get("model_version", "1")
    if not (version.isascii() and version.isdigit() and 1 <= int(version) < 2**63 and version[0] != "0"):
        raise _invalid(path, "model_version", version, "it must be a positive integer (no sign, no leading zero)")
    return kind


def _check_graph(path: Path, session: ort.InferenceSession, n_classes: int, input_size: tuple[int, int],
                 raw: bool = False) -> None:
    """The graph's input and outputs must be what the metadata promises (names, types, sizes).

    A raw-input graph (``raw``) takes images of any height and width: those axes must not be fixed."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if INPUT_NAME not in inputs or not set(OUTPUT_NAMES) <= set(outputs):
        raise BundleError(
            f"{str(path)!r} has inputs {sorted(inputs)} and outputs {sorted(outputs)}; a featbank "
            f"model has input {INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)}. Re-export it."
        )
    h, w = input_size
    x, probs, label = inputs[INPUT_NAME], outputs[OUTPUT_NAMES[0]], outputs[OUTPUT_NAMES[1]]
    x_spec = (x, "tensor(uint8)", [None, h, w, 3], f"uint8 [N, {h}, {w}, 3] (preprocessing.input_size)")
    if raw:
        x_spec = (x, "tensor(uint8)", [None, None, None, 3], "uint8 [N, H, W, 3] of any H, W (input: raw)")
        if any(isinstance(d, int) for d in list(x.shape)[1:3]):
            raise BundleError(
                f"{str(path)!r}: the graph's {x.name!r} is {x.type} {list(x.shape)}, but its metadata says "
                "input: raw (images of any height and width). The file is damaged or was not written by "
                "'featbank export'; re-export the model."
            )
    expected = [
        x_spec,
        (probs, "tensor(float)", [None, n_classes], f"float32 [N, {n_classes}] (one column per class)"),
        (label, "tensor(int64)", [None], "int64 [N]"),
    ]
    for arg, dtype, dims, text in expected:
        shape = list(arg.shape)
        fixed_ok = len(shape) == len(dims) and all(
            want is None or not isinstance(got, int) or got == want for got, want in zip(shape, dims, strict=True)
        )
        if arg.type != dtype or not fixed_ok:
            raise BundleError(
                f"{str(path)!r}: the graph's {arg.name!r} is {arg.type} {shape}, but its metadata says {text}"
                f"{f' for {n_classes} classes' if arg is probs else ''}. The file is damaged or was not "
                "written by 'featbank export'; re-export the model."
            )


def image_to_pil(image: ImageLike, window: str = "none") -> Image.Image:
    """An RGB Pillow image from a path, a Pillow image of any mode, or an array.

    Arrays are decoded pixels in RGB order: ``(H, W)`` grey, ``(H, W, 1|3|4)``; ``uint8`` as is,
    ``uint16`` scaled by 1/257, ``bool`` to 0/255, floats on the 0..1 scale when their maximum is
    at most 1, else on the 0..255 scale. Alpha is dropped (as at training time). ``window``
    (:mod:`featbank.windowing`) applies to files (DICOM included) and high-bit-depth Pillow images.

    Raises:
        DatasetError: the file cannot be read, or the array has an unusable shape or dtype.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else _rgb(image, window)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            return load_image(image, window=window)
        except ImageReadError as e:
            raise DatasetError(f"Cannot read image {str(image)!r}: {e.reason}.") from None
    raise DatasetError(
        f"An image must be a file path, a PIL.Image or a numpy array. Got {type(image).__name__} instead."
    )


def _rgb(img: Image.Image, window: str = "none") -> Image.Image:
    # Same mode conversion as load_image (16-bit scaled or windowed, palettes with transparency, alpha dropped).
    from .images import to_uint8_rgb

    return to_uint8_rgb(img, window=window)


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

    One inference path for both kinds of graph (metadata ``input``): :meth:`preprocess` turns an image
    into what the graph takes (a ``preprocessed`` graph: pixels resized and centre-cropped as at training
    time; a ``raw`` graph: the decoded RGB uint8 pixels at their own size, which the graph resizes and
    crops itself), and :meth:`run` feeds batches of those.

    Args:
        path: an ``.onnx`` file written by ``featbank export``.
        providers: onnxruntime execution providers (default: CPU).
        session_options: an ``onnxruntime.SessionOptions`` (threads, optimisation level).

    Attributes:
        path: the model file.
        classes: class names; column ``i`` of :meth:`predict_proba` is ``classes[i]``.
        preprocess_config: resize / crop / interpolation / mean / std used at training time.
        metadata: every ``metadata_props`` entry (strings).
        input_size: ``(height, width)`` of the network input (after the crop).
        input_kind: ``"preprocessed"`` or ``"raw"`` (see :data:`INPUT_KINDS`).

    Raises:
        BundleError: the file is missing, not an ONNX model, not a featbank model, or its metadata
            is invalid or disagrees with the graph (see :func:`parse_metadata`); the message names
            the file, the field and the value.

    Example:
        >>> clf = OnnxClassifier("model.onnx")
        >>> probs = clf.predict_proba(["a.jpg", "b.png"])   # (2, n_classes) float32
        >>> [p.label for p in clf.predict(["a.jpg"])]
    """

    #: a raw graph's batch holds images of one size, and at most this many bytes of pixels.
    RAW_BATCH_BYTES = 64 << 20

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
        self.classes: list[str]
        self.preprocess_config: PreprocessConfig
        self.classes, self.preprocess_config = parse_metadata(self.path, self.metadata)
        self.input_size: tuple[int, int] = self.preprocess_config.input_size
        self.input_kind: str = input_kind(self.path, self.metadata)
        if self.input_kind == "embeddings":
            raise BundleError(
                f"{str(self.path)!r} is a head alone ('featbank export --head-only'): it takes embeddings (N, D) "
                "float32, not images. Run it with onnxruntime on embeddings computed as its metadata 'features' "
                "says, or export the bundle without --head-only to classify images."
            )
        _check_graph(self.path, self.session, len(self.classes), self.input_size, raw=self.input_kind == "raw")

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def preprocess(self, image: ImageLike) -> np.ndarray:
        """One image -> what the graph takes: ``(H, W, 3)`` uint8 RGB.

        A preprocessed graph gets the pixels at its input size, resized and cropped exactly as at
        training time; a raw graph the decoded pixels at their own size (converted to RGB, checked
        against the aspect-ratio and size limits the graph's resize would exceed, not resized).

        Raises:
            DatasetError: the image cannot be read or used (the message names it and says why).
        """
        try:
            img = image_to_pil(image, self.preprocess_config.window)
            if self.input_kind == "raw":
                check_resizable(img.width, img.height, self.preprocess_config)
                return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
            return preprocess_image(img, self.preprocess_config)
        except ImageReadError as e:  # e.g. an extreme aspect ratio, found once the image is known
            if isinstance(image, (str, os.PathLike)):
                raise DatasetError(f"Cannot read image {str(image)!r}: {e.reason}.") from None
            what = f"an array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise DatasetError(f"Cannot use image {what}: {e.reason}.") from None

    def _check_batch(self, x: np.ndarray) -> None:
        h, w = self.input_size
        if self.input_kind == "raw":
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3 or 0 in x.shape:
                raise DatasetError(
                    f"The model input must be uint8 of shape (N, H, W, 3) (NHWC RGB, N, H, W >= 1; input: raw). "
                    f"Got {x.dtype} {x.shape} instead; use OnnxClassifier.preprocess or predict_proba on images."
                )
            check_resizable(x.shape[2], x.shape[1], self.preprocess_config, error=DatasetError)
        elif x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (h, w, 3):
            raise DatasetError(
                f"The model input must be uint8 of shape (N, {h}, {w}, 3) (NHWC RGB). Got {x.dtype} "
                f"{x.shape} instead; use OnnxClassifier.preprocess or predict_proba on raw images."
            )

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph on a batch of what :meth:`preprocess` returns.

        Args:
            batch: ``(N, H, W, 3)`` uint8 RGB; ``H, W`` = :attr:`input_size` for a preprocessed graph,
                any size (one for the whole batch) for a raw graph.

        Returns:
            ``(probabilities (N, C) float32, label (N,) int64)``.
        """
        x = np.asarray(batch)
        self._check_batch(x)
        try:
            probs, label = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(x)})
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types; the input was checked above
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(
                f"{str(self.path)!r} failed to run on a batch of {len(x)} image(s) ({first}). The graph is "
                "damaged or was not written by 'featbank export'; re-export the model."
            ) from None
        if probs.shape != (len(x), self.n_classes) or label.shape != (len(x),):
            # A graph with a symbolic class axis passes the load-time check; its width shows here.
            raise BundleError(
                f"{str(self.path)!r} returned probabilities of shape {probs.shape} and labels of shape "
                f"{label.shape} for {len(x)} image(s); its metadata names {self.n_classes} classes. "
                "The file is damaged or was not written by 'featbank export'; re-export the model."
            )
        return probs, label

    def proba_or_error(self, images: Iterable[ImageLike], batch_size: int = 32) -> list[np.ndarray | str]:
        """Per image, its ``(C,)`` probabilities, or why it cannot be used (the others are still classified).

        Images are run in batches of up to ``batch_size`` (a raw graph's batch: consecutive images of
        one size, at most :attr:`RAW_BATCH_BYTES` of pixels).
        """
        if batch_size < 1:
            raise DatasetError(f"The 'batch_size' parameter must be >= 1. Got {batch_size} instead.")
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        out: list[np.ndarray | str] = []
        pending: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            if pending:
                for (i, _), p in zip(pending, self.run(np.stack([a for _, a in pending]))[0], strict=True):
                    out[i] = p
                pending.clear()

        for image in images:
            out.append("")
            try:
                arr = self.preprocess(image)
            except DatasetError as e:
                out[-1] = str(e)
                continue
            if pending and (arr.shape != pending[0][1].shape
                            or (len(pending) + 1) * arr.nbytes > max(self.RAW_BATCH_BYTES, arr.nbytes)):
                flush()
            pending.append((len(out) - 1, arr))
            if len(pending) == batch_size:
                flush()
        flush()
        return out

    def predict_proba(self, images: Iterable[ImageLike], batch_size: int = 32) -> np.ndarray:
        """``(N, C)`` float32 probabilities of images (paths, PIL images or arrays, any size/mode).

        Raises:
            DatasetError: an image cannot be read (the message names it; see :meth:`proba_or_error`
                to classify the others).
        """
        results = self.proba_or_error(images, batch_size)
        bad = next((r for r in results if isinstance(r, str)), None)
        if bad is not None:
            raise DatasetError(bad)
        if not results:
            return np.zeros((0, self.n_classes), dtype=np.float32)
        return np.stack(results).astype(np.float32, copy=False)

    def predict(self, images: Iterable[ImageLike], batch_size: int = 32) -> list[Prediction]:
        """The most probable class of each image, as :class:`Prediction` (label, index, probability)."""
        probs = self.predict_proba(images, batch_size=batch_size)
        idx = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
        return [Prediction(self.classes[int(i)], int(i), float(p[i])) for i, p in zip(idx, probs, strict=True)]

    def __repr__(self) -> str:
        return (
            f"OnnxClassifier({str(self.path)!r}, backbone={self.metadata.get('backbone')!r}, "
            f"n_classes={self.n_classes}, input_size={self.input_size}, input={self.input_kind!r})"
        )
