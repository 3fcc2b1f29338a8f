"""Intermediate-layer features ("taps"): which layers a backbone offers, how each is pooled, and a
module that returns them all in one forward pass.

Tap names are the stage names of :func:`~featbank.backbones.param_groups` (``stem``,
``stage1``..``stage7``, ``head_conv`` for EfficientNet-Lite; ``stem``, ``layer1``..``layer4`` for
ResNets; ``stem``, ``stage1``, ``stage2`` for ``test_tiny``) plus ``final``, the embedding
extraction stores today. A tap is the output of its group's last module (for a ResNet stem, of
``maxpool``: after the ReLU, as the next stage sees it).

Pooling (Head2Toe style, so that every layer contributes at most a few thousand values):

- ``gap+2x2`` (default): a feature map ``(B, C, H, W)`` becomes its global average (``C`` values)
  followed by a 2x2 adaptive average pool flattened channel-major (``4C`` values: channel 0's
  four quadrants, then channel 1's, ...) = ``5C`` values. A layer whose ``5C`` would exceed
  :data:`MAX_TAP_DIM` (4096) keeps the global average alone (``C`` values).
- ``gap+2x2+max``: the ``gap+2x2`` columns followed by the same cells' maxima (the global maximum,
  ``C`` values, then the 2x2 maxima, ``4C``, channel-major) = ``10C`` values. Max pooling keeps a
  small local pattern (a crack, a defect) that an average over the map dilutes. A wider layer drops
  parts from the end until it fits :data:`MAX_TAP_DIM`: the 2x2 maxima (``6C``), then the global
  maximum (``5C``, exactly ``gap+2x2``); a layer too wide for ``gap+2x2`` keeps the global average
  and maximum (``2C``), or the average alone. So a layer's first columns are always exactly its
  ``gap+2x2`` columns, whatever its width.
- ``gap``: the global average alone.

Token outputs ``(B, N, C)`` are averaged over the tokens; ``(B, C)`` outputs are kept. ``final``
is never pooled again: it is exactly the backbone's embedding.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..features import DEFAULT_POOLING, POOLINGS
from ._registry import Backbone, ImageEmbedder, Normalize

__all__ = [
    "FINAL",
    "POOLINGS",
    "DEFAULT_POOLING",
    "MAX_TAP_DIM",
    "available_layers",
    "parse_layers",
    "layer_dims",
    "pool_tap",
    "TapModel",
]

#: The tap that is today's embedding (the backbone's pooled output).
FINAL = "final"
#: The most values a pooled tap may have: a wider pooling drops parts (see the module docstring).
MAX_TAP_DIM = 4096

_MEMO: dict[str, list[str]] = {}


def _features(backbone: Backbone | nn.Module) -> nn.Module:
    return backbone.features if isinstance(backbone, Backbone) else backbone


def _tap_points(features: nn.Module) -> list[tuple[str, str]]:
    """``[(tap name, module name)]`` from input to output: each group's last module."""
    from ._groups import group_modules, param_groups

    modules = dict(features.named_modules())
    out = []
    for group, pnames in param_groups(features):
        names = group_modules(features, pnames)
        name = names[-1]
        if group == "stem" and "layer1" in modules and "maxpool" in modules:
            name = "maxpool"  # ResNet: the stem ends after ReLU and max-pool, not at its BatchNorm
        if name in modules:
            out.append((group, name))
    return out


def _resolve(backbone: Backbone | nn.Module | str | os.PathLike) -> Backbone | nn.Module:
    if isinstance(backbone, (Backbone, nn.Module)):
        return backbone
    import warnings

    from ..errors import RandomWeightsWarning, WeightsUnavailable
    from ._factory import load_backbone
    from ._registry import RANDOM

    name = os.fspath(backbone)
    try:
        return load_backbone(name)
    except WeightsUnavailable:  # the architecture is all the tap names need
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            return load_backbone(name, weights=RANDOM)


def available_layers(backbone: Backbone | nn.Module | str | os.PathLike) -> list[str]:
    """The tap names of a backbone, from input to output, ending with ``final``.

    Args:
        backbone: a :class:`Backbone`, its ``features`` module, or a backbone name (loaded; random
            weights when its weights are not on disk, since only the architecture matters).

    Example:
        >>> available_layers("test_tiny")
        ['stem', 'stage1', 'stage2', 'final']
    """
    if isinstance(backbone, (str, os.PathLike)):
        key = os.fspath(backbone)
        if key not in _MEMO:
            _MEMO[key] = available_layers(_resolve(backbone))
        return list(_MEMO[key])
    return [t for t, _ in _tap_points(_features(backbone))] + [FINAL]


