"""``export --quantize int8``: static QDQ per-channel quantization with onnxruntime, and its measured cost.

- Calibration: :data:`CALIBRATION_IMAGES` training images of the cache the bundle was fitted on (its
  manifest's ``training.cache``; the cache records where its images are), evenly spaced over the
  sorted rows; or the images of ``--calibration DIR``. Each is preprocessed exactly as at training
  time and run through the fp32 graph by onnxruntime's MinMax calibrator.
- Quantization: ``quantize_static`` with ``QuantFormat.QDQ``, ``per_channel=True``, uint8
  activations and int8 weights (the U8S8 form onnxruntime's x86 kernels run fastest), after
  onnxruntime's ``quant_pre_process`` (shape inference and graph optimisation). The first
  :data:`FLOAT_FIRST_CONVS` and the last :data:`FLOAT_LAST_CONVS` convolutions and every node after
  the last one (pooling, head, softmax, argmax) stay float (see :func:`float_nodes`).
- Measure: top-1 accuracy of the fp32 and the int8 graph on the cache's test split (at most
  :data:`MAX_TEST_IMAGES` images, evenly spaced); the drop in points goes into the metadata
  (``quantization``) and the parity file; more than ``max_drop`` points refuses the export.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, ExportError
from ..images import IMAGE_EXTENSIONS, ImageReadError, PreprocessConfig, load_and_preprocess
from ..runtime import INPUT_NAME, OUTPUT_NAMES

if TYPE_CHECKING:
    from onnx import ModelProto

    from ..bundles import Bundle
    from ..cache import FeatureCache

__all__ = ["CalibrationPlan", "calibration_plan", "quantize_model", "CALIBRATION_IMAGES", "MAX_TEST_IMAGES",
           "DEFAULT_MAX_DROP"]

#: images the int8 ranges are calibrated on.
CALIBRATION_IMAGES = 128
#: at most this many test images measure the accuracy change.
MAX_TEST_IMAGES = 2000
#: the export is refused when test top-1 drops by more than this many points.
DEFAULT_MAX_DROP = 1.0
#: convolutions left in float at each end of the network (at most a quarter of them each). Measured on
#: ELPV 4-class (efficientnet_lite0, linear head): everything quantized -5.8 pt of top-1 on 400 test
#: images (the softmax quantized to 1/255 steps, the pooled features the head reads), head and pooling
#: float -3.5; on all 788 test images, float first/last convs 4/3: -1.02 pt, 6/3: -0.89, 4/5: -0.63.
FLOAT_FIRST_CONVS = 4
FLOAT_LAST_CONVS = 5


@dataclass
class CalibrationPlan:
    """Where the calibration and the measurement images come from."""

    calibration: list[Path]
    calibration_source: str
    test: list[Path]
    test_labels: np.ndarray
    classes: list[str]
    cache: str


def _spaced(items: list[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round()]


def _cache_rows(bundle: Bundle) -> tuple[Any, str]:
    from ..cache import open_cache
    from ..errors import CacheError

    cache_path = (bundle.manifest.get("training") or {}).get("cache")
    if not isinstance(cache_path, str) or not cache_path:
        raise ConfigError(
            f"Bundle {str(bundle.path)!r} does not record the cache it was fitted on, so --quantize int8 has no test "
            "split to measure the accuracy change on. Re-fit it with this featbank, or export without --quantize."
        )
    try:
        cache = open_cache(cache_path)
    except CacheError as e:
        raise ConfigError(
            f"--quantize int8 measures the accuracy change on the test split of the cache the bundle was fitted on, "
            f"{cache_path!r}, which cannot be opened: {e}"
        ) from None
    bundle.check_cache(cache)
    return cache, cache_path


def _existing(cache: FeatureCache, rows: np.ndarray) -> tuple[list[Path], np.ndarray]:
    paths = [cache.abspath(cache.paths[r]) for r in rows]
    keep = [i for i, p in enumerate(paths) if p.is_file()]
    return [paths[i] for i in keep], np.asarray(rows)[keep]


def calibration_plan(bundle: Bundle, calibration: str | os.PathLike | None) -> CalibrationPlan:
    """The calibration images (``calibration`` folder, else the cache's training images) and the test images.

    Raises:
        ConfigError: no cache recorded or openable, no test images on disk, no calibration images.
    """
    cache, cache_path = _cache_rows(bundle)
    with cache:
        rows = np.flatnonzero(cache.split_mask("test")) if "test" in cache.split_names else np.zeros(0, int)
        test, test_rows = _existing(cache, _spaced(list(rows), MAX_TEST_IMAGES))
        labels = np.asarray(cache.labels)[test_rows] if len(test_rows) else np.zeros(0, int)
        if not test:
            raise ConfigError(
                f"Cache {cache_path!r} has no test images on this machine ({len(rows)} test row(s), their files under "
                f"{str(cache.root)!r} missing), so the accuracy change of --quantize int8 cannot be measured. Run the "
                "export where the images are, or export without --quantize."
            )
        if calibration is not None:
            folder = Path(calibration)
            found = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()) \
                if folder.is_dir() else []
            calib, source = _spaced(found, CALIBRATION_IMAGES), f"--calibration {folder}"
        else:
            train = np.flatnonzero(cache.split_mask("train")) if "train" in cache.split_names else np.zeros(0, int)
            calib, _ = _existing(cache, _spaced(list(train), CALIBRATION_IMAGES))
            source = f"training images of {cache_path}"
        classes = list(cache.classes)
    if not calib:
        raise ConfigError(
            f"No images to calibrate the int8 model on ({source}: none found). Pass --calibration DIR with a few "
            f"hundred images of the task (up to {CALIBRATION_IMAGES} are used)."
        )
    return CalibrationPlan(calib, source, test, labels, classes, cache_path)


def _batches(paths: list[Path], cfg: PreprocessConfig, batch_size: int = 32) -> Any:
    for i in range(0, len(paths), batch_size):
        arrays, keep = [], []
        for j, p in enumerate(paths[i:i + batch_size]):
            try:
                arrays.append(load_and_preprocess(p, cfg))
                keep.append(i + j)
            except ImageReadError:
                continue
        if arrays:
            yield np.stack(arrays), keep


def _top1(model_path: Path, plan: CalibrationPlan, cfg: PreprocessConfig, bundle_classes: list[str]) -> tuple[float, int]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    to_bundle = {c: i for i, c in enumerate(bundle_classes)}
    want = np.array([to_bundle.get(plan.classes[int(y)], -1) for y in plan.test_labels])
    hits, n = 0, 0
    for x, keep in _batches(plan.test, cfg):
        label = sess.run([OUTPUT_NAMES[1]], {INPUT_NAME: x})[0]
        hits += int(np.sum(label == want[keep]))
        n += len(keep)
    return (hits / n if n else 0.0), n


def float_nodes(model: ModelProto) -> list[str]:
    """Nodes kept in float: the first and last few convolutions and everything after the last one."""
    nodes = list(model.graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if not convs:
        return []
    first, last = min(FLOAT_FIRST_CONVS, len(convs) // 4), min(FLOAT_LAST_CONVS, len(convs) // 4)
    keep = set(convs[:first]) | set(convs[len(convs) - last:]) | set(range(convs[-1] + 1, len(nodes)))
    return [nodes[i].name for i in sorted(keep) if nodes[i].name]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over the calibration images (one at a time)."""

    def __init__(self, paths: list[Path], cfg: PreprocessConfig):
        self._it = ((x[k:k + 1],) for x, _ in _batches(paths, cfg) for k in range(len(x)))
        self.n = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._it, None)
        if item is None:
            return None
        self.n += 1
        return {INPUT_NAME: item[0]}


