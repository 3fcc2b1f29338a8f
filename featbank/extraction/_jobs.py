"""What a worker is handed: the engine to build (:class:`EngineSpec`), how to feed and write rows
(:class:`WorkerSettings`), and one shard or work unit to embed into a part (:class:`ShardJob`).
Plain picklable data, shared by the planner (:mod:`.units`), the scheduler and the launchers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..cache import PartRows
    from ..features import FeatureSpec

__all__ = ["EngineSpec", "WorkerSettings", "ShardJob"]


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
