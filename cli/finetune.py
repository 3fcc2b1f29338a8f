"""featbank finetune DATA"""

from __future__ import annotations

import click

from .options import backbone_options, device_option, quiet_option

__all__ = ["finetune"]


@click.command()
@click.argument("data", type=click.Path(path_type=str))
@backbone_options
@click.option("--strategy", type=click.Choice(["frozen", "partial", "full"]), default="partial", show_default=True,
              help="frozen: only a new head trains; partial: groups from --trainable-from on; full: everything.")
@click.option("--trainable-from", metavar="GROUP", default=None,
              help="partial: first group that trains (default: the middle one). See 'featbank backbones --groups NAME'.")
@click.option("--lr", type=float, default=None, help="Rate of groups not set otherwise. Default 1e-2 (sgd), 3e-4 (adamw); "
              "10x lower with --init-head (1e-3, 3e-5 for adamw).")
@click.option("--lr-groups", metavar="SPEC", default=None,
              help="Per-group rates: a preset (seed, seed-resnet, seed-lite) or 'group=lr,...' (e.g. 'layer4=1e-3,head=1e-2').")
@click.option("--layer-decay", type=float, default=None,
              help="Geometric rates: the group k places below the head gets lr * decay**k.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True,
              help="sgd uses momentum 0.9.")
@click.option("--weight-decay", type=float, default=None, help="Default 1e-4 (sgd), 0.05 (adamw); not on biases/norms.")
@click.option("--init-head", metavar="MODEL", default=None,
              help="LP-FT: start from this linear head bundle ('featbank fit --head linear --no-refit'); "
              "without a val folder, validate on the images the probe held out.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--val-split", type=float, default=0.2, show_default=True,
              help="Fraction of each class held out for validation when DATA has no val folder (and no --init-head).")
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes the head init, split, order and augmentation.")
@click.option("--train-bn", is_flag=True, help="Also train BatchNorm layers of frozen groups "
              "(default: eval mode, stats unchanged).")
@click.option("--bn-stats", type=click.Choice(["auto", "frozen", "train"]), default="auto", show_default=True,
              help="BatchNorm running statistics: frozen keeps the pretrained ones everywhere; train updates "
              "those of trainable groups; auto = frozen with --init-head (LP-FT), else train.")
@click.option("--patience", type=click.IntRange(min=0), default=5, show_default=True,
              help="Early stopping: epochs without a better val metric (0: never stop early).")
@click.option("--metric", type=click.Choice(["balanced_accuracy", "accuracy"]), default="balanced_accuracy",
              show_default=True, help="Validation metric for early stopping and the best checkpoint.")
@click.option("--crop-scale", type=(float, float), default=(0.25, 1.0), show_default=True, metavar="MIN MAX",
              help="Area range of the training random resized crop; raise MIN when small details carry the label.")
@click.option("--vflip", is_flag=True, help="Also flip training images vertically at random.")
@click.option("--rot90", is_flag=True, help="Also rotate training images by random multiples of 90 degrees.")
@click.option("--cache-frozen", is_flag=True,
              help="partial/frozen: run the frozen groups once per image and flip/turn view, keep their outputs "
              "in memory and train only the rest (fast epochs; no random crops).")
@device_option
@click.option("--num-workers", type=click.IntRange(min=0), default=None, help="Image-decoding processes.")
@click.option("--out", "-o", type=click.Path(path_type=str), default=None,
              help="Bundle folder. Default: models/<data>-<backbone>-<strategy>[-lpft].")
@click.option("--resume", is_flag=True, help="Continue the checkpoint (<out>.ckpt/) of an interrupted run.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle and discard its checkpoint.")
@quiet_option
def finetune(data: str, out: str | None, device: str, num_workers: int | None, resume: bool, overwrite: bool,
             quiet: bool, **settings: object) -> None:
    """Fine-tune a backbone with a new linear head on DATA and write a model bundle.

    Checkpoints are written every epoch; rerun with --resume after a crash or Ctrl-C. The
    bundle works with 'featbank evaluate', 'predict', 'export', and as --backbone of 'extract'.

    \b
    Examples:
      featbank finetune data/elpv --strategy partial --trainable-from stage4 --epochs 10
      featbank finetune data/pets -b resnet50 --strategy full --lr-groups seed-resnet
      featbank fit --head linear --no-refit --name probe
      featbank finetune data/elpv --strategy full --init-head models/probe --lr-groups seed-lite
      featbank finetune data/elpv --resume
    """
    import featbank.finetuning as ft

    # One mapping: every other click parameter is the FinetuneSettings field of the same name.
    config = ft.FinetuneSettings(**settings)  # type: ignore[arg-type]
    report = ft.finetune(data, out, settings=config, device=device, num_workers=num_workers, resume=resume,
                         overwrite=overwrite, progress=not quiet)
    if report.skipped and not quiet:
        click.echo(f"Skipped {len(report.skipped)} unreadable image(s), e.g. {report.skipped[0]}", err=True)
    click.echo(report.summary())
    click.echo(f"Model: {report.path}")
