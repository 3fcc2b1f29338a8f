"""``compare``: a backbone bake-off on one data folder (extract what is missing, probe each, one table).

Each backbone's cache is the one ``featbank extract DATA --backbone NAME`` writes by default
(:func:`~featbank.extraction.default_cache_path`), so caches extracted before are reused and
``featbank fit`` finds the ones written here. Each cache gets the default probe of
``featbank fit`` (a linear head, C chosen on validation, refitted on train+val), in memory: no
bundle is written. Throughput comes from the extraction that filled the cache: this run's, or the
one recorded beside the cache (``<cache>.throughput.json``) when a previous ``compare`` embedded
more images than this run.

The module is a noun (``comparison``) so that ``featbank.compare`` stays the function even after
``import featbank.comparison``, as ``featbank.fit`` lives in ``featbank.fitting``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from ._files import atomic_write_bytes, atomic_write_text, check_output_dir, timestamp
from .errors import ConfigError, FeatbankError, Interrupted

__all__ = [
    "CompareRow",
    "compare",
    "parse_backbones",
    "default_plot_path",
    "format_table",
    "plot_comparison",
    "THROUGHPUT_SOURCES",
]

#: ``img_per_s_source`` values: this run's extraction, a previous compare's record, or nothing known.
THROUGHPUT_SOURCES = ("measured", "recorded", "unknown")

_RECORD_SUFFIX = ".throughput.json"
#: ``img_per_s_method`` values: the rate after the first batch, or the whole extraction's.
_METHODS = ("steady", "whole run")
_NO_TEST = "no test split in DATA: test accuracy not measured (add DATA/test/<class>/...)"
_TABLE_NOTES = (_NO_TEST,)  # said once under the table, not once per row


class CompareRow(TypedDict):
    """One backbone's line of the comparison table (every key is always present).

    Keys:
        backbone: the name as given.
        layers: the layers the probe used (``"final"``: the backbone's embedding).
        dims: features per image the probe saw; ``None`` when the backbone failed before.
        n_images: rows in the cache (images that could be read).
        img_per_s: images embedded per second by extract (decode, forward, write); ``None`` when
            unknown. See ``img_per_s_method``.
        img_per_s_method: ``"steady"``: from the end of the first batch to the end of the last, so
            model load, ONNX export and warm-up are left out (what a long run sustains);
            ``"whole run"``: the extraction's wall time over the images it embedded, fixed costs
            included, used when fewer than ``batch_size`` images came after the first batch;
            ``None`` when unknown.
        img_per_s_source: ``"measured"`` (this run's extraction), ``"recorded"`` (a previous
            compare's extraction of this cache, read from ``<cache>.throughput.json``) or
            ``"unknown"`` (the cache was written by ``featbank extract`` and nothing was embedded now).
        img_per_s_images: how many images that throughput was measured on.
        n_embedded: images embedded by this run (0: the cache was reused as it was).
        extract_s: seconds this run spent in extract (a reused cache: the up-to-date check).
        val_top1, val_balanced_acc: on the validation split the probe selected C on (the head
            fitted on train only), so optimistic.
        test_top1, test_balanced_acc: the refitted head on the test split; ``None`` when DATA
            has no test split (see ``notes``).
        n_train, n_val, n_test: rows of each split the probe used.
        chosen: the selected hyperparameter, e.g. ``{"C": 0.01}``.
        fit_s: seconds of the probe fit (sweep + refit + test).
        cache: the cache file used.
        error: why this backbone has no numbers (``None`` when it has them).
        notes: remarks, e.g. that there is no test split.
    """

    backbone: str
    layers: str
    dims: int | None
    n_images: int | None
    img_per_s: float | None
    img_per_s_method: str | None
    img_per_s_source: str
    img_per_s_images: int
    n_embedded: int
    extract_s: float | None
    val_top1: float | None
    val_balanced_acc: float | None
    test_top1: float | None
    test_balanced_acc: float | None
    n_train: int
    n_val: int
    n_test: int
    chosen: dict[str, Any]
    fit_s: float | None
    cache: str | None
    error: str | None
    notes: list[str]


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
            one. Refused while ``featbank.fit`` has no ``layers`` parameter.
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
    from .extraction import DEVICES, ENGINES
    from .extraction._options import _validate

    _validate(batch_size, num_workers, "float32")
    if engine not in ENGINES:
        raise ConfigError(f"The 'engine' parameter must be one of {ENGINES}. Got {engine!r} instead.")
    if device not in DEVICES:
        raise ConfigError(f"The 'device' parameter must be one of {DEVICES}. Got {device!r} instead.")
    _check_data(data)
    if plot is not None:
        _check_plot(Path(plot).expanduser())
    for name in names:
        _check_backbone(name)
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
    if spec != "final" and not _fit_takes_layers():
        raise ConfigError(
            f"compare --layers supports only 'final' (the backbone's embedding) in this featbank; got {spec!r}. "
            "A probe on intermediate layers needs 'featbank fit --layers', which it does not have yet "
            "('featbank extract --layers' can already store them). Drop --layers."
        )
    return spec


def _fit_takes_layers() -> bool:
    """Whether ``featbank.fit`` reads intermediate layers (``layers=``), which #15's probe work adds."""
    import inspect

    from .fitting import fit

    return "layers" in inspect.signature(fit).parameters


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
    from .backbones._taps import available_layers, parse_layers
    from .extraction import default_cache_path

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
    from .data import scan_folder
    from .extraction._scaled import ScaleOptions, _is_manifest, _is_webdataset, read_source

    text = os.fspath(data)
    if _is_manifest(text) or _is_webdataset(text):
        read_source(text, ScaleOptions())
    else:
        scan_folder(text, require_labels=True)


def _check_backbone(name: str) -> None:
    """Refuse a name no backbone source knows, as ``load_backbone`` would, without building anything
    (weights are not checked: a backbone without them gets an error row instead)."""
    import torchvision

    from .backbones import _factory, _registry

    # The registry is REGISTRY once #13 made the underscore modules' names public, _REGISTRY before.
    registry = getattr(_registry, "REGISTRY", None)
    registry = registry if registry is not None else _registry._REGISTRY
    if name in registry or _factory._is_bundle_dir(name):
        return
    source, _, bare = name.rpartition(":")
    if source not in ("", "torchvision", "tv", "timm"):
        raise _factory._unknown(name)
    if source != "timm":
        if bare in torchvision.models.list_models(module=torchvision.models):
            return
        if source:
            raise _factory._unknown(name)
    import timm

    models = timm.list_models()
    if bare not in models and bare.split(".")[0] not in models:
        raise _factory._unknown(name)


def _empty_row(name: str, layers: str) -> CompareRow:
    return CompareRow(
        backbone=name, layers=layers, dims=None, n_images=None, img_per_s=None, img_per_s_method=None,
        img_per_s_source="unknown",
        img_per_s_images=0, n_embedded=0, extract_s=None, val_top1=None, val_balanced_acc=None, test_top1=None,
        test_balanced_acc=None, n_train=0, n_val=0, n_test=0, chosen={}, fit_s=None, cache=None, error=None, notes=[],
    )


def _compare_one(data: str | os.PathLike, name: str, opts: _Options, plan: _LayerPlan) -> CompareRow:
    """Extract (or reuse) one backbone's cache and probe it; a featbank error lands in ``error``."""
    from .cache import open_cache
    from .extraction import extract
    from .fitting import fit

    row = _empty_row(name, opts.layers)
    clock = _Clock()
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
    rate, row["img_per_s_source"] = _throughput(report, clock.measure(report, opts.batch_size))
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
        row["notes"].append(_NO_TEST)
    return row


def _number(value: Any) -> float | None:
    """A metric as a plain float, or None when absent or not finite (so --json stays valid JSON)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class _Throughput:
    """One throughput measurement: img/s, over how many images, and how (``steady`` or ``whole run``)."""

    images_per_second: float
    n_images: int
    method: str

    @property
    def rank(self) -> tuple[bool, int]:
        # A steady rate beats a whole-run one, then more images beat fewer.
        return self.method == "steady", self.n_images


class _Clock:
    """``on_progress`` for extract: when each batch finished, for a rate without the fixed costs."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.marks.append((time.perf_counter(), int(done)))

    def measure(self, report: Any, min_images: int) -> _Throughput | None:
        """The rate after the first batch (model load, ONNX export, warm-up and pipeline fill left
        out) when at least ``min_images`` came after it; else the whole run's; None if none embedded."""
        if len(self.marks) >= 2:
            (t0, d0), (t1, d1) = self.marks[0], self.marks[-1]
            if d1 - d0 >= min_images and t1 > t0:
                return _Throughput((d1 - d0) / (t1 - t0), d1 - d0, "steady")
        if report.n_embedded and report.seconds > 0:
            return _Throughput(report.n_embedded / report.seconds, int(report.n_embedded), "whole run")
        return None


def _throughput(report: Any, now: _Throughput | None) -> tuple[_Throughput | None, str]:
    """(throughput, source): this run's measurement or the record of an earlier run of this cache,
    whichever ranks higher (a rerun that embeds 3 new files measures little but the model load)."""
    record_path = Path(str(report.path) + _RECORD_SUFFIX)
    recorded = _read_record(record_path, report.cache_key)
    if now is not None and (recorded is None or now.rank >= recorded.rank):
        record = {"cache_key": report.cache_key, "images_per_second": now.images_per_second,
                  "n_images": now.n_images, "method": now.method, "extract_seconds": report.seconds,
                  "engine": report.engine, "device": report.device, "recorded": timestamp()}
        try:
            atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
        except OSError:
            pass  # the number is still reported; only the next run will not find it
        return now, "measured"
    if recorded is not None:
        return recorded, "recorded"
    return None, "unknown"


def _read_record(path: Path, cache_key: str) -> _Throughput | None:
    """The throughput recorded for this very cache key; anything else (damaged, foreign) is no record."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("cache_key") != cache_key or not cache_key:
        return None
    ips, n, method = record.get("images_per_second"), record.get("n_images"), record.get("method")
    if not isinstance(ips, (int, float)) or isinstance(ips, bool) or not math.isfinite(ips) or ips <= 0:
        return None
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0 or method not in _METHODS:
        return None
    return _Throughput(float(ips), n, method)


_COLUMNS = (("backbone", "backbone"), ("layers", "layers"), ("dims", "dims"), ("img/s", "img_per_s"),
            ("val top-1", "val_top1"), ("val bal acc", "val_balanced_acc"), ("test top-1", "test_top1"),
            ("test bal acc", "test_balanced_acc"), ("fit s", "fit_s"))


def _cell(row: CompareRow, key: str) -> str:
    value = row[key]  # type: ignore[literal-required]
    if row["error"] is not None and key not in ("backbone", "layers"):
        return "error" if key == "dims" else ""
    if value is None:
        return "—"
    if key == "img_per_s":
        tags = [t for t, on in (("whole run", row["img_per_s_method"] == "whole run"),
                                ("recorded", row["img_per_s_source"] == "recorded")) if on]
        return f"{value:.1f}" + (f" ({', '.join(tags)})" if tags else "")
    if key == "fit_s":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[CompareRow]) -> str:
    """The comparison as a plain-text table, followed by what its marks mean and each row's error.

    Example:
        >>> print(format_table(featbank.compare("data/elpv", "efficientnet_lite0")))
    """
    cells = [[title for title, _ in _COLUMNS]] + [[_cell(r, key) for _, key in _COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ok = [r for r in rows if r["error"] is None]
    lines.append("")
    lines.append("val: the validation split the probe chose C on (optimistic); test: the refitted probe on DATA's test split.")
    if any(r["test_top1"] is None for r in ok):
        lines.append("test —: DATA has no test split, so there is no unbiased estimate (add DATA/test/<class>/...).")
    sources = {r["img_per_s_source"] for r in ok}
    methods = {r["img_per_s_method"] for r in ok}
    note = "img/s: images embedded per second after the first batch (decode, forward, write; model load, export and " \
           "warm-up left out)"
    if "whole run" in methods:
        note += "; (whole run): too few images for that, so the extraction's wall time, model load included"
    if "recorded" in sources:
        note += "; (recorded): measured by an earlier compare run that filled this cache"
    if "unknown" in sources:
        note += "; —: the cache came from 'featbank extract', which records no throughput (delete it to measure)"
    lines.append(note + ".")
    for r in rows:
        if r["error"] is not None:
            lines.append(f"{r['backbone']}: {r['error']}")
        lines += [f"{r['backbone']}: {n}" for n in r["notes"] if n not in _TABLE_NOTES]
    return "\n".join(lines)


def default_plot_path(data: str | os.PathLike) -> Path:
    """``<cache dir>/caches/<folder>-<hash>-compare.png``: beside the caches compare uses, one per DATA."""
    from .extraction import default_cache_path

    cache = default_cache_path(data, "compare")
    return cache.with_name(f"{cache.stem}.png")


def plot_comparison(rows: Sequence[CompareRow], path: str | os.PathLike, title: str = "") -> Path:
    """Write a PNG of accuracy (test, else validation) against throughput, one point per backbone.

    Rows without a throughput or with an error are named under the plot instead of drawn.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import io

    import matplotlib.pyplot as plt

    out = Path(path).expanduser()
    drawn = [r for r in rows if r["error"] is None and r["img_per_s"] and r["val_top1"] is not None]
    on_test = bool(drawn) and all(r["test_top1"] is not None for r in drawn)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in drawn:
        x = r["img_per_s"]
        top1 = r["test_top1"] if on_test else r["val_top1"]
        bal = r["test_balanced_acc"] if on_test else r["val_balanced_acc"]
        ax.scatter([x], [top1], marker="o", color="tab:blue")
        ax.scatter([x], [bal], marker="^", color="tab:orange")
        ax.annotate(f"{r['backbone']} ({r['layers']}, {r['dims']}-d)", (x, top1), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.scatter([], [], marker="o", color="tab:blue", label="top-1")
    ax.scatter([], [], marker="^", color="tab:orange", label="balanced accuracy")
    ax.legend(loc="best", fontsize=8)
    xs = [r["img_per_s"] for r in drawn]
    if xs and max(xs) > 20 * min(xs):
        ax.set_xscale("log")  # a tiny test model next to real ones would squash the real ones together
    ax.set_xlabel("extraction throughput (images/s)")
    ax.set_ylabel("test accuracy" if on_test else "validation accuracy (no test split: optimistic)")
    ax.set_title(f"Backbones on {title}" if title else "Backbones")
    ax.grid(alpha=0.3)
    missing = [r["backbone"] for r in rows if r not in drawn]
    if missing:
        fig.text(0.01, 0.01, "not drawn (no throughput or failed): " + ", ".join(missing), fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return out
