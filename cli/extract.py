"""featbank extract DATA"""

from __future__ import annotations

import os

import click

from .options import backbone_options, device_option, engine_option, feature_options, quiet_option, window_option

__all__ = ["extract"]


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
@engine_option()
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Stored dtype of the embeddings.")
@click.option("--overwrite", is_flag=True, help="Replace a cache that was made with other settings.")
@click.option("--strict", is_flag=True, help="Exit with code 3 if any image was skipped (the cache is still written).")
@click.option("--procs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local worker processes (one per GPU when GPUs are used).")
@click.option("--launcher", type=click.Choice(["auto", "local", "torchrun", "ray"]), default=None,
              help="Who runs the shards. auto: torchrun when WORLD_SIZE > 1, else local processes. "
              "ray: one Ray task per shard (pip install 'featbank[ray]'). Any value: a sharded cache.")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="Rows per shard (part file) of a new cache, at most 1,000,000. Default: 10000.")
@click.option("--rank", type=int, default=None, metavar="R",
              help="Run slice R (0 to W-1) of a job array of --world W jobs (e.g. --rank $SLURM_ARRAY_TASK_ID) and "
              "publish nothing; slices run at any time, in any order. Then run --finalize once.")
@click.option("--world", type=int, default=None, metavar="W", help="Jobs in the job array (with --rank or --finalize).")
@click.option("--finalize", is_flag=True,
              help="Embed nothing: gather the work of a job array's slices (--rank) and publish the index; names "
              "the missing shards (and ranks, with --world) if a slice has not finished.")
@click.option("--num-gpus", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="GPUs per Ray task (--launcher ray).")
@click.option("--max-retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="Retries of a Ray task whose worker died (--launcher ray).")
@click.option("--path-column", default="path", show_default=True, help="Manifest column of image paths.")
@click.option("--label-column", default="label", show_default=True, help="Manifest column of labels (optional).")
@click.option("--split-column", default="split", show_default=True, help="Manifest column of splits (optional).")
@click.option("--label-from", type=click.Choice(["cls", "txt", "json", "none"]), default="cls", show_default=True,
              help="WebDataset member that holds the label.")
@feature_options
@click.option("--decode", type=click.Choice(["pillow", "gpu", "auto"]), default="pillow", show_default=True,
              help="Who decodes and resizes: pillow (in the workers), gpu (JPEGs in batches by torchvision on the "
              "device, nvJPEG on CUDA; other files via Pillow; keyed in the cache), auto (gpu on CUDA, else pillow). "
              "gpu refuses --layers, --views and WebDataset input.")
@window_option
@quiet_option
def extract(quiet: bool, **params: object) -> None:
    """Embed every image in DATA with a frozen backbone into an HDF5 cache.

    DATA is an ImageFolder (DATA/<class>/<image>), a folder with train/val/test split folders
    (DATA/train/<class>/<image>), a flat folder of unlabelled images, a CSV/TSV/parquet manifest
    with a path column, or WebDataset shards (a folder of .tar files or shards/{000000..000099}.tar).
    DICOM files (.dcm, or files with the DICOM preamble; pip install 'featbank[dicom]') are read
    with their modality LUT, the --window rule and MONOCHROME1 inverted; a multi-frame file gives
    its middle frame.
    Reruns embed only new or changed files and resume an interrupted run; unreadable images are
    skipped and listed. The cache is an index over part files of about --shard-size rows (schema
    v2, docs/formats.md), so a rerun rewrites only the parts that changed; a schema-v1 cache
    is migrated. --procs, torchrun or --launcher ray run the shards in parallel; a job array runs
    --rank R --world W per job, then --finalize once (docs/at-scale.md). The index stores this
    run's settings (the ExtractConfig) as JSON.

    \b
    Examples:
      featbank extract data/elpv
      featbank extract data/elpv --out runs/elpv.h5 --backbone resnet50 --weights IMAGENET1K_V2
      featbank extract data/photos --engine torch --device cuda --batch-size 256
      featbank extract data/photos --device cuda --decode gpu --batch-size 256
      featbank extract data/elpv --layers stage3,stage5,final --views 4 --augment dihedral
      featbank extract data/ct --window lung
      featbank extract data/photos --out runs/photos.h5 --procs 4
      torchrun --nproc-per-node 8 -m featbank.cli extract data/photos --out runs/photos.h5
      featbank extract 'shards/{000000..000099}.tar' --out runs/wds.h5 --launcher ray
      featbank extract data/photos --out runs/photos.h5 --rank $SLURM_ARRAY_TASK_ID --world 16
      featbank extract data/photos --out runs/photos.h5 --finalize --world 16
    """
    import featbank
    from featbank.extraction.launchers import prestart

    # Local workers' fork server: it imports torch while this process builds and checks the config.
    prestart(params["procs"], params["launcher"], job_array=params["rank"] is not None or bool(params["finalize"]))  # type: ignore[arg-type]
    # One mapping: every click parameter is the ExtractConfig field of the same name (--quiet: progress).
    report = featbank.extract(featbank.ExtractConfig(**params, progress=not quiet))  # type: ignore[arg-type]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        return  # torchrun: rank 0 reports for every rank (errors still reach each rank's stderr)
    if report.skipped and not quiet:
        click.echo(f"Skipped {report.n_skipped} file(s):", err=True)
        for path, reason in report.skipped[:20]:
            click.echo(f"  {path}: {reason}", err=True)
        if report.n_skipped > 20:
            click.echo(f"  ... and {report.n_skipped - 20} more (listed in the cache under skipped/)", err=True)
    click.echo(report.summary())
    if report.published:
        click.echo(f"Cache: {report.path}")
