"""featbank cache info|verify|export"""

from __future__ import annotations

import click

__all__ = ["cache"]


@click.group()
def cache() -> None:
    """Inspect, check and export a feature cache.

    \b
    Examples:
      featbank cache info runs/elpv.h5
      featbank cache verify runs/elpv.h5
      featbank cache export runs/elpv.h5 --format npy --out vectors/
      featbank cache export runs/elpv.h5 --out vectors/ --layers stage5,final --view 0
    """


@cache.command()
@click.argument("path", type=click.Path(dir_okay=False))
def info(path: str) -> None:
    """Print what the cache holds: rows, classes, splits, backbone, key, parts, skipped files, layers and views."""
    from featbank.cache import describe_cache

    for line in describe_cache(path).lines():
        click.echo(line)


@cache.command()
@click.argument("path", type=click.Path(dir_okay=False))
def verify(path: str) -> None:
    """Check every part (v2: hashed against the index) and read every dataset through, layers and views too. Exit 0 or 2."""
    from featbank.cache import check_cache

    summary = check_cache(path)
    click.echo(f"ok: {summary.n_samples} rows" + (f" in {summary.n_parts} intact part(s)" if summary.schema_version >= 2 else "")
               + (f"; {summary.n_skipped} skipped input(s) under skipped/" if summary.n_skipped else ""))


@cache.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["npy", "parquet"]), default="npy", show_default=True,
              help="npy: embeddings-N.npy + metadata-N.parquet per shard; parquet: one table per shard with an embedding column.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the shards into.")
@click.option("--rows-per-file", type=click.IntRange(min=1), default=None,
              help="Rows per shard; default: one shard per part (v2) or 100,000 rows (v1).")
@click.option("--layers", default="final", show_default=True, metavar="SPEC",
              help="Layers of a cache extracted with --layers, concatenated in this order: 'stage5,final' or 'all'.")
@click.option("--view", type=click.IntRange(min=0), default=None,
              help="Export the k-th augmented view (0-based) of a cache extracted with --views; default: the plain view.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in --out (refused without it, so two never mix).")
def export(path: str, fmt: str, out: str, rows_per_file: int | None, layers: str, view: int | None,
           overwrite: bool) -> None:
    """Write the vectors as shards for faiss/autofaiss, LanceDB or Spark, one shard in memory at a time.

    By default the vectors are the final embeddings of the plain view; --layers and --view choose
    other stored columns (recorded in each parquet file's schema metadata, key 'featbank').
    """
    from featbank.cache import export_cache

    files = export_cache(path, out, format=fmt, rows_per_file=rows_per_file, layers=layers, view=view,
                         overwrite=overwrite)
    what = f"layers {layers}" + (f", view {view}" if view is not None else "")
    click.echo(f"wrote {len(files)} file(s) to {out} ({what})")
