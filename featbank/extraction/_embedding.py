"""Data loading and the embedding loop: decode images in worker processes, embed them into the staging file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..images import ImageReadError, PreprocessConfig, load_and_preprocess

if TYPE_CHECKING:
    from ..cache import PartWriter  # exported by featbank.cache's face (cachehouse, #23)
    from ..features import FeatureSpec
    from ._engines import Engine

__all__ = ["ImageRowsDataset", "Collate", "write_block", "embed_block", "ViewImageDataset", "ViewCollate", "embed_feature_rows"]


class ImageRowsDataset:
    """Map-style dataset over staging rows; a bad image yields a reason instead of pixels."""

    def __init__(self, root: Path, paths: list[str], rows: np.ndarray, cfg: PreprocessConfig):
        self.root, self.paths, self.rows, self.cfg = root, paths, rows, cfg

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        return self.item(int(self.rows[i]))

    def item(self, row: int) -> tuple[int, np.ndarray | None, str]:
        """Staging row ``row`` through the Pillow path: (row, pixels, "") or (row, None, reason)."""
        try:
            return row, load_and_preprocess(self.root / self.paths[row], self.cfg), ""
        except ImageReadError as e:
            return row, None, e.reason
        except Exception as e:  # noqa: BLE001 - never let one file kill a long run
            return row, None, f"unexpected error: {type(e).__name__}: {e}"


class Collate:
    def __init__(self, cfg: PreprocessConfig):
        self.shape = (*cfg.input_size, 3)

    def __call__(self, items: list[tuple[int, np.ndarray | None, str]]) -> tuple[np.ndarray, Any, np.ndarray, list[str]]:
        import torch

        rows = np.array([it[0] for it in items], np.int64)
        ok = np.array([it[1] is not None for it in items], bool)
        batch = np.zeros((len(items), *self.shape), np.uint8)
        for j, it in enumerate(items):
            if it[1] is not None:
                batch[j] = it[1]
        return rows, torch.from_numpy(batch), ok, [it[2] for it in items]


def embed_block(writer: PartWriter, eng: Engine, rows: np.ndarray, batch: Any, ok: np.ndarray, reasons: list[str],
                skipped: dict[int, str]) -> None:
    """Embed the readable images of one batch into ``writer``; record why the others were skipped."""
    import torch

    if ok.any():
        emb = eng(batch if ok.all() else batch[torch.from_numpy(ok).to(batch.device)])
        full = np.zeros((len(rows), emb.shape[1]), writer.embeddings.dtype)
        full[ok] = emb
        write_block(writer, rows, full, ok)
    for r, good, why in zip(rows, ok, reasons):
        if not good:
            skipped[int(r)] = why


def write_block(staging: PartWriter, rows: np.ndarray, emb: np.ndarray, ok: np.ndarray) -> None:
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == len(rows):
        staging.embeddings[lo:hi] = emb
        staging.file.flush()
        current = staging.status[lo:hi]
        staging.status[lo:hi] = np.where(ok, 1, current).astype(np.uint8)
        staging.file.flush()
    else:
        staging.write_rows(rows[ok], emb[ok])


class ViewImageDataset:
    """A row dataset whose items also carry the row's K augmented views (``None`` for a bad image)."""

    def __init__(self, base: Any, paths: list[str], features: FeatureSpec, interpolation: str):
        self.base, self.paths, self.features, self.interpolation = base, paths, features, interpolation

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str, np.ndarray | None]:
        from ..features import make_views

        row, img, why = self.base[i]
        if img is None or not self.features.n_views:
            return row, img, why, None
        try:
            return row, img, why, make_views(img, self.paths[row], self.features, self.interpolation)
        except Exception as e:  # noqa: BLE001 - one file never kills a run
            return row, None, f"unexpected error making views: {type(e).__name__}: {e}", None


class ViewCollate(Collate):
    def __init__(self, cfg: PreprocessConfig, views: int):
        super().__init__(cfg)
        self.views = views

    def __call__(self, items: list[Any]) -> tuple[np.ndarray, Any, np.ndarray, list[str], Any]:  # type: ignore[override]
        import torch

        rows, batch, ok, reasons = super().__call__([it[:3] for it in items])
        vb = np.zeros((len(items), self.views, *self.shape), np.uint8)
        for j, it in enumerate(items):
            if it[3] is not None:
                vb[j] = it[3]
        return rows, batch, ok, reasons, torch.from_numpy(vb)


def _tap_outputs(eng: Engine, x: Any, batch_size: int) -> dict[str, np.ndarray]:
    """``{tap: (n, D)}`` for a batch, run in chunks of ``batch_size`` images."""
    parts = [eng(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return {t: np.concatenate([p[k] for p in parts]) for k, t in enumerate(eng.layers)}


def embed_feature_rows(writer: PartWriter, loader: Any, eng: Engine, features: FeatureSpec, batch_size: int,
                        skipped: dict[int, str], on_rows: Callable[[int], None] = lambda n: None) -> None:
    """The embedding loop of a run with layers or views: every tap and view of a row is written
    before the row is marked done (``PartWriter.write_rows``), so a resumed run redoes only rows
    that were not finished. ``on_rows(n)`` after every batch, as the plain loop does."""
    import torch

    for rows, batch, ok, reasons, views in loader:
        if ok.any():
            mask = torch.from_numpy(ok)
            x = batch if ok.all() else batch[mask]
            out = _tap_outputs(eng, x, batch_size)
            extra = {f"layers/{t}": out[t] for t in features.taps}
            if features.n_views:
                v = (views if ok.all() else views[mask])
                n, k = v.shape[:2]
                vout = _tap_outputs(eng, v.reshape(n * k, *v.shape[2:]), batch_size)
                extra["views/embeddings"] = vout["final"].reshape(n, k, -1)
                extra.update({f"views/layers/{t}": vout[t].reshape(n, k, -1) for t in features.taps})
            writer.write_rows(rows[ok], out["final"], extra)
        for r, good, why in zip(rows, ok, reasons):
            if not good:
                skipped[int(r)] = why
        on_rows(len(rows))
