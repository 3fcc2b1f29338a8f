"""The audit report: ``summary.json``, one CSV per kind, and ``index.html`` with contact sheets.

The HTML page references only files beside it (``sheets/*.png``), so it opens offline. Each
contact sheet is drawn once with Pillow: numbered tiles of the top-ranked pairs or images of one
kind; the table under it lists the same numbers. Thumbnails that cannot be made (file gone, not
an image, inside a WebDataset shard that no longer reads) are drawn as a grey tile and listed with
the reason in ``summary.json`` (``thumbnails_skipped``).
"""

from __future__ import annotations

import csv
import html
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from ..cache import FeatureCache
from ..errors import ConfigError
from ._run import AuditResult, _split_name
from ._verify import open_row_image

if TYPE_CHECKING:
    from ..cache import FeatureCache

__all__ = ["write_report", "check_report_dir", "TILE"]

#: Thumbnail side in pixels.
TILE = 96


def check_report_dir(folder: Path, overwrite: bool) -> None:
    """Refuse an existing report folder unless ``overwrite`` (checked before any work is done)."""
    if folder.exists() and not overwrite:
        raise ConfigError(f"Report folder '{folder}' already exists. Pass --overwrite to replace it, or choose "
                          "another --report folder.")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--report '{folder}' is a file, not a folder. Choose a folder path.")


def load_thumbnail(root: Path, rel: str) -> tuple[Image.Image | None, str | None]:
    """(thumbnail, None) or (None, why not)."""
    im, why = open_row_image(root, rel)
    if im is None:
        return None, why
    im.thumbnail((TILE, TILE))
    return im, None


class _Thumbs:
    """Thumbnails by cache row, made once; the reasons of the ones that could not be made."""

    def __init__(self, result: AuditResult):
        self.cache = result.cache
        self.memo: dict[int, Image.Image | None] = {}
        self.skipped: dict[str, str] = {}

    def get(self, row: int) -> Image.Image | None:
        if row not in self.memo:
            rel = self.cache.paths[row]
            im, why = load_thumbnail(self.cache.root, rel)
            if why:
                self.skipped[rel] = why
            self.memo[row] = im
        return self.memo[row]


