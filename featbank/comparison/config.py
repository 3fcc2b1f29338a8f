"""``CompareConfig``: the settings of one ``compare`` run, typed and checked once (``featbank compare``'s click
parameters map onto its fields one to one)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["CompareConfig", "parse_backbones"]


@dataclass(frozen=True)
class CompareConfig:
    """What ``compare`` does: the data, the backbones and the settings every backbone shares.

    Built once (by ``featbank compare`` from its click parameters, or by :func:`featbank.compare`
    from its keywords) and checked when built: the list of backbones, the layers, the batch size,
    worker count, engine and device. What needs the disk or the backbone registry (DATA, the plot
    path, the backbone names) is checked by ``compare`` before any work.

    Attributes:
        data: an image folder as for ``featbank extract`` (labelled), or a labelled manifest / WebDataset.
        backbones: the names, in order (``"a,b"`` or a list is accepted and stored as a tuple).
        layers: ``"final"``, ``"auto"``, ``"all"`` or names / ranges (``"stage5,final"``).
        plot: the PNG to write (``None``: no plot).
        device, engine, batch_size, num_workers: as for ``featbank.extract`` (device also for fit).
        overwrite: replace a default cache that was made with other settings.
        progress: extraction progress bars on stderr.
    """

    data: str
    backbones: tuple[str, ...]
    layers: str = "final"
    plot: str | None = None
    device: str = "auto"
    engine: str = "auto"
    batch_size: int = 32
    num_workers: int | None = None
    overwrite: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        from ..extraction import DEVICES, ENGINES
        from ..extraction.config import validate_options

        object.__setattr__(self, "backbones", tuple(parse_backbones(self.backbones)))
        object.__setattr__(self, "layers", _check_layers(self.layers))
        validate_options(self.batch_size, self.num_workers, "float32")
        if self.engine not in ENGINES:
            raise ConfigError(f"The 'engine' parameter must be one of {ENGINES}. Got {self.engine!r} instead.")
        if self.device not in DEVICES:
            raise ConfigError(f"The 'device' parameter must be one of {DEVICES}. Got {self.device!r} instead.")
        object.__setattr__(self, "data", os.fspath(self.data))
        if self.plot is not None:
            object.__setattr__(self, "plot", os.fspath(self.plot))


def parse_backbones(backbones: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``, refusing an empty list, empty names and repeats.

    Raises:
        ConfigError: no names, an empty name (``"a,,b"``), or a name given twice.
    """
    if isinstance(backbones, str):
        items = backbones.split(",")
    elif isinstance(backbones, Sequence) and all(isinstance(b, str) for b in backbones):
        items = list(backbones)
    else:
        raise ConfigError(f"The 'backbones' parameter must be a comma-separated string or a list of names. Got "
                          f"{backbones!r} instead.")
    names = [b.strip() for b in items]
    if not any(names):
        raise ConfigError(f"--backbones names no backbone (got {backbones!r}). Give at least one, e.g. "
                          "--backbones efficientnet_lite0,efficientnet_lite1 ('featbank backbones' lists them).")
    if not all(names):
        raise ConfigError(f"--backbones has an empty name in {backbones!r}. Separate names with single commas, "
                          "e.g. efficientnet_lite0,efficientnet_lite1.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--backbones names {', '.join(repr(n) for n in repeated)} more than once (got "
                          f"{backbones!r}). Give each backbone once.")
    return names


def _check_layers(layers: str | Sequence[str] | None) -> str:
    spec = layers if isinstance(layers, str) or layers is None else ",".join(layers)
    spec = (spec or "final").strip()
    if not spec or any(not part.strip() for part in spec.split(",")):
        raise ConfigError(f"--layers has an empty name in {layers!r}. Give 'final', 'auto', 'all' or names such as "
                          "stage5,final ('featbank backbones --groups NAME' lists a backbone's layers).")
    return spec
