"""featbank doctor"""

from __future__ import annotations

import click

from .options import backbone_options, device_option, engine_option, feature_options

__all__ = ["doctor"]


@click.command()
@click.argument("data", type=str)
@backbone_options
@device_option
@engine_option("The engine extract would use (auto: onnxruntime on CPU, torch on CUDA).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--num-workers", type=click.IntRange(0, 64), default=None,
              help="Decoding processes extract would use (default: extract's).")
@click.option("--sample", type=click.IntRange(1, 10_000), default=64, show_default=True,
              help="How many images to read and decode, spread over DATA.")
@click.option("--out", type=click.Path(path_type=str), default=None,
              help="Where the cache would go (its folder's disk is timed); default: a temp folder.")
@feature_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor(data: str, as_json: bool, **options: object) -> None:
    """Measure what each stage of extracting DATA costs here; name the bottleneck; suggest options.

    Times, on a sample of DATA: reading the files, decoding, resizing, the model alone (the engine
    extract would build; once per view with --views) and writing the cache; then predicts extract's
    images per second with these options and says which stage limits it.

    \b
    Examples:
      featbank doctor data/elpv
      featbank doctor data/photos --device cuda --batch-size 128 --json
      featbank doctor data/elpv -b efficientnet_lite0@300 --layers all --views 7 --augment dihedral
    """
    import json

    from featbank.extraction import diagnose

    d = diagnose(data, **options)  # type: ignore[arg-type]  # each option is diagnose's keyword of the same name
    click.echo(json.dumps(d.to_dict(), indent=2) if as_json else d.summary())
