"""Classify image files with an exported model and onnxruntime alone (no torch imported).

    python examples/classify_with_onnx.py [MODEL.onnx] [IMAGE_OR_FOLDER ...]
    # default: models/quickstart-linear.onnx (README command (1)) on data/elpv/test

What a service needs: numpy, Pillow, onnxruntime and featbank's runtime module. The model carries its
class names and preprocessing in its metadata; images that cannot be used are reported, not fatal.
"""

from __future__ import annotations

import sys
from pathlib import Path

from featbank.runtime import OnnxClassifier

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def image_files(args: list[str]) -> list[Path]:
    files: list[Path] = []
    for arg in args:
        path = Path(arg)
        files += sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES) if path.is_dir() else [path]
    return files


def main(model: str = "models/quickstart-linear.onnx", *images: str) -> None:
    clf = OnnxClassifier(model)
    files = image_files(list(images) or ["data/elpv/test"])
    print(f"{model}: classes {clf.classes}, input {clf.preprocess_config.input_size}")
    correct = 0
    for path, p in zip(files, clf.predict(files)):
        if p.error is not None:
            print(f"{path}\tERROR\t{p.error}")
            continue
        correct += p.label == path.parent.name  # ImageFolder: the folder is the true class
        print(f"{path}\t{p.label}\t{p.probability:.3f}")
    print(f"{correct} of {len(files)} match their folder's class")
    assert "torch" not in sys.modules, "the light runtime imported torch"


if __name__ == "__main__":
    main(*sys.argv[1:])
