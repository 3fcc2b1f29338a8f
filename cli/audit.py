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
"""


@click.command(epilog=_EXAMPLES)
@click.argument("cache", type=click.Path(path_type=str))
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Folder for summary.json, one CSV per kind and index.html with contact sheets (opens offline).")
@click.option("--threshold", type=float, default=None,
              help="Cosine similarity at or above which two images are near-duplicates. Default: 0.95, measured "
                   "on changed copies (README 'featbank audit').")
@click.option("--neighbors", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Nearest neighbours per image (duplicates and the kNN outlier score).")
@click.option("--outlier-percentile", type=float, default=99.0, show_default=True,
              help="Images beyond this percentile of the kNN distance, or of low top class probability, are outliers.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Folds of the out-of-fold probabilities (each image in one fold).")
@click.option("--method", type=click.Choice(["prune_by_noise_rate", "confident_joint"]), default="prune_by_noise_rate",
              show_default=True, help="Confident-learning rule that flags label errors.")
@click.option("--layers", default="final", show_default=True, metavar="SPEC",
              help="Cache layers compared and probed (the plain view): final, all, or names (stage6,final).")
@click.option("--max-memory", default="1GB", show_default=True, metavar="SIZE",
              help="Memory for the neighbour search's blocks (and above which the probe streams from disk).")
@click.option("--backend", type=click.Choice(["auto", "torch", "faiss"]), default="auto", show_default=True,
              help="Similarity engine: auto = faiss when installed (CPU), torch on CUDA or when faiss is absent.")
@device_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds.")
@click.option("--top", type=click.IntRange(min=1), default=24, show_default=True,
              help="Pairs or images of each kind shown in the HTML report.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --report folder (refused otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@quiet_option
def audit(cache, report_dir, threshold, k, outlier_percentile, folds, method, layers, max_memory, backend, device,
          seed, top, overwrite, as_json, quiet) -> None:
    """Find duplicates and train/val/test leakage, likely label errors and outliers in a feature cache.

    Near-duplicates: exact cosine nearest neighbours of every image, computed block by block
    (memory bounded by --max-memory whatever the number of images). Label errors (labelled caches):
    out-of-fold probabilities of featbank's linear probe, then confident learning. Outliers: far
    from every image, or claimed by no class. Uses the plain view of --layers.
    """
    import json
    from pathlib import Path

    from featbank.audit import DEFAULT_THRESHOLD, AuditSettings, check_report_dir, write_report
    from featbank.audit import audit as run_audit

    if report_dir is not None:
        check_report_dir(Path(report_dir), overwrite)
    settings = AuditSettings(threshold=DEFAULT_THRESHOLD if threshold is None else threshold, k=k,
                             outlier_percentile=outlier_percentile, n_folds=folds, method=method, layers=layers,
                             max_memory=max_memory, backend=backend, device=device, seed=seed)
    result = run_audit(cache, settings)
    if report_dir is not None:
        page = write_report(result, report_dir, overwrite=overwrite, top=top)
        if not quiet and not as_json:
            click.echo(f"Report: {page}", err=True)
    click.echo(json.dumps(result.summary, indent=2, default=str) if as_json else result.text())
