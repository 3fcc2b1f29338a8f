"""featbank evaluate MODEL [CACHE]"""

from __future__ import annotations

import click

__all__ = ["evaluate"]

_EXAMPLES = """\b
Examples:
  featbank evaluate models/elpv-linear runs/elpv-test.h5
  featbank evaluate models/elpv-linear runs/elpv.h5 --split val --json
  featbank evaluate exported/elpv.onnx runs/elpv-test.h5      # the exported model on the cache's images
"""


@click.command(epilog=_EXAMPLES)
@click.argument("model", type=click.Path(path_type=str))
@click.argument("cache", required=False, type=click.Path(path_type=str))
@click.option("--split", type=click.Choice(["auto", "all", "train", "val", "test"]), default="auto", show_default=True,
              help="Rows to evaluate on; auto = test when the cache has one, else every labelled row.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(model, cache, split, as_json) -> None:
    """Evaluate a model bundle, or an exported .onnx model, on a labelled cache.

    CACHE defaults to the most recent cache written by 'featbank extract'. A bundle reads the
    cache's embeddings, so the cache key and embedding size must match the ones it was fitted on.
    An .onnx model reads the cache's images from disk (the cache gives their paths, labels and
    splits); every image of the split must still be readable.
    """
    import json

    from featbank.inference import evaluate as evaluate_model

    result = evaluate_model(model, cache, split=split)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.summary())