def quantize_model(fp32: Path, out: Path, plan: CalibrationPlan, cfg: PreprocessConfig, max_drop: float,
                   published: Path, classes: list[str]) -> dict[str, Any]:
    """Quantize ``fp32`` into ``out`` (int8 QDQ, per channel) and measure the test top-1 change.

    Raises:
        ConfigError: top-1 drops by more than ``max_drop`` points (nothing is published), or no
            calibration image could be read.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.name + ".pre")
    reader = _Reader(plan.calibration, cfg)
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        excluded = float_nodes(onnx.load(str(pre)))
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded)
    except OSError:
        raise  # the caller names the file and the reason (disk full, permissions)
    except Exception as e:  # noqa: BLE001 - the quantizer raises many types; say what failed
        if reader.n == 0:
            raise ConfigError(f"None of the {len(plan.calibration)} calibration images ({plan.calibration_source}) "
                              "could be read. Pass --calibration DIR with readable images.") from None
        raise ExportError(f"int8 quantization failed: {type(e).__name__}: {str(e).strip()[:300]}. Export fp32, "
                          "or report the model.") from None
    finally:
        pre.unlink(missing_ok=True)
        for aux in out.parent.glob(out.name + "*.data"):
            aux.unlink(missing_ok=True)
    if reader.n == 0:
        raise ConfigError(f"None of the {len(plan.calibration)} calibration images ({plan.calibration_source}) "
                          "could be read. Pass --calibration DIR with readable images.")
    fp32_top1, n = _top1(fp32, plan, cfg, classes)
    int8_top1, _ = _top1(out, plan, cfg, classes)
    drop = 100.0 * (fp32_top1 - int8_top1)
    result = {"method": "onnxruntime quantize_static, QDQ, per channel, U8S8, MinMax",
              "float_nodes": len(excluded), "n_calibration": reader.n, "calibration": plan.calibration_source, "n_test": n,
              "test_split_of": plan.cache, "fp32_top1": fp32_top1, "int8_top1": int8_top1,
              "drop_points": drop, "max_drop": max_drop}
    if drop > max_drop:
        raise ConfigError(
            f"The int8 model loses {drop:.2f} points of test top-1 ({100 * fp32_top1:.2f}% -> {100 * int8_top1:.2f}% "
            f"on {n} test images of {plan.cache}), more than --max-drop {max_drop:g}. Nothing was written to "
            f"{str(published)!r}. Calibrate on other images (--calibration DIR), allow more (--max-drop), or "
            "export fp32."
        )
    return result
