"""A run and what its workers are handed: :class:`ExtractJob` (one extract run, its config resolved),
the engine to build (:class:`EngineSpec`), how to feed and write rows (:class:`WorkerSettings`), and
one shard or work unit to embed into a part (:class:`ShardJob`). Plain data, shared by the run
(:mod:`.job`, which resolves an :class:`ExtractJob`), the planner (:mod:`.units`), the scheduler and
the launchers; all but :class:`ExtractJob` (which holds a progress callback) are picklable."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._device import precision_name
from ._plan import DEFAULT_SHARD_SIZE

if TYPE_CHECKING:
    from ..cache import PartRows
    from ..features import FeatureSpec
    from .config import ExtractConfig

__all__ = ["ExtractJob", "EngineSpec", "WorkerSettings", "ShardJob"]


@dataclass(frozen=True)
class EngineSpec:
    """What a worker's engine is built from, known before the run is planned (so workers started early
    can build it while the parent plans); :class:`WorkerSettings` holds it as ``spec``."""

    backbone: str
    weights: str | None
    weights_file: str | None
    engine: str
    device: str
    precision: str
    features: FeatureSpec | None = None


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs: its engine's :class:`EngineSpec`, then how it feeds and writes the rows;
    picklable, the same for every shard of a run."""

    spec: EngineSpec
    dtype: str
    batch_size: int
    num_workers: int
    embed_dim: int
    transform: dict[str, Any]
    decode: str = "pillow"  # "gpu": JPEGs decoded and resized as tensors on the device (_decode)

    @property
    def device(self) -> str:
        return self.spec.device

    @property
    def features(self) -> FeatureSpec | None:
        """The layers or views of the run (None: the embedding alone)."""
        return self.spec.features


@dataclass
class ShardJob:
    """One shard to embed into one part."""

    shard_id: int
    rows: PartRows
    members: list[str]
    root: str
    folder: str
    key: str
    classes: list[str]
    layout: str
    settings: WorkerSettings
    reuse: list[str] = field(default_factory=list)
    replace_damaged: bool = False
    #: ``(lo, hi)``: a work unit, rows ``lo:hi`` of the shard into their own ``.partial`` (see ``_schedule``).
    unit: tuple[int, int] | None = None
    #: The shard's finished units an earlier run left (their rows count as resumed, not embedded).
    earlier_units: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExtractJob:
    """One extract run: its :class:`ExtractConfig` resolved (device, engine, decode, features, paths,
    launcher), what every step and the launcher receive; made by :func:`~featbank.extraction.job.resolve_job`.

    Attributes:
        config: the settings as given (validated).
        out_path: the cache file as named; ``index_path`` the file written (a symlink's target).
        device, engine, decode: resolved from ``auto``.
        features: the layers and views stored besides the embedding (None: the embedding alone).
        launcher: the name of the launcher in :data:`~featbank.extraction.launchers.LAUNCHERS`.
        on_progress: ``on_progress(done, total)``, called as rows are done.
    """

    config: ExtractConfig
    out_path: Path
    index_path: Path
    device: str
    engine: str
    decode: str
    features: FeatureSpec | None
    launcher: str
    num_workers: int
    on_progress: Callable[[int, int], None] | None = None

    @property
    def distributed(self) -> bool:
        """Ranks that may run on other hosts (torchrun, a job array's slices): no local clean-up, no migration."""
        return self.launcher in ("torchrun", "slice")

    @property
    def rank(self) -> int:
        if self.launcher == "torchrun":
            return int(os.environ.get("RANK", "0"))
        return self.config.rank if self.config.rank is not None else 0

    @property
    def world(self) -> int:
        if self.launcher == "torchrun":
            return _world_size()
        return self.config.world if self.launcher == "slice" and self.config.world is not None else 1

    @property
    def holds_lock(self) -> bool:
        """Whether this process takes ``<out>.lock``: every run but a job array's slices and torchrun's other ranks."""
        return self.launcher != "slice" and self.rank == 0

    @property
    def shard_size(self) -> int:
        return self.config.shard_size or DEFAULT_SHARD_SIZE

    @property
    def engine_spec(self) -> EngineSpec:
        """The engine every worker builds: one spec for the plan and for workers started before it
        (they build their engine from it early, and the engine cache is keyed by it, so the two must agree)."""
        c = self.config
        return EngineSpec(c.backbone, c.weights, c.weights_file, self.engine, self.device,
                          precision_name(self.device.split(":")[0]), self.features)


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1
