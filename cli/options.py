"""Options shared by several commands, defined once and stacked as decorators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from featbank.features import DEFAULT_POOLING, POOLINGS

__all__ = ["backbone_options", "device_option", "engine_option", "feature_options", "quiet_option", "window_option"]

F = Callable[..., Any]


def backbone_options(f: F) -> F:
    f = click.option(
        "--weights-file",
        type=click.Path(dir_okay=False, path_type=str),
        default=None,
        help="Load this local state_dict (loaded with weights_only=True) instead of the default weights.",
    )(f)
    f = click.option(
        "--weights",
        default=None,
        metavar="NAME",
        help="Weights of the backbone: a torchvision enum name (IMAGENET1K_V2), or 'random' "
        "(no pretraining, warns). Default: the backbone's default pretrained weights.",
    )(f)
    f = click.option(
        "--backbone",
        "-b",
        default="efficientnet_lite0",
        show_default=True,
        help="Backbone name (see 'featbank backbones'), or a fine-tuned bundle folder; NAME@SIZE feeds it whole "
        "SIZE x SIZE images (efficientnet_lite0@300).",
    )(f)
    return f


def device_option(f: F) -> F:
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="Where to run the network; auto picks CUDA when a GPU is visible.",
    )(f)


def engine_option(help: str = "auto: onnxruntime on CPU (faster there), torch on CUDA.") -> Callable[[F], F]:
    """``--engine auto|torch|onnxruntime`` (``featbank.extraction.ENGINES``, spelled out here so that the command
    line starts without importing it); ``help`` says what it changes for the command."""
    return click.option("--engine", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto",
                        show_default=True, help=help)


def feature_options(f: F) -> F:
    """What extract stores besides the embedding (and doctor times): --layers, --pooling, --views, --augment,
    --view-seed."""
    f = click.option(
        "--view-seed", type=click.IntRange(min=0), default=0, show_default=True,
        help="Seed of the crops views (with the image path and view index).",
    )(f)
    f = click.option(
        "--augment", type=click.Choice(["hflip", "dihedral", "crops"]), default=None,
        help="How the views are made: hflip (K=1), dihedral (flips and quarter turns, K<=7), crops (K seeded "
        "random resized crops).",
    )(f)
    f = click.option(
        "--views", type=click.IntRange(min=0), default=0, show_default=True,
        help="K augmented views per image (at most 64), stored beside the plain view (needs --augment).",
    )(f)
    f = click.option(
        "--pooling", type=click.Choice(list(POOLINGS)), default=DEFAULT_POOLING, show_default=True,
        help="How a layer's feature map is pooled: global average + 2x2 average (5C values; the global average "
        "alone above 4096); gap+2x2+max: the same followed by the same cells' maxima (10C; a wider layer drops the "
        "2x2 maxima, then the global maximum, to fit 4096), for small local patterns; gap: global average (C).",
    )(f)
    f = click.option(
        "--layers", default=None, metavar="SPEC",
        help="Intermediate layers to store besides the embedding: 'stage3,stage5,final', 'stage3-final' or 'all' "
        "(names: 'featbank backbones --groups NAME', plus final). Default: final (the embedding alone).",
    )(f)
    return f


def quiet_option(f: F) -> F:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar or notes on stderr; print only the result.")(f)


def _parse_window(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from featbank.windowing import parse_window

    try:
        return parse_window(value).spec
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def window_option(f: F) -> F:
    return click.option(
        "--window",
        default="none",
        show_default=True,
        metavar="RULE",
        callback=_parse_window,
        help="How grey high-bit-depth images (DICOM, 16-bit PNG/TIFF) become 8 bits: none (scale the full range), "
        "auto (the DICOM file's own VOI window, else the 0.5-99.5 percentile range), a CT preset in Hounsfield "
        "units (lung -600,1500; soft-tissue 50,400; bone 400,1800; brain 40,80) or C,W (centre,width). Part of "
        "the transform: keyed in the cache and applied by predict, evaluate and export.",
    )(f)
