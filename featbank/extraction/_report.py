"""What one extraction run did: the report and the message --strict raises with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ExtractReport", "strict_message"]


@dataclass
class ExtractReport:
    """What one ``extract`` run did.

    Attributes:
        path: the cache file.
        n_images: images in the folder (rows in the cache plus skipped files).
        n_embedded: images embedded by this run.
        n_reused: rows kept from the existing cache (unchanged files).
        n_removed: rows dropped because their file was deleted or changed.
        n_resumed: rows embedded by an interrupted earlier run and taken from its unfinished part.
        skipped: ``[(relative path, reason)]`` for every file that could not be read.
        engine, device, precision: how embeddings were computed (empty when nothing was embedded).
        seconds: wall time; ``images_per_second`` counts embedded images only.
        up_to_date: nothing had changed, the cache was not rewritten.
        model_loaded: whether the backbone was loaded at all.
        n_duplicates: rows of the input naming a file (or WebDataset sample) an earlier row already
            names, collapsed into that row (one file is one row).
        published: whether this run published the index (False for a torchrun rank other than 0 and
            for a job array's slice).
        slice_of: ``(rank, world)`` when the run was one slice of a job array.
    """

    path: Path
    n_images: int = 0
    n_embedded: int = 0
    n_reused: int = 0
    n_removed: int = 0
    n_resumed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    engine: str = ""
    device: str = ""
    precision: str = ""
    seconds: float = 0.0
    up_to_date: bool = False
    model_loaded: bool = False
    cache_key: str = ""
    n_duplicates: int = 0
    published: bool = True
    slice_of: tuple[int, int] | None = None

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def images_per_second(self) -> float:
        return self.n_embedded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.slice_of is not None:
            rank, world = self.slice_of
            return (f"{self.path}: slice {rank} of {world} done ({self.n_embedded} embedded, {self.n_resumed} "
                    f"resumed); nothing published yet. Once every slice has run: featbank extract DATA --out "
                    f"{self.path} --finalize")
        parts = [f"{self.path}: {self.n_images - self.n_skipped} rows"]
        if self.up_to_date:
            parts.append("up to date, nothing embedded")
        else:
            parts.append(f"{self.n_embedded} embedded, {self.n_reused} reused, {self.n_removed} dropped")
            if self.n_resumed:
                parts.append(f"{self.n_resumed} resumed from an interrupted run")
            if self.n_embedded:
                parts.append(f"{self.images_per_second:.1f} img/s with {self.engine} on {self.device}")
        if self.skipped:
            parts.append(f"{self.n_skipped} skipped")
        if self.n_duplicates:
            parts.append(f"{self.n_duplicates} repeated row(s) collapsed")
        return "; ".join(parts)


def strict_message(report: ExtractReport) -> str:
    lines = [f"--strict: {report.n_skipped} image(s) were skipped (the cache {report.path} was still written):"]
    lines += [f"  {p}: {r}" for p, r in report.skipped[:20]]
    if report.n_skipped > 20:
        lines.append(f"  ... and {report.n_skipped - 20} more (see skipped/ in the cache)")
    return "\n".join(lines)
