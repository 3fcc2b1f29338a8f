"""featbank compare DATA --backbones a,b"""

from __future__ import annotations

import click

from .options import device_option, engine_option, quiet_option

__all__ = ["compare"]

_EXAMPLES = """\b
Examples:
  featbank compare data/elpv --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2
  featbank compare data/elpv --backbones efficientnet_lite0,resnet50 --plot runs/elpv-backbones.png
  featbank compare data/elpv --backbones efficientnet_lite0,efficientnet_lite1 --json
  featbank compare data/elpv --backbones efficientnet_lite0,resnet50 --layers auto
"""


@click.command(epilog=_EXAMPLES)
@click.argument("data", type=click.Path(path_type=str))
@click.option("--backbones", "-b", required=True, metavar="NAME,NAME,...",
              help="Comma-separated backbones to compare ('featbank backbones' lists them), each once.")
@click.option("--layers", default="final", show_default=True,
              help="Features the probe reads: 'final' (the embedding), 'auto' (fit chooses on validation among all "
                   "layers), 'all', or names such as stage5,final; other than final: a cache of its own per backbone.")
@click.option("--plot", type=click.Path(path_type=str), default=None,
              help="PNG of accuracy against throughput. Default: <cache dir>/caches/<folder>-<hash>-compare.png.")
@click.option("--no-plot", is_flag=True, help="Do not draw the plot.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="As for extract.")
@click.option("--num-workers", type=click.IntRange(min=0), default=None, help="As for extract.")
@device_option
@engine_option("As for extract. Throughput depends on it.")
@click.option("--overwrite", is_flag=True, help="Replace a default cache that was made with other settings.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (a list of objects).")
@quiet_option
def compare(no_plot: bool, as_json: bool, quiet: bool, **params: object) -> None:
    """Compare backbones on DATA: extract what is missing, fit the default probe, one table.

    Each backbone's cache is the default one of 'featbank extract DATA --backbone NAME' (reused
    when up to date, so only missing or changed images are embedded). Each gets the probe of
    'featbank fit' (linear, C chosen on validation, refitted on train+val, scored on DATA's test
    split), no bundle saved. A backbone that fails (weights not on this machine, ...) gets an error
    row, the others still run, and the exit code is then 2.
    """
    import json

    from featbank.comparison import CompareConfig, default_plot_path, format_table
    from featbank.comparison import compare as run_compare
    from featbank.errors import FeatbankError

    if no_plot:
        params["plot"] = None
    elif not params["plot"]:
        params["plot"] = str(default_plot_path(params["data"]))  # type: ignore[arg-type]
    # One mapping: every other click parameter is the CompareConfig field of the same name.
    config = CompareConfig(**params, progress=not quiet and not as_json)  # type: ignore[arg-type]
    rows = run_compare(config)
    click.echo(json.dumps(rows, indent=2, default=str) if as_json else format_table(rows))
    if config.plot is not None and not quiet:
        click.echo(f"Plot: {config.plot}", err=as_json)
    failed = [r["backbone"] for r in rows if r["error"] is not None]
    if failed:
        raise FeatbankError(f"{len(failed)} of {len(rows)} backbones failed ({', '.join(failed)}); the table says why. "
                            "Fix that (e.g. put the weights where the error says) and rerun: finished caches are reused.")
