"""featbank backbones"""

from __future__ import annotations

import click

__all__ = ["backbones"]


@click.command()
@click.option("--all", "include_all", is_flag=True, help="Also list every torchvision classification model.")
@click.option("--groups", "groups_of", metavar="NAME", default=None,
              help="Show the parameter groups (for finetune --lr-groups) of this backbone.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def backbones(include_all: bool, groups_of: str | None, as_json: bool) -> None:
    """List backbones: embed dim, input size, weights source, and whether the weights are here.

    Any torchvision classification model (resnet50) and any timm model (timm:convnext_tiny)
    also works by name once its weights are in the local torch/Hugging Face cache or given with
    --weights-file.

    \b
    Examples:
      featbank backbones
      featbank backbones --all
      featbank backbones --groups efficientnet_lite0
    """
    import json

    import featbank

    if groups_of is not None:
        groups = featbank.backbone_groups(groups_of)
        if as_json:
            click.echo(json.dumps(groups, indent=2))
            return
        for name, info in groups.items():
            click.echo(f"{name:<12} {info['n_params']:>10,d} params  {', '.join(info['modules'])}")
        return
    rows = featbank.list_backbones(include_all=include_all)
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in rows], indent=2, default=list))
        return
    click.echo(f"{'name':<24} {'dim':>5} {'input':>9}  {'offline':<7}  source / weights")
    for r in rows:
        size = f"{r.input_size[0]}x{r.input_size[1]}" if r.input_size else "-"
        dim = str(r.embed_dim) if r.embed_dim else "-"
        click.echo(f"{r.name:<24} {dim:>5} {size:>9}  {'yes' if r.available else 'no':<7}  {r.source} [{r.weights}]")
        if not r.available:
            click.echo(f"{'':<24} {'':>5} {'':>9}  {'':<7}  -> {r.location}")
    click.echo("\nAlso: any torchvision model name (resnet50 --weights IMAGENET1K_V2) or timm name "
               "(timm:convnext_tiny) whose weights are in the local cache, or with --weights-file.\n"
               "Any name with @SIZE appended (efficientnet_lite0@300) is that network fed the whole image at "
               "SIZE x SIZE pixels.")