def _unknown(name: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"Unknown layer {name!r} in --layers.{hint} This backbone's layers are: {', '.join(known)} "
        "(or 'all'; a range such as 'stage3-final')."
    )


def parse_layers(spec: str | Sequence[str] | None, backbone: Backbone | nn.Module | str | os.PathLike) -> tuple[str, ...]:
    """The taps a ``--layers`` value names, in network order.

    Args:
        spec: ``None`` or ``"final"`` (the embedding alone), ``"all"``, a comma-separated list
            (``"stage3,stage5,final"``), ranges (``"stage3-final"``, inclusive), or a sequence of
            names. Order and repeats in ``spec`` do not matter.
        backbone: what :func:`available_layers` takes.

    Returns:
        The tap names, ordered from input to output.

    Raises:
        ConfigError: an unknown name (the message lists the available ones), an empty spec, or a
            range that runs backwards.
    """
    if spec is None:
        return (FINAL,)
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    if spec == FINAL or items == [FINAL]:
        return (FINAL,)
    known = available_layers(backbone)
    if not items or any(not s for s in items):
        raise ConfigError(f"The 'layers' parameter must name layers: got {spec!r}. This backbone's layers are: "
                          f"{', '.join(known)} (or 'all').")
    chosen: set[str] = set()
    for item in items:
        if item == "all":
            chosen.update(known)
            continue
        if item in known:  # before ranges: a layer name may hold a dash
            chosen.add(item)
            continue
        a, dash, b = item.partition("-")
        if dash:
            a, b = a.strip(), b.strip()
            for n in (a, b):
                if n not in known:
                    raise _unknown(n, known)
            i, j = known.index(a), known.index(b)
            if i > j:
                raise ConfigError(f"The layer range {item!r} runs backwards; layers go from input to output: "
                                  f"{', '.join(known)}. Write '{b}-{a}'.")
            chosen.update(known[i:j + 1])
        else:
            raise _unknown(item, known)
    return tuple(n for n in known if n in chosen)


#: The parts of each pooling, widest first. The first that fits in :data:`MAX_TAP_DIM` is used; the
#: last, the global average alone, is used whatever the width.
_POOL_PARTS = {
    "gap+2x2": (("avg", "avg2x2"), ("avg",)),
    "gap+2x2+max": (("avg", "avg2x2", "max", "max2x2"), ("avg", "avg2x2", "max"), ("avg", "avg2x2"), ("avg", "max"),
                    ("avg",)),
    "gap": (("avg",),),
}


def _width(parts: Sequence[str]) -> int:
    """Values per channel: 1 for a global part, 4 for a 2x2 one."""
    return sum(4 if p.endswith("2x2") else 1 for p in parts)


def _pool_parts(channels: int, pooling: str) -> tuple[str, ...]:
    """Which pooled parts a ``channels``-wide feature map gets (see the module docstring)."""
    choices = _POOL_PARTS[pooling]
    return next((parts for parts in choices if _width(parts) * channels <= MAX_TAP_DIM), choices[-1])


def _pooled_dim(shape: Sequence[int], pooling: str) -> int:
    if len(shape) != 4:
        return int(shape[-1])
    c = int(shape[1])
    return c * _width(_pool_parts(c, pooling))


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"The 'pooling' parameter must be one of {POOLINGS}. Got {pooling!r} instead.")


def _cells_2x2(x: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    # adaptive_{avg,max}_pool2d(x, 2) written with static slices: the same bins (floor/ceil edges,
    # which overlap on odd sizes), and it exports to ONNX for any H, W (the ONNX op needs divisible ones).
    h, w = int(x.shape[2]), int(x.shape[3])
    cells = []
    for i in range(2):
        h0, h1 = (i * h) // 2, -((-(i + 1) * h) // 2)
        for j in range(2):
            w0, w1 = (j * w) // 2, -((-(j + 1) * w) // 2)
            cell = x[:, :, h0:h1, w0:w1]
            cells.append(cell.mean(dim=(2, 3)) if reduce == "mean" else cell.amax(dim=(2, 3)))
    return torch.stack(cells, dim=2).flatten(1)  # channel-major: c0q0 c0q1 c0q2 c0q3 c1q0 ...


_POOL_OPS = {
    "avg": lambda x: x.mean(dim=(2, 3)),
    "avg2x2": lambda x: _cells_2x2(x, "mean"),
    "max": lambda x: x.amax(dim=(2, 3)),
    "max2x2": lambda x: _cells_2x2(x, "max"),
}


def pool_tap(x: torch.Tensor, pooling: str = DEFAULT_POOLING) -> torch.Tensor:
    """One tap's output pooled to ``(B, D)`` float32 (see the module docstring for the rule)."""
    _check_pooling(pooling)
    if isinstance(x, (tuple, list)):
        x = x[0]
    x = x.float()
    if x.ndim == 4:
        parts = _pool_parts(int(x.shape[1]), pooling)
        pooled = [_POOL_OPS[p](x) for p in parts]
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)
    if x.ndim == 3:
        return x.mean(dim=1)
    return x.flatten(1)


