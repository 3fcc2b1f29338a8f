"""``compare`` itself: every input checked first, then extract and fit per backbone, errors kept per row."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._files import check_output_dir
from ..errors import ConfigError, FeatbankError, Interrupted
from ._table import NO_TEST, CompareRow, empty_row, plot_comparison
from ._throughput import Clock, choose_throughput

__all__ = ["compare", "parse_backbones"]


@dataclass(frozen=True)
class _Options:
    """The settings every backbone of one compare run shares."""

    layers: str
    batch_size: int
    num_workers: int | None
    device: str
    engine: str
    overwrite: bool
    progress: bool


def compare(
    data: str | os.PathLike,
    backbones: str | Sequence[str],
    *,
    layers: str | Sequence[str] | None = "final",
    plot: str | os.PathLike | None = None,
    device: str = "auto",
    engine: str = "auto",
    batch_size: int = 32,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> list[CompareRow]:
    """Extract (what is missing), probe and compare several backbones on one data folder.

    Every input is checked before any work: the list of backbones, the layers, the data folder.
    Then, per backbone in the given order: ``featbank.extract`` into the default cache (an
    up-to-date cache is reused without loading the model), ``featbank.fit`` with the defaults of
    ``featbank fit`` (linear probe, C chosen on validation, refitted on train+val, scored on test),
    without saving a bundle. A backbone that fails (weights not on this machine, a cache made with
    other settings, a cache another process is writing) gets a row with ``error`` set, and the
    others still run.

    Args:
        data: an image folder as for ``featbank extract`` (labelled; ``DATA/{train,val,test}/...``
            for a test split), or a labelled manifest / WebDataset.
        backbones: names (``"efficientnet_lite0,efficientnet_lite1"`` or a list), at least one,
            no repeats, each one ``featbank backbones`` knows (or a fine-tuned bundle folder).
        layers: ``"final"`` (the backbone's embedding), ``"auto"`` (all layers extracted, the probe
            chooses on validation: ``fit(layers="auto")``), ``"all"``, or names / ranges
            (``"stage5,final"``) each backbone must have. Other than ``final``, each backbone's cache
            is ``<default cache>-layers-<taps>.h5`` (``all`` for every layer), beside the plain
            one.
        plot: write a PNG of accuracy against throughput there (``None``: no plot; the command
            line defaults to :func:`default_plot_path`).
        device, engine, batch_size, num_workers: as for ``featbank.extract`` (device also for fit).
        overwrite: replace a default cache that was made with other settings (as ``extract``'s);
            without it such a backbone gets an error row and its cache stays as it is.
        progress: extraction progress bars on stderr.

    Returns:
        One :class:`CompareRow` per backbone, in the given order.

    Raises:
        ConfigError: an empty list, a repeated or unknown backbone, unsupported layers, a bad
            engine, device, batch size or worker count, a ``plot`` path that cannot be written.
        DatasetError: DATA is missing, empty, unlabelled or has a single class.
        Interrupted: Ctrl-C (caches keep what was embedded; a rerun resumes).

    Example:
        >>> rows = featbank.compare("data/elpv", "efficientnet_lite0,efficientnet_lite1")
        >>> [(r["backbone"], r["test_top1"], r["img_per_s"]) for r in rows]
    """
    names = parse_backbones(backbones)
    layer_spec = _check_layers(layers)
    from ..extraction import DEVICES, ENGINES
    from ..extraction.config import validate_options

    validate_options(batch_size, num_workers, "float32")
    if engine not in ENGINES:
        raise ConfigError(f"The 'engine' parameter must be one of {ENGINES}. Got {engine!r} instead.")
    if device not in DEVICES:
        raise ConfigError(f"The 'device' parameter must be one of {DEVICES}. Got {device!r} instead.")
    _check_data(data)
    if plot is not None:
        _check_plot(Path(plot).expanduser())
    from ..backbones import check_backbone_name

    for name in names:
        check_backbone_name(name)
    plans = {name: _layer_plan(data, name, layer_spec) for name in names}  # unknown layer names: before any work
    opts = _Options(layer_spec, batch_size, num_workers, device, engine, overwrite, progress)
    rows = [_compare_one(data, name, opts, plans[name]) for name in names]
    if plot is not None:
        plot_comparison(rows, plot, title=Path(data).name)
    return rows


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


@dataclass(frozen=True)
class _LayerPlan:
    """What one backbone extracts and probes: ``None`` and ``None`` for the plain embedding."""

    extract_layers: tuple[str, ...] | None
    out: Path | None


def _layer_plan(data: str | os.PathLike, name: str, spec: str) -> _LayerPlan:
    """The layers to extract for ``spec`` (``auto``: all of them, the probe chooses) and the cache they go
    to: the default cache's name with ``-layers-<taps>``, so it never collides with the plain one.

    Raises:
        ConfigError: a layer this backbone does not have (the message lists its layers).
    """
    if spec == "final":
        return _LayerPlan(None, None)
    from ..backbones import available_layers, parse_layers
    from ..extraction import default_cache_path

    taps = parse_layers("all" if spec == "auto" else spec, name)
    if taps == ("final",):
        return _LayerPlan(None, None)
    tag = "all" if list(taps) == available_layers(name) else "-".join(taps)
    if len(tag) > 60:
        import hashlib

        tag = hashlib.sha256(",".join(taps).encode()).hexdigest()[:8]
    plain = default_cache_path(data, name)
    return _LayerPlan(taps, plain.with_name(f"{plain.stem}-layers-{tag}.h5"))


def _check_plot(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"--plot {str(path)!r} is a folder; give a file name such as {path / 'compare.png'}.")
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--plot {str(path)!r} must end in .png (the plot is a PNG image).")
    try:
        check_output_dir(path.parent, "plot")
    except ConfigError as e:
        raise ConfigError(str(e).replace("Choose another --out", "Choose another --plot")) from None


def _check_data(data: str | os.PathLike) -> None:
    """Refuse DATA before any work: missing, empty, unlabelled or a single class (DatasetError)."""
    from ..extraction import ExtractConfig
    from ..extraction.job import read_source
    from ..sources import is_manifest, is_webdataset, scan_folder

    text = os.fspath(data)
    if is_manifest(text) or is_webdataset(text):
        read_source(ExtractConfig(text))
    else:
        scan_folder(text, require_labels=True)


def _compare_one(data: str | os.PathLike, name: str, opts: _Options, plan: _LayerPlan) -> CompareRow:
    """Extract (or reuse) one backbone's cache and probe it; a featbank error lands in ``error``."""
    from ..cache import open_cache
    from ..extraction import extract
    from ..fitting import fit

    row = empty_row(name, opts.layers)
    clock = Clock()
    layered = {} if plan.extract_layers is None else {"layers": ",".join(plan.extract_layers)}
    try:
        report = extract(data, plan.out, backbone=name, batch_size=opts.batch_size, num_workers=opts.num_workers,
                         device=opts.device, engine=opts.engine, overwrite=opts.overwrite, progress=opts.progress,
                         on_progress=clock, **layered)
    except Interrupted:
        raise
    except FeatbankError as e:
        row["error"] = f"extract failed: {e}"
        return row
    row.update(cache=str(report.path), n_embedded=report.n_embedded, extract_s=round(report.seconds, 3))
    rate, row["img_per_s_source"] = choose_throughput(report, clock.measure(report, opts.batch_size))
    if rate is not None:
        row.update(img_per_s=round(rate.images_per_second, 2), img_per_s_images=rate.n_images,
                   img_per_s_method=rate.method)
    if report.n_skipped:
        row["notes"].append(f"{report.n_skipped} image(s) could not be read and were skipped (listed in the "
                            "cache under skipped/)")
    try:
        with open_cache(report.path) as cache:
            row["dims"], row["n_images"] = int(cache.embed_dim), len(cache)
            result = fit(cache, "linear", device=opts.device, save=False,
                         **({} if plan.extract_layers is None else {"layers": opts.layers}))
    except Interrupted:
        raise
    except FeatbankError as e:
        row["error"] = f"fit failed: {e}"
        return row
    val = result.metrics.get("val", {})
    test = result.metrics.get("test", {}) if result.eval_split == "test" else {}
    row.update(
        val_top1=_number(val.get("top1")), val_balanced_acc=_number(val.get("balanced_accuracy")),
        test_top1=_number(test.get("top1")), test_balanced_acc=_number(test.get("balanced_accuracy")),
        n_train=result.n_train, n_val=result.n_val, n_test=result.n_test, chosen=dict(result.chosen),
        fit_s=round(result.seconds, 3),
    )
    features = result.metrics.get("features") or {}
    if features.get("layers") and plan.extract_layers is not None:  # the layers the probe read (auto: chose)
        row["layers"] = ",".join(features["layers"])
        row["dims"] = int(sum(features["layer_dims"][t] for t in features["layers"]))
        if opts.layers == "auto":
            row["notes"].append(f"--layers auto: the probe chose {row['layers']} on the validation split, out of "
                                f"{','.join(plan.extract_layers)}")
    if result.eval_split != "test":
        row["notes"].append(NO_TEST)
    return row


def _number(value: Any) -> float | None:
    """A metric as a plain float, or None when absent or not finite (so --json stays valid JSON)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
