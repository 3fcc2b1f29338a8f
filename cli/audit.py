"""featbank audit CACHE"""

from __future__ import annotations

import click

from .options import device_option, quiet_option

__all__ = ["audit"]

_EXAMPLES = """\b
Examples:
  featbank audit runs/elpv.h5 --report runs/elpv-audit
  featbank audit runs/elpv.h5 --json
  featbank audit runs/photos.h5 --threshold 0.95 --max-memory 4GB --report runs/photos-audit --overwrite
  featbank audit runs/elpv.h5 --verify pixels --dup-layers stage6 --report runs/elpv-audit  # 50 neighbours each
  featbank audit runs/big.h5 --search ivf --nprobe 32 --json
"""


@click.command(epilog=_EXAMPLES)
@click.argument("cache", type=click.Path(path_type=str))
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Folder for summary.json, one CSV per kind and index.html with contact sheets (opens offline).")
@click.option("--threshold", type=float, default=None,
              help="Cosine similarity at or above which two images are near-duplicates. Default: 0.95, measured "
                   "on changed copies (docs: 'featbank audit').")
@click.option("--neighbors", "k", type=click.IntRange(min=1), default=None,
              help="Nearest neighbours per image (duplicates and the kNN outlier score). Default: 10, and 50 with "
                   "--verify pixels.")
@click.option("--outlier-percentile", type=float, default=99.0, show_default=True,
              help="Images beyond this percentile of the kNN distance, or of low top class probability, are outliers.")
@click.option("--folds", "n_folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Folds of the out-of-fold probabilities (each image in one fold).")
@click.option("--method", type=click.Choice(["prune_by_noise_rate", "confident_joint"]), default="prune_by_noise_rate",
              show_default=True, help="Confident-learning rule that flags label errors.")
@click.option("--layers", default="final", show_default=True, metavar="SPEC",
              help="Cache layers compared and probed (the plain view): final, all, or names (stage6,final).")
@click.option("--max-memory", default="1GB", show_default=True, metavar="SIZE",
              help="Memory for the neighbour search's blocks (and above which the probe streams from disk).")
@click.option("--dup-layers", default=None, metavar="SPEC",
              help="Cache layers the duplicate search compares (default: --layers). An earlier layer (stage6) ranks "
                   "changed copies nearer their originals than the final one does (docs: 'featbank audit').")
@click.option("--verify", type=click.Choice(["none", "pixels"]), default="none", show_default=True,
              help="pixels: score every pair of --neighbors nearest images on their grey thumbnails (reads the images; "
                   "finds JPEG, resized, cropped and brightened copies that cosine misses).")
@click.option("--pixel-threshold", type=float, default=None,
              help="Thumbnail correlation at or above which a pair is a near-duplicate with --verify pixels. "
                   "Default: 0.99, measured (docs: 'featbank audit').")
@click.option("--search", type=click.Choice(["auto", "exact", "ivf"]), default="auto", show_default=True,
              help="Neighbour search: exact (blocked, every pair), ivf (faiss IVF over a PCA projection, pairs re-scored "
                   "exactly; for millions of images), auto = ivf from 200,000 images when faiss is installed.")
@click.option("--nprobe", type=click.IntRange(min=1), default=16, show_default=True,
              help="Cells the ivf search visits per image (more: slower, fewer pairs missed).")
@click.option("--backend", type=click.Choice(["auto", "torch", "faiss"]), default="auto", show_default=True,
              help="Similarity engine: auto = faiss when installed (CPU), torch on CUDA or when faiss is absent.")
@device_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds.")
@click.option("--top", type=click.IntRange(min=1), default=24, show_default=True,
              help="Pairs or images of each kind shown in the HTML report.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --report folder (refused otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@quiet_option
def audit(cache: str, report_dir: str | None, top: int, overwrite: bool, as_json: bool, quiet: bool,
          **settings: object) -> None:
    """Find duplicates and train/val/test leakage, likely label errors and outliers in a feature cache.

    Near-duplicates: cosine nearest neighbours of every image, computed block by block (memory
    bounded by --max-memory whatever the number of images; faiss IVF for millions), then, with
    --verify pixels, checked on the images' thumbnails. Label errors (labelled caches):
    out-of-fold probabilities of featbank's linear probe, then confident learning. Outliers: far
    from every image, or claimed by no class. Uses the plain view of --layers.
    """
    import json
    from pathlib import Path

    from featbank.audit import AuditSettings, check_report_dir, write_report
    from featbank.audit import audit as run_audit

    if report_dir is not None:
        check_report_dir(Path(report_dir), overwrite)
    # The one mapping: every other option is the AuditSettings field of the same name (thresholds left
    # out keep their measured defaults).
    given = {name: value for name, value in settings.items()
             if value is not None or name not in ("threshold", "pixel_threshold")}
    result = run_audit(cache, AuditSettings(**given))  # type: ignore[arg-type]
    if report_dir is not None:
        page = write_report(result, report_dir, overwrite=overwrite, top=top)
        if not quiet and not as_json:
            click.echo(f"Report: {page}", err=True)
    click.echo(json.dumps(result.summary, indent=2, default=str) if as_json else result.text())