def _sheet(thumbs: _Thumbs, groups: Sequence[Sequence[int]], cols: int = 4) -> Image.Image:
    """A contact sheet: numbered tiles, each the images of one group side by side."""
    width = max(len(g) for g in groups)
    cell_w, cell_h = width * (TILE + 4) + 8, TILE + 22
    rows = (len(groups) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for n, group in enumerate(groups):
        x0, y0 = (n % cols) * cell_w + 4, (n // cols) * cell_h + 18
        draw.text((x0, y0 - 16), f"#{n + 1}", fill="black")
        for m, row in enumerate(group):
            im = thumbs.get(int(row))
            x = x0 + m * (TILE + 4)
            if im is None:
                draw.rectangle((x, y0, x + TILE - 1, y0 + TILE - 1), fill=(200, 200, 200))
                draw.text((x + 4, y0 + TILE // 2 - 6), "unreadable", fill="black")
            else:
                sheet.paste(im, (x + (TILE - im.width) // 2, y0 + (TILE - im.height) // 2))
    return sheet


def _label(cache: FeatureCache, y: int) -> str:
    return cache.classes[y] if 0 <= y < len(cache.classes) else ""


def _tables(result: AuditResult) -> dict[str, tuple[list[str], list[list[Any]], list[list[int]]]]:
    """{kind: (header, rows, row groups for thumbnails)}, each ranked most suspect first."""
    c, p = result.cache, result.pairs
    same = result.same_bytes
    dup_rows, dup_groups = [], []
    cross = c.splits[p.a] != c.splits[p.b]
    for i in np.concatenate([np.flatnonzero(cross), np.flatnonzero(~cross)]):
        a, b = int(p.a[i]), int(p.b[i])
        kind = ("identical file" if same.get((a, b)) else "exact embedding") if p.exact[i] else "near"
        pixel = "" if p.pixel is None or not np.isfinite(p.pixel[i]) else f"{p.pixel[i]:.5f}"
        dup_rows.append([c.paths[a], c.paths[b], f"{p.similarity[i]:.5f}", pixel, kind,
                         _split_name(c, int(c.splits[a])), _split_name(c, int(c.splits[b])),
                         _label(c, int(c.labels[a])), _label(c, int(c.labels[b]))])
        dup_groups.append([a, b])
    header = ["path_a", "path_b", "similarity", "pixel_correlation", "kind", "split_a", "split_b", "label_a", "label_b"]
    tables = {"duplicates": (header, dup_rows, dup_groups)}
    if result.issues is not None:
        iss, rows = result.issues, result.label_rows
        lab = [[c.paths[rows[i]], _split_name(c, int(c.splits[rows[i]])), _label(c, int(c.labels[rows[i]])),
                _label(c, int(iss.suggested[i])), f"{iss.self_confidence[i]:.4f}", f"{iss.margin[i]:.4f}"]
               for i in iss.order]
        tables["label_issues"] = (["path", "split", "given_label", "suggested_label", "self_confidence", "margin"], lab,
                                  [[int(rows[i])] for i in iss.order])
    out_rows, out_groups = [], []
    for r in result.knn_outliers:
        out_rows.append([c.paths[r], _split_name(c, int(c.splits[r])), "far from every image",
                         f"{result.knn_score[r]:.4f}"])
        out_groups.append([int(r)])
    if result.proba is not None:
        pos = {int(r): i for i, r in enumerate(result.label_rows)}
        for r in result.unclaimed:
            out_rows.append([c.paths[r], _split_name(c, int(c.splits[r])), "no class claims it",
                             f"{result.proba[pos[int(r)]].max():.4f}"])
            out_groups.append([int(r)])
    tables["outliers"] = (["path", "split", "reason", "score"], out_rows, out_groups)
    return tables


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


_TITLES = {"duplicates": "Duplicates and near-duplicates (cross-split pairs first)",
           "label_issues": "Likely label errors (lowest self-confidence first)",
           "outliers": "Outliers (far from every image; no class claims them)"}


def _html(summary: dict[str, Any], sections: list[tuple[str, list[str], list[list[Any]], str | None]]) -> str:
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>featbank audit</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>",
             "<h1>featbank audit</h1>", f"<pre>{esc(json.dumps(summary, indent=2, default=str))}</pre>"]
    for kind, header, rows, sheet in sections:
        parts.append(f"<h2>{esc(_TITLES[kind])}: {len(rows)}</h2>")
        if sheet:
            parts.append(f"<p><img src='{esc(sheet)}' alt='{esc(kind)} contact sheet'></p>")
        parts.append("<table><tr><th>#</th>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        for n, row in enumerate(rows):
            parts.append(f"<tr><td>{n + 1}</td>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(result: AuditResult, folder: str | os.PathLike, *, overwrite: bool = False, top: int = 24) -> Path:
    """Write summary.json, duplicates.csv, label_issues.csv (labelled caches), outliers.csv and
    index.html with one contact sheet per kind (the ``top`` first of each) into ``folder``.

    The folder is written under a temporary name and renamed at the end; an existing one is
    refused unless ``overwrite``. Returns the path of index.html.
    """
    folder = Path(folder)
    check_report_dir(folder, overwrite)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "sheets").mkdir(parents=True)
    thumbs = _Thumbs(result)
    sections = []
    for kind, (header, rows, groups) in _tables(result).items():
        _write_csv(tmp / f"{kind}.csv", header, rows)
        sheet = None
        if groups[:top]:
            sheet = f"sheets/{kind}.png"
            _sheet(thumbs, groups[:top]).save(tmp / sheet, optimize=True)
        sections.append((kind, header, rows[:top], sheet))
    summary = dict(result.summary, thumbnails_skipped=[{"path": k, "reason": v} for k, v in thumbs.skipped.items()])
    result.summary = summary
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (tmp / "index.html").write_text(_html(summary, sections), encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder / "index.html"
