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
def export(model, out, check_images, no_check, opset, weights_file, atol) -> None:
    """Export MODEL (a bundle from fit or finetune) to one ONNX file: images -> probabilities, label.

    The graph takes uint8 images (N, H, W, 3) RGB, already resized and centre-cropped as its
    metadata says; normalisation, backbone and head are inside. Outputs: `probabilities` (N, C)
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
    """
    import featbank

    report = featbank.export_model(
        model, out, check_images=list(check_images) or None, check=not no_check, opset=opset,
        weights_file=weights_file, atol=atol,
    )
    click.echo(report.summary())
    click.echo(f"ONNX model: {report.path}")
    click.echo(f"Parity:     {report.parity_path}")
