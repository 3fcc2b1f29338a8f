"""The settings of an extraction run: :class:`ExtractConfig`, validated once and stored in the cache index.

Like torchvision's ``args`` saved in every checkpoint: ``featbank extract``'s click parameters map
one to one onto the fields (``cli/extract.py``), :func:`featbank.extract` takes the config, and the
index the run publishes carries it as JSON (attribute :data:`CONFIG_ATTR`; read it back with
:func:`read_extract_config`). Devices: :mod:`featbank._device`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .._device import DEVICES
from ..errors import CacheError, ConfigError

__all__ = ["DEVICES", "ENGINES", "DTYPES", "LAUNCHER_CHOICES", "LABEL_FROM", "DECODES", "MAX_BATCH_SIZE",
           "MAX_NUM_WORKERS", "MAX_PROCS", "MAX_WORLD", "CONFIG_ATTR", "ExtractConfig", "validate_options",
           "validate_procs", "read_extract_config"]

ENGINES = ("auto", "torch", "onnxruntime")
DTYPES = ("float32", "float16")
#: The built-in ``--launcher`` values (a launcher registered with
#: :func:`~featbank.extraction.launchers.register_launcher` is one more); a job array's slices and its
#: finalize step are chosen by ``--rank``/``--finalize``.
LAUNCHER_CHOICES = ("auto", "local", "torchrun", "ray")
LABEL_FROM = ("cls", "txt", "json", "none")
DECODES = ("pillow", "gpu", "auto")
#: Bounds checked before any work: a batch is staged as uint8 pixels (65,536 at 224 px: 9.9 GB), and each
#: worker is a process.
MAX_BATCH_SIZE = 65_536
MAX_NUM_WORKERS = 256
MAX_PROCS = 256
#: Jobs of one job array (``--world``).
MAX_WORLD = 100_000
#: The index attribute that holds the config (JSON) of the run that published it.
CONFIG_ATTR = "extract_config"


def validate_options(batch_size: int, num_workers: int | None, dtype: str) -> None:
    if not _is_int(batch_size) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(f"The 'batch_size' parameter must be an integer from 1 to {MAX_BATCH_SIZE:,}. "
                          f"Got {batch_size!r} instead.")
    if num_workers is not None and (not _is_int(num_workers) or not 0 <= num_workers <= MAX_NUM_WORKERS):
        raise ConfigError(f"The 'num_workers' parameter must be an integer from 0 to {MAX_NUM_WORKERS}. "
                          f"Got {num_workers!r} instead.")
    if dtype not in DTYPES:
        raise ConfigError(f"The 'dtype' parameter must be one of {DTYPES}. Got {dtype!r} instead.")


def validate_procs(procs: int) -> None:
    """``--procs``: local worker processes, at most :data:`MAX_PROCS` (each one is a process with its own model)."""
    if not _is_int(procs) or not 1 <= procs <= MAX_PROCS:
        raise ConfigError(f"The 'procs' parameter must be an integer from 1 to {MAX_PROCS}. Got {procs!r} instead.")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _choice(name: str, value: object, allowed: tuple[str | None, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"The '{name}' parameter must be one of {allowed}. Got {value!r} instead.")


def _text(name: str, value: object, optional: bool = False) -> None:
    if not (isinstance(value, str) or (optional and value is None)):
        raise ConfigError(f"The '{name}' parameter must be a string{' or None' if optional else ''}. "
                          f"Got {value!r} instead.")


@dataclass(frozen=True)
class ExtractConfig:
    """Every setting of one :func:`featbank.extract` run, validated when built.

    The field names are ``featbank extract``'s option names (``--batch-size`` -> ``batch_size``).

    Args:
        data: an ImageFolder (``data/<class>/<image>``), a folder with ``train``/``val``/``test``
            split folders, a flat folder of unlabelled images, a manifest (CSV, TSV, parquet) or
            WebDataset tar shards.
        out: the cache file; default :func:`~featbank.extraction.default_cache_path`.
        backbone: a name from ``featbank backbones``, or a fine-tuned bundle folder; ``NAME@SIZE``
            feeds it whole SIZE x SIZE images (:func:`featbank.backbones.load_backbone`).
        weights: weight name (``IMAGENET1K_V2``), ``random``, or ``None`` for the default.
        weights_file: a local state_dict to use instead.
        batch_size: images per forward pass.
        num_workers: image-decoding processes; default from the CPU count.
        device: ``auto``, ``cpu`` or ``cuda``.
        engine: ``auto`` (onnxruntime on CPU, torch on CUDA), ``torch`` or ``onnxruntime``.
        dtype: stored dtype, ``float32`` or ``float16``.
        overwrite: replace a cache made with other settings.
        strict: raise :class:`~featbank.errors.SkippedImagesError` (after writing the cache) if any
            file was skipped.
        progress: show a progress bar on stderr (over the rows of the shards this run writes).
        procs: local worker processes (one per GPU when GPUs are used).
        launcher: ``auto`` (torchrun when ``WORLD_SIZE`` > 1, else local), ``local``, ``torchrun``,
            ``ray``, or the name of a launcher registered with
            :func:`~featbank.extraction.launchers.register_launcher`; None means ``auto``.
        shard_size: rows per shard (default 10,000); only a new plan uses it.
        finalize: run no shard; gather the work the slices of a job array wrote and publish the index.
        rank, world: run slice ``rank`` of ``world`` (one job of a job array, e.g. one Slurm array
            task) and publish nothing; ``finalize`` publishes once every slice has run.
        num_gpus, max_retries: per Ray task.
        path_column, label_column, split_column: a manifest's column names (``""`` means None).
        label_from: WebDataset label member: ``cls``, ``txt``, ``json`` or ``none``.
        layers: intermediate layers to store besides the embedding (``"stage3,stage5,final"``,
            ``"all"``; see :func:`featbank.backbones.parse_layers`); default ``final`` alone.
        pooling: how a layer's feature map is pooled: ``gap+2x2`` (default), ``gap+2x2+max`` or ``gap``.
        views, augment, view_seed: K augmented views per image (``hflip``, ``dihedral`` or
            ``crops``), stored beside the plain view; ``crops`` are seeded by path, view and
            ``view_seed``.
        window: how single-channel high-bit-depth images become 8 bits (:mod:`featbank.windowing`);
            part of the transform, keyed in the cache. Stored as its canonical spelling.
        decode: ``pillow`` (default), ``gpu`` (JPEGs decoded in batches on ``device``) or ``auto``
            (``gpu`` on CUDA, else ``pillow``).

    Raises:
        ConfigError: a value of the wrong type or out of its bounds, an unknown choice, a backbone
            name with more than one ``@SIZE``, ``rank``/``world`` that do not describe a slice.

    Example:
        >>> config = ExtractConfig("data/elpv", "runs/elpv.h5", batch_size=64)
        >>> report = featbank.extract(config)
    """

    data: str
    out: str | None = None
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    weights_file: str | None = None
    batch_size: int = 32
    num_workers: int | None = None
    device: str = "auto"
    engine: str = "auto"
    dtype: str = "float32"
    overwrite: bool = False
    strict: bool = False
    progress: bool = True
    procs: int = 1
    launcher: str | None = None
    shard_size: int | None = None
    finalize: bool = False
    rank: int | None = None
    world: int | None = None
    num_gpus: float = 0.0
    max_retries: int = 3
    path_column: str = "path"
    label_column: str | None = "label"
    split_column: str | None = "split"
    label_from: str = "cls"
    layers: str | tuple[str, ...] | None = None
    pooling: str = "gap+2x2"
    views: int = 0
    augment: str | None = None
    view_seed: int = 0
    window: str = "none"
    decode: str = "pillow"

    def __post_init__(self) -> None:
        paths = {n: os.fspath(getattr(self, n)) for n in ("data", "out", "backbone", "weights_file")
                 if isinstance(getattr(self, n), os.PathLike)}
        for name, value in {**paths, **_normalised(self)}.items():
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        from ..backbones import check_backbone_name
        from ..windowing import parse_window
        from ._plan import check_shard_size

        _text("data", self.data)
        for name in ("out", "weights", "weights_file", "augment", "label_column", "split_column"):
            _text(name, getattr(self, name), optional=True)
        for name in ("path_column", "pooling", "backbone"):
            _text(name, getattr(self, name))
        validate_options(self.batch_size, self.num_workers, self.dtype)
        validate_procs(self.procs)
        if self.shard_size is not None:
            check_shard_size(self.shard_size)
        _choice("device", self.device.split(":")[0] if isinstance(self.device, str) else self.device, DEVICES)
        _choice("engine", self.engine, ENGINES)
        # The name is checked against the launcher registry (launchers.py stands above this module) when
        # the run is resolved, before any work.
        _text("launcher", self.launcher, optional=True)
        _choice("label_from", self.label_from, LABEL_FROM)
        _choice("decode", self.decode, DECODES)
        for name in ("overwrite", "strict", "progress", "finalize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"The '{name}' parameter must be True or False. Got {getattr(self, name)!r} instead.")
        self._validate_counts()
        self._validate_slice()
        object.__setattr__(self, "window", parse_window(self.window).spec)
        check_backbone_name(self.backbone)  # the one parser of NAME@SIZE (compare uses it too), before any work

    def _validate_counts(self) -> None:
        if not _is_int(self.max_retries) or self.max_retries < 0:
            raise ConfigError(f"The 'max_retries' parameter must be an integer >= 0. Got {self.max_retries!r} instead.")
        if not isinstance(self.num_gpus, (int, float)) or isinstance(self.num_gpus, bool) or not self.num_gpus >= 0:
            raise ConfigError(f"The 'num_gpus' parameter must be a number >= 0. Got {self.num_gpus!r} instead.")
        for name in ("views", "view_seed"):  # their bounds and meaning: resolve_features, with the backbone
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"The '{name}' parameter must be an integer >= 0. Got {getattr(self, name)!r} instead.")
        layers = self.layers
        if not (layers is None or isinstance(layers, str)
                or (isinstance(layers, tuple) and all(isinstance(t, str) for t in layers))):
            raise ConfigError(f"The 'layers' parameter must be a spec such as 'stage3,final' or 'all', or a list of "
                              f"layer names. Got {layers!r} instead.")

    def _validate_slice(self) -> None:
        rank, world = self.rank, self.world
        if rank is None and world is None:
            return
        if world is None or not _is_int(world) or not 1 <= world <= MAX_WORLD:
            raise ConfigError(f"--world must be the number of jobs in the array, an integer from 1 to {MAX_WORLD:,}. "
                              f"Got {world!r} instead (with --rank {rank!r}).")
        if rank is None and not self.finalize:
            raise ConfigError(f"--world {world} needs --rank R (this job's index, 0 to {world - 1}) or --finalize.")
        if rank is not None and (not _is_int(rank) or not 0 <= rank < world):
            raise ConfigError(f"--rank must lie in [0, {world}) for --world {world}: ranks count from 0 "
                              f"(Slurm: --rank $SLURM_ARRAY_TASK_ID with --array=0-{world - 1}). Got {rank!r} instead.")
        if rank is not None and self.finalize:
            raise ConfigError("--rank runs one slice and --finalize gathers them all: give one or the other. Run "
                              "'featbank extract DATA --out CACHE --finalize' once every rank has finished.")
        if rank is not None and self.overwrite:
            raise ConfigError("--overwrite does not combine with --rank: slices run at any time, and one must not delete "
                              "what another wrote. Remove the old cache (CACHE and its .parts folder) or choose another "
                              "--out, then run the slices.")
        if rank is not None and (self.launcher not in (None, "auto") or self.procs != 1):
            raise ConfigError(f"--rank runs one slice of a job array in this process; it does not combine with "
                              f"--launcher {self.launcher} or --procs {self.procs}. Drop them, or drop --rank/--world.")

    @property
    def is_slice(self) -> bool:
        """This run is one slice (``rank``) of a job array."""
        return self.rank is not None

    def to_dict(self) -> dict[str, object]:
        """The fields as JSON-ready values."""
        d = dataclasses.asdict(self)
        if isinstance(d["layers"], tuple):
            d["layers"] = list(d["layers"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> ExtractConfig:
        """A config from :meth:`to_dict`'s output; keys a newer featbank wrote are ignored.

        Raises:
            ConfigError: not a mapping, ``data`` missing, or a value :class:`ExtractConfig` refuses.
        """
        if not isinstance(values, dict):
            raise ConfigError(f"An extract config must be a JSON object. Got {type(values).__name__} instead.")
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names}
        if "data" not in known:
            raise ConfigError("An extract config must name its 'data'; this one does not.")
        return cls(**known)  # type: ignore[arg-type]


def _normalised(config: ExtractConfig) -> dict[str, object]:
    """Spellings that mean the same setting: ``""`` columns mean none, a list of layers a tuple."""
    out: dict[str, object] = {}
    for name in ("label_column", "split_column"):
        if getattr(config, name) == "":
            out[name] = None
    if isinstance(config.layers, list):
        out["layers"] = tuple(config.layers)
    return out


def read_extract_config(path: str | os.PathLike) -> ExtractConfig | None:
    """The :class:`ExtractConfig` of the run that published the cache index at ``path``.

    Returns:
        The config, or None for a cache written before featbank stored it (it still opens).

    Raises:
        CacheError: the file cannot be read, or the stored config is not valid JSON or not a valid config.
    """
    import h5py

    try:
        with h5py.File(Path(path), "r") as f:
            raw = f.attrs.get(CONFIG_ATTR)
    except OSError as e:
        raise CacheError(f"{os.fspath(path)!r} is not a readable HDF5 file ({e}).") from None
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        return ExtractConfig.from_dict(json.loads(str(text)))
    except (ValueError, TypeError, RecursionError) as e:
        raise CacheError(f"The extract config stored in {os.fspath(path)!r} (attribute {CONFIG_ATTR!r}) is "
                         f"damaged: {e} The cache itself may still be read; re-extract with --overwrite to "
                         "store a fresh one.") from None
