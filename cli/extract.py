"""featbank extract DATA"""

from __future__ import annotations

import click

from .options import backbone_options, device_option, quiet_option


@click.command()
@click.argument("data", type=click.Path(path_type=str))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Cache file to write. Default: <cache dir>/caches/<folder>-<hash>-<backbone>.h5 "
              "($FEATBANK_CACHE_DIR, else ~/.cache/featbank).")
@backbone_options
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--num-workers", type=click.IntRange(min=0), default=None,
              help="Image-decoding processes. Default: CPU count - 1 (at most 8).")
@device_option
@click.option("--engine", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True,
              help="auto: onnxruntime on CPU (faster there), torch on CUDA.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Stored dtype of the embeddings.")
@click.option("--overwrite", is_flag=True, help="Replace a cache that was made with other settings.")
@click.option("--strict", is_flag=True, help="Exit with code 3 if any image was skipped (the cache is still written).")
@quiet_option
def extract(data, out, backbone, weights, weights_file, batch_size, num_workers, device, engine, dtype,
            overwrite, strict, quiet) -> None:
    """Embed every image in DATA with a frozen backbone into an HDF5 cache.

    DATA is an ImageFolder (DATA/<class>/<image>), a folder with train/val/test split folders
    (DATA/train/<class>/<image>), or a flat folder of unlabelled images. Reruns embed only new or
    changed files and resume an interrupted run; unreadable images are skipped and listed.

    \b
    Examples:
      featbank extract data/elpv
      featbank extract data/elpv --out runs/elpv.h5 --backbone resnet50 --weights IMAGENET1K_V2
      featbank extract data/photos --engine torch --device cuda --batch-size 256
    """
    import featbank

    report = featbank.extract(
        data, out, backbone=backbone, weights=weights, weights_file=weights_file, batch_size=batch_size,
        num_workers=num_workers, device=device, engine=engine, dtype=dtype, overwrite=overwrite,
        strict=strict, progress=not quiet,
    )
    if report.skipped and not quiet:
        click.echo(f"Skipped {report.n_skipped} file(s):", err=True)
        for path, reason in report.skipped[:20]:
            click.echo(f"  {path}: {reason}", err=True)
        if report.n_skipped > 20:
            click.echo(f"  ... and {report.n_skipped - 20} more (listed in the cache under skipped/)", err=True)
    click.echo(report.summary())
    click.echo(f"Cache: {report.path}")
