"""The cache file on disk: its default path, the refusal of a foreign file, temporaries left by a killed run."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .._files import NotRegularFileError, check_regular_file, pid_alive, remove_orphans, slugify
from ..cache import default_cache_dir
from ..errors import NotACacheError

__all__ = ["default_cache_path", "refuse_foreign_file", "remove_stale_temporaries", "remove_dead_part_temporaries"]


def default_cache_path(
    data: str | os.PathLike, backbone: str, weights: str | None = None, dtype: str = "float32",
    weights_file: str | os.PathLike | None = None,
) -> Path:
    """``<cache dir>/caches/<folder>-<hash>-<backbone>[-<weights>][-file-<name>-<hash>][-<dtype>].h5``.

    The hashes are of absolute paths (the data folder, the weights file), so two weight files for
    one backbone get two caches instead of refusing each other's.
    """
    root = Path(data).expanduser().resolve()
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    bb = Path(backbone).name if os.sep in backbone or Path(backbone).is_dir() else backbone
    name = f"{slugify(root.name)}-{digest}-{slugify(bb)}"
    if weights:
        name += f"-{slugify(weights)}"
    if weights_file is not None:
        wf = Path(weights_file).expanduser().resolve()
        name += f"-file-{slugify(wf.stem)}-{hashlib.sha256(str(wf).encode()).hexdigest()[:8]}"
    if dtype != "float32":
        name += f"-{dtype}"
    return default_cache_dir() / "caches" / f"{name}.h5"


def refuse_foreign_file(out_path: Path) -> None:
    """Refuse an ``--out`` that holds something other than a featbank cache, even with --overwrite.

    Raises:
        NotACacheError: a non-empty file that is not HDF5, or HDF5 without featbank's format attribute.
    """
    import h5py

    from ..cache import FORMAT, is_hdf5

    _refuse_special_file(out_path)
    if not out_path.is_file() or out_path.stat().st_size == 0:
        return
    what = None
    if not is_hdf5(out_path):
        what = "not an HDF5 file"
    else:
        try:
            with h5py.File(out_path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    what = "an HDF5 file without featbank's format attribute"
        except OSError:
            return  # a damaged HDF5 file: --overwrite may replace it, as the reader's message says
    if what:
        raise NotACacheError(
            f"--out '{out_path}' is not a featbank cache ({what}); featbank does not overwrite it, not "
            "even with --overwrite. Choose another --out, or move the file away."
        )


def _refuse_special_file(out_path: Path) -> None:
    """A FIFO, device or socket at ``--out`` (or behind a symlink there) is refused: opening it would hang."""
    try:
        check_regular_file(out_path)
    except NotRegularFileError as e:
        if e.kind != "a folder":
            raise NotACacheError(
                f"--out '{out_path}' is {e.kind}, not a regular file; a cache is written only as a regular file. "
                "Choose another --out, or remove it."
            ) from None
    except OSError:
        pass  # absent (the usual case) or unreadable: the writer reports it


def remove_stale_temporaries(out_path: Path) -> None:
    """Temporary files of a run killed while it swapped a file into place (we hold the lock now)."""
    staging = out_path.with_name(out_path.name + ".partial")
    for p in {out_path, staging, Path(os.path.realpath(out_path))}:
        remove_orphans(p)
    # Names used before featbank._files (.<name>.tmp<pid>, <name>.partial.tmp<pid>).
    pattern = re.compile(rf"^(\.{re.escape(out_path.name)}|{re.escape(out_path.name)}\.partial)\.tmp\d+$")
    if out_path.parent.is_dir():
        for p in out_path.parent.iterdir():
            if pattern.match(p.name):
                try:
                    p.unlink()
                except OSError:
                    pass


_PART_TMP = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")


def remove_dead_part_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in a parts folder (``.part-*.partial.tmp-<pid>-*``, ``.part-*.h5.tmp-<pid>-*``)
    whose writer no longer runs (a killed or failed run's); return what was removed.

    A live process's temporary (its pid runs on this machine) is left alone.
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _PART_TMP.match(p.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed
