"""featbank export MODEL"""

from __future__ import annotations

import click

__all__ = ["export"]


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--out", "-o", type=click.Path(path_type=str), default=None,
              help="ONNX file to write (a folder means <folder>/<model name>.onnx). Default: <MODEL>.onnx "
              "beside the bundle folder. Checked writable before the export starts; a symlink is written "
              "through. The parity figures go to <out stem>.parity.json.")
@click.option("--check-images", multiple=True, type=click.Path(path_type=str), metavar="DIR_OR_FILE",
              help="Images for the parity check (repeatable; folders are searched recursively). "
              "Default: the bundle's validation images that still exist.")
@click.option("--no-check", is_flag=True, help="Skip the parity check (not recommended).")
@click.option("--opset", type=click.IntRange(min=18), default=None,
              help="ai.onnx opset of the graph (>= 18). Default: the exporter's (20); another value "
              "re-exports the backbone.")
@click.option("--weights-file", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Backbone weights file, for bundles fitted with 'extract --weights-file'.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest |probability difference| allowed between ONNX and PyTorch.")
@click.option("--input", "input_kind", type=click.Choice(["preprocessed", "raw"]), default="preprocessed",
              show_default=True,
              help="What the graph takes. preprocessed: uint8 (N, H, W, 3) RGB already resized and centre-cropped "
              "as its metadata says. raw: any decoded RGB uint8 image (N, H, W, 3) of any size; the weights' resize "
              "(antialiased, as Pillow) and crop are inside the graph, checked against Pillow on images of many "
              "sizes (top-1 agreement >= 99%).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Static int8 quantization (QDQ, per channel), calibrated on training images of the bundle's "
              "cache (or --calibration); the test top-1 change is measured and stored in the metadata.")
@click.option("--calibration", type=click.Path(file_okay=False, path_type=str), default=None, metavar="DIR",
              help="Images to calibrate --quantize on (up to 128), instead of the cache's training images.")
@click.option("--max-drop", type=click.FloatRange(min=0, max=100), default=1.0, show_default=True,
              help="Refuse (exit 2, nothing written) an int8 model whose test top-1 drops by more points.")
@click.option("--triton", type=click.Path(path_type=str), default=None, metavar="REPO",
              help="Also write a Triton model repository: REPO/<name>/config.pbtxt, labels.txt, <version>/model.onnx.")
@click.option("--model-version", type=click.IntRange(min=1), default=1, show_default=True,
              help="The model_version of the file and the Triton version folder.")
@click.option("--head-only", is_flag=True,
              help="Export the head alone: embeddings (N, D) float32 -> probabilities, label; the feature spec "
              "(backbone, layers, pooling, standardisation) is in the metadata.")
def export(model, out, no_check, **options) -> None:
    """Export MODEL (a bundle from fit or finetune) to one ONNX file: images -> probabilities, label.

    With --input preprocessed (the default) the graph takes uint8 images (N, H, W, 3) RGB, already
    resized and centre-cropped as its metadata says; with --input raw any decoded RGB image, resized
    and cropped inside. Normalisation, backbone and head are inside. Outputs: `probabilities` (N, C)
    float32 and `label` (N,) int64. Before the file appears, real images go through featbank's
    PyTorch pipeline and through onnxruntime (batch sizes 1 and 7); the export fails (exit 2,
    nothing written) unless top-1 agrees on every image and probabilities agree within --atol.

    MODEL is a bundle folder; an .onnx file is already an exported model (run it with predict).
    A killed export's temporary files are removed by the next export into the same file.

    Run the result with `featbank predict FILE.onnx IMAGES`, or from Python with only numpy,
    Pillow and onnxruntime: `featbank.runtime.OnnxClassifier(FILE).predict(paths)`.

    \b
    Examples:
      featbank export models/elpv-linear
      featbank export models/elpv-linear --out deploy/elpv.onnx --check-images data/elpv/val
      featbank export models/elpv-finetuned --opset 18
      featbank export models/elpv-linear --input raw --quantize int8 --triton deploy/triton
      featbank export models/elpv-linear --head-only --out deploy/elpv-head.onnx
    """
    import featbank
    from featbank.export import ExportConfig

    # The one mapping of the click options onto ExportConfig (checked when it is made).
    config = ExportConfig(**{**options, "check_images": list(options["check_images"]) or None, "check": not no_check})
    report = featbank.export_model(model, out, config=config)
    click.echo(report.summary())
    click.echo(f"ONNX model: {report.path}")
    click.echo(f"Parity:     {report.parity_path}")
    if report.triton is not None:
        click.echo(f"Triton:     {report.triton}")