class TapModel(nn.Module):
    """uint8 NHWC images -> a tuple of pooled ``(B, D_tap)`` float tensors, one per requested tap.

    Normalisation is inside (as in :class:`~featbank.backbones.ImageEmbedder`); the backbone runs
    once and forward hooks collect the intermediate outputs, so ``final`` is the embedder's own
    output, bit for bit. Traceable by ``torch.onnx.export`` (one output per tap, in ``layers``
    order); extraction computes cached features with this module.

    Args:
        backbone: a loaded :class:`Backbone`.
        layers: tap names (any order is accepted; the outputs follow network order, as
            :func:`parse_layers` returns them) or a ``--layers`` spec.
        pooling: one of :data:`POOLINGS`.

    Attributes:
        layers: the taps, in output order.
        pooling: the pooling name.

    Example:
        >>> model = TapModel(load_backbone("test_tiny"), "stage1,final")
        >>> [t.shape for t in model(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))]
        [torch.Size([2, 80]), torch.Size([2, 32])]
    """

    def __init__(self, backbone: Backbone, layers: str | Sequence[str] | None = None, pooling: str = DEFAULT_POOLING):
        super().__init__()
        _check_pooling(pooling)
        self.layers = parse_layers(layers, backbone)
        self.pooling = pooling
        self.embedder = ImageEmbedder(Normalize(backbone.preprocess.mean, backbone.preprocess.std), backbone.features)
        points = dict(_tap_points(backbone.features))
        modules = dict(backbone.features.named_modules())
        self._outputs: dict[str, Any] = {}
        self._handles = []
        for tap in self.layers:
            if tap != FINAL:
                self._handles.append(modules[points[tap]].register_forward_hook(self._keeper(tap)))

    def _keeper(self, tap: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._outputs[tap] = output

        return hook

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._outputs.clear()
        final = self.embedder(x)
        outs = tuple(final if t == FINAL else pool_tap(self._outputs[t], self.pooling) for t in self.layers)
        self._outputs.clear()
        return outs

    def remove_hooks(self) -> None:
        """Detach the hooks from the backbone's modules (the backbone is shared, not copied)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def layer_dims(backbone: Backbone | str | os.PathLike, layers: str | Sequence[str] | None = None,
               pooling: str = DEFAULT_POOLING) -> dict[str, int]:
    """``{tap: pooled size}`` for the requested taps (all of them by default), in network order.

    Runs one forward pass of a single blank image to learn each tap's shape.

    Example:
        >>> layer_dims("test_tiny", "all")
        {'stem': 40, 'stage1': 80, 'stage2': 160, 'final': 32}
    """
    _check_pooling(pooling)
    bb = _resolve(backbone)
    if not isinstance(bb, Backbone):
        raise ConfigError("layer_dims needs a Backbone or a backbone name (the input size comes from its transform).")
    taps = parse_layers("all" if layers is None else layers, bb)
    shapes: dict[str, tuple[int, ...]] = {}
    points = dict(_tap_points(bb.features))
    modules = dict(bb.features.named_modules())

    def keep(tap: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            shapes[tap] = tuple(out.shape)

        return hook

    handles = [modules[points[t]].register_forward_hook(keep(t)) for t in taps if t != FINAL]
    h, w = bb.preprocess.input_size
    was_training = bb.features.training
    try:
        bb.features.eval()
        with torch.inference_mode():
            final = bb.embedder()(torch.zeros((1, h, w, 3), dtype=torch.uint8))
    finally:
        for handle in handles:
            handle.remove()
        bb.features.train(was_training)
    return {t: int(final.shape[1]) if t == FINAL else _pooled_dim(shapes[t], pooling) for t in taps}
