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
from .config import CompareConfig

__all__ = ["compare"]


def compare(
    config: CompareConfig | str | os.PathLike,
    backbones: str | Sequence[str] | None = None,
    **options: Any,
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
        config: the run's :class:`CompareConfig`; or, as a shorthand, its ``data`` with the
            backbones and the other fields as keywords (``featbank.compare("data/elpv", "a,b")``).
        backbones, **options: the other fields of :class:`CompareConfig` (shorthand form only).

    Fields of :class:`CompareConfig`:
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
    if isinstance(config, CompareConfig):
        if backbones is not None or options:
            raise ConfigError("featbank.compare(config) takes the CompareConfig alone; to change a field, pass "
                              "dataclasses.replace(config, ...). Got also: "
                              + ", ".join([*(["backbones"] if backbones is not None else []), *options]) + ".")
    else:
        if backbones is None:
            raise ConfigError("featbank.compare(data, backbones) needs the backbones to compare, e.g. "
                              "featbank.compare('data/elpv', 'efficientnet_lite0,efficientnet_lite1').")
        config = CompareConfig(os.fspath(config), backbones, **options)  # type: ignore[arg-type]
    return _run(config)


def _run(config: CompareConfig) -> list[CompareRow]:
    """Check what needs the disk and the registry (DATA, the plot path, the names, their layers), then run."""
    _check_data(config.data)
    if config.plot is not None:
        _check_plot(Path(config.plot).expanduser())
    from ..backbones import check_backbone_name

    for name in config.backbones:
        check_backbone_name(name)
    # unknown layer names: before any work
    plans = {name: _layer_plan(config.data, name, config.layers) for name in config.backbones}
    rows = [_compare_one(config, name, plans[name]) for name in config.backbones]
    if config.plot is not None:
        plot_comparison(rows, config.plot, title=Path(config.data).name)
    return rows


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


def _compare_one(opts: CompareConfig, name: str, plan: _LayerPlan) -> CompareRow:
    """Extract (or reuse) one backbone's cache and probe it; a featbank error lands in ``error``."""
    row = empty_row(name, opts.layers)
    report = _extract_row(row, opts, name, plan)
    result = None if report is None else _fit_row(row, opts, plan, report)
    if result is not None:
        _record_fit(row, opts, plan, result)
    return row


def _extract_row(row: CompareRow, opts: CompareConfig, name: str, plan: _LayerPlan) -> Any:
    """Extract ``name``'s cache, its figures into ``row``; the report, or None (the error in ``row``)."""
    from ..extraction import extract

    clock = Clock()
    layered = {} if plan.extract_layers is None else {"layers": ",".join(plan.extract_layers)}
    try:
        report = extract(opts.data, plan.out, backbone=name, batch_size=opts.batch_size, num_workers=opts.num_workers,
                         device=opts.device, engine=opts.engine, overwrite=opts.overwrite, progress=opts.progress,
                         on_progress=clock, **layered)
    except Interrupted:
        raise
    except FeatbankError as e:
        row["error"] = f"extract failed: {e}"
        return None
    row.update(cache=str(report.path), n_embedded=report.n_embedded, extract_s=round(report.seconds, 3))
    rate, row["img_per_s_source"] = choose_throughput(report, clock.measure(report, opts.batch_size))
    if rate is not None:
        row.update(img_per_s=round(rate.images_per_second, 2), img_per_s_images=rate.n_images,
                   img_per_s_method=rate.method)
    if report.n_skipped:
        row["notes"].append(f"{report.n_skipped} image(s) could not be read and were skipped (listed in the "
                            "cache under skipped/)")
    return report


def _fit_row(row: CompareRow, opts: CompareConfig, plan: _LayerPlan, report: Any) -> Any:
    """The default linear probe on the cache; the fit's result, or None (the error in ``row``)."""
    from ..cache import open_cache
    from ..fitting import fit

    try:
        with open_cache(report.path) as cache:
            row["dims"], row["n_images"] = int(cache.embed_dim), len(cache)
            return fit(cache, "linear", device=opts.device, save=False,
                       **({} if plan.extract_layers is None else {"layers": opts.layers}))
    except Interrupted:
        raise
    except FeatbankError as e:
        row["error"] = f"fit failed: {e}"
        return None


def _record_fit(row: CompareRow, opts: CompareConfig, plan: _LayerPlan, result: Any) -> None:
    """The probe's figures into ``row``: val and test metrics, sizes, choice, the layers it read."""
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


def _number(value: Any) -> float | None:
    """A metric as a plain float, or None when absent or not finite (so --json stays valid JSON)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
