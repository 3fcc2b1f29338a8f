"""featbank fit [CACHE]"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from .options import device_option, quiet_option

if TYPE_CHECKING:
    from featbank.fitting import FitConfig

__all__ = ["fit", "fit_config"]

_EXAMPLES = """\b
Examples:
  featbank fit runs/elpv-d8.h5 --auto                       # let the autopilot choose, by 5-fold CV
  featbank fit runs/elpv-d8.h5 --auto --cv 10 --budget 5m --json
  featbank fit runs/elpv.h5 --head svm-rbf --cv 5           # one head, its grid by K-fold CV
  featbank fit
  featbank fit runs/elpv.h5 --head linear --class-weight balanced
  featbank fit runs/elpv.h5 --head mlp --param 'hidden_sizes=(512,)' --param dropout=0.3
  featbank fit runs/elpv.h5 --head SVC --param C=10 --param kernel=rbf
  featbank fit runs/elpv.h5 --shots 10 --seeds 0,1,2
  featbank fit runs/elpv.h5 --out models/elpv-linear
  featbank fit runs/elpv.h5 --no-refit --name elpv-probe    # the start of an LP-FT
  featbank fit runs/elpv-layers.h5 --layers auto            # select layers on validation
  featbank fit runs/elpv-layers.h5 --layers stage6,final --tta auto
"""


@click.command(epilog=_EXAMPLES)
@click.argument("cache", required=False, type=click.Path(path_type=str))
@click.option("--head", default="linear", show_default=True,
              help="linear (L-BFGS logistic regression, C sweep), mlp, a head family of --auto with --cv K (svm-rbf, "
                   "svm-linear, knn), or a scikit-learn classifier name (SVC, ...).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Head parameter, repeatable; values are Python literals (C=0.1, 'hidden_sizes=(512,256)', kernel=rbf); "
                   "quote values with parentheses for the shell.")
@click.option("--standardize/--no-standardize", default=True, show_default=True,
              help="Standardise features (stored with the head).")
@click.option("--l2-normalize", is_flag=True, help="L2-normalise each embedding first.")
@click.option("--val-split", type=float, default=0.2, show_default=True,
              help="Stratified fraction of train held out for selection when the cache has no val split.")
@click.option("--refit/--no-refit", default=True, show_default=True,
              help="Refit the chosen head on train+val. --no-refit keeps the validation images unseen "
                   "(for 'featbank finetune --init-head').")
@click.option("--class-weight", type=click.Choice(["balanced"]), default=None, help="Reweight classes for imbalanced data.")
@click.option("--shots", type=click.IntRange(min=1), default=None, help="Sample K training images per class.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds of the --shots sampling (mean ± std).")
@click.option("--layers", default="final", show_default=True, metavar="auto|all|SPEC",
              help="Cache layers the head reads: final, auto (greedy selection on the validation split), all, or names "
                   "and ranges of the cache's layers (stage6,final; stage5-final).")
@click.option("--tta", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Average predictions over the cache's augmented views: auto = when it helps on validation.")
@click.option("--train-views/--no-train-views", default=True, show_default=True,
              help="Train on the augmented views of the training images too (when the cache has views).")
@click.option("--pool-views", is_flag=True,
              help="One row per image: the mean and the max of each feature over its plain and hflip/dihedral views "
                   "(invariant to them; predict and export make the same views). Replaces --train-views and TTA.")
@click.option("--auto", is_flag=True,
              help="Probe autopilot: search feature sets (final, --layers auto, all), views (plain, pooled), "
                   "preprocessing and head families by repeated K-fold CV on train+val within --budget; refit the winner, "
                   "score it once on test. Prints the leaderboard.")
@click.option("--cv", type=click.IntRange(min=2), default=None, metavar="K",
              help="K-fold CV on train+val: the folds of --auto (default 5), or alone the head's sweep by K-fold "
                   "instead of one validation split.")
@click.option("--budget", default=None, metavar="DURATION",
              help="Time the search may take, the layer selection and loading included: 90s, 2m, 1h (default 90s; "
                   "the refit comes on top). Planned by the measured speed of the candidates scored. Alone (without "
                   "--auto or --cv) it searches the head's grid by 5-fold CV, as --cv 5 does.")
@click.option("--max-memory", default=None, metavar="SIZE", help="e.g. 2GB; below the data size, linear/mlp stream from disk.")
@device_option
@click.option("--out", "-o", type=click.Path(path_type=str), default=None,
              help="Bundle folder, e.g. models/elpv-linear (as in 'featbank finetune'). Default: models/<name>.")
@click.option("--name", default=None, help="Instead of --out: the bundle models/NAME. Default: <cache>-<head>.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the validation split and the heads.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out/--name (refused otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@quiet_option
def fit(cache, as_json, quiet, **options) -> None:
    """Fit a head on a feature cache, report metrics and save a model bundle.

    CACHE defaults to the newest complete cache in the default cache folder, said on stderr (refused
    when that folder holds caches of more than one data folder: pass one). The hyperparameter is
    chosen on the validation split, the head refitted on train+val (unless --no-refit) and
    evaluated on the test split.
    """
    import json

    from featbank.fitting import fit as fit_head

    config = fit_config(options)  # checked before a cache is chosen or opened
    if config.auto:  # --head linear / --layers final / --standardize name the defaults, which FitConfig cannot tell apart
        from featbank.fitting.config import refuse_with_auto

        ctx = click.get_current_context()
        refuse_with_auto([f"--{n}" for n in ("head", "layers", "standardize")
                          if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE])
    if cache is None and not as_json:
        from featbank.cache import choose_cache

        choice = choose_cache()
        cache = str(choice.path)
        if not quiet:
            click.echo(f"Using cache {cache}: {choice.reason}. Pass CACHE to use another.", err=True)
    result = fit_head(cache, config=config)
    click.echo(json.dumps(result.to_dict(), indent=2, default=str) if as_json else result.summary())


def fit_config(options: dict[str, Any]) -> FitConfig:
    """The one mapping of fit's click options onto :class:`~featbank.fitting.FitConfig`."""
    from featbank.errors import ConfigError
    from featbank.fitting import FitConfig
    from featbank.heads import parse_param

    options = dict(options)
    seeds = options.pop("seeds")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers like 0,1,2; got {seeds!r}.") from None
    params = dict(parse_param(p) for p in options.pop("params"))
    if not options["shots"] and seed_list != [0]:  # the default; --seeds means nothing without --shots
        raise ConfigError("--seeds repeats K-shot sampling; give --shots K with it (e.g. --shots 10 --seeds 0,1,2), "
                          "or --seed N for the seed of one run.")
    return FitConfig(params=params, seeds=seed_list if options["shots"] else [options["seed"]], **options)
