"""The comparison's row type, its plain-text table and its accuracy-against-throughput plot."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from .._files import atomic_write_bytes

__all__ = ["CompareRow", "empty_row", "NO_TEST", "format_table", "default_plot_path", "plot_comparison"]

NO_TEST = "no test split in DATA: test accuracy not measured (add DATA/test/<class>/...)"
_TABLE_NOTES = (NO_TEST,)  # said once under the table, not once per row


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


def empty_row(name: str, layers: str) -> CompareRow:
    return CompareRow(
        backbone=name, layers=layers, dims=None, n_images=None, img_per_s=None, img_per_s_method=None,
        img_per_s_source="unknown",
        img_per_s_images=0, n_embedded=0, extract_s=None, val_top1=None, val_balanced_acc=None, test_top1=None,
        test_balanced_acc=None, n_train=0, n_val=0, n_test=0, chosen={}, fit_s=None, cache=None, error=None, notes=[],
    )


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
    from ..extraction import default_cache_path

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
