"""featbank predict MODEL IMAGE_OR_FOLDER..."""

from __future__ import annotations

import click

from .options import device_option, engine_option

__all__ = ["predict"]

_EXAMPLES = """\b
Examples:
  featbank predict models/elpv-linear new_cells/
  featbank predict models/elpv-linear a.png b.png --top-k 2 --json
  featbank predict exported/elpv.onnx new_cells/
"""


@click.command(epilog=_EXAMPLES)
@click.argument("model", type=click.Path(path_type=str))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True, help="Show the K most probable classes.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@device_option
@engine_option("What runs a bundle's network, as in extract: auto is onnxruntime over the cached ONNX graph on CPU "
               "(built once, about 10 s), torch on CUDA. An .onnx model always runs on onnxruntime.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list of predictions.")
@click.option("--weights-file", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="The backbone weights file, for bundles fitted with --weights-file.")
def predict(model, images, top_k, batch_size, device, engine, as_json, weights_file) -> None:
    """Classify images with a model bundle (runs its backbone) or an exported .onnx model.

    Folders are searched recursively for images. An image that cannot be used (unreadable, corrupt,
    too many pixels, an aspect ratio beyond 100:1) gets a line PATH<TAB>ERROR<TAB>reason ("error" in
    --json) and never stops the others. Exit code 0 then too; 2 for a bad model or a missing path.
    """
    import json

    from featbank.inference import predict as predict_model

    preds = predict_model(model, images, top_k=top_k, device=device, batch_size=batch_size, weights_file=weights_file,
                          engine=engine)
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in preds], indent=2))
        return
    for p in preds:
        if p.error:
            click.echo(f"{p.path}\tERROR\t{p.error}")
        else:
            extra = "  " + ", ".join(f"{name} {q:.3f}" for name, q in p.top_k[1:]) if len(p.top_k) > 1 else ""
            click.echo(f"{p.path}\t{p.label}\t{p.probability:.4f}{extra}")
