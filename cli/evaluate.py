"""featbank evaluate MODEL [CACHE]"""

from __future__ import annotations

import click

__all__ = ["evaluate"]

_EXAMPLES = """\b
Examples:
  featbank evaluate models/elpv-linear runs/elpv-test.h5
  featbank evaluate models/elpv-linear runs/elpv.h5 --split val --json
"""


@click.command(epilog=_EXAMPLES)
@click.argument("model", type=click.Path(path_type=str))
@click.argument("cache", required=False, type=click.Path(path_type=str))
@click.option("--split", type=click.Choice(["auto", "all", "train", "val", "test"]), default="auto", show_default=True,
              help="Rows to evaluate on; auto = test when the cache has one, else every labelled row.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(model, cache, split, as_json) -> None:
    """Evaluate a model bundle on a cache made with the same backbone settings.

    CACHE defaults to the most recent cache written by 'featbank extract'. The cache key and
    embedding size must match the ones the model was fitted on.
    """
    import json

    from featbank.inference import evaluate as evaluate_model

    result = evaluate_model(model, cache, split=split)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.summary())
