"""Writing a bundle folder without ever losing the old one: :func:`save_bundle` and its machinery.

* One writer per bundle: an advisory ``flock`` on ``.<name>.lock`` beside the folder; a second
  writer gets a :class:`BundleError` naming the holder's pid at once.
* The new bundle is written to ``.<name>.tmp-<pid>-<rand>`` and swapped in with
  ``renameat2(RENAME_EXCHANGE)`` (Linux): the name always points at a complete bundle, old or
  new. Where the kernel or file system cannot exchange, the old folder is renamed to
  ``.<name>.old-<pid>-<rand>`` and the new one renamed in; a crash between the two renames is
  repaired by :func:`recover` (called on every open and save), which puts the old folder back.
* Leftovers of killed writers (``.tmp-``/``.old-`` folders whose pid is gone) are removed by
  the next save.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .. import __version__
from .._files import (
    LockBusy,
    describe_os_error,
    exclusive_lock,
    fsync_dir,
    pid_alive,
    remove_orphans,
    sha256_file,
    temporary_path,
    timestamp,
)
from ..errors import BundleError
from .manifest import BUNDLE_FORMAT, BUNDLE_VERSION, MANIFEST, Manifest, check_file_name, parse_manifest

__all__ = [
    "sha256_bytes", "sha256_file", "save_bundle", "check_bundle_target", "writer_lock", "swap_in", "recover",
    "remove_leftovers", "old_path",
]

_OLD_MARK = ".old-"


def _old_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(path.name)}{re.escape(_OLD_MARK)}(\d+)-[0-9a-f]{{8}}$")


def old_path(path: Path) -> Path:
    """Where the fallback swap parks the previous bundle: ``.<name>.old-<pid>-<rand>``."""
    return path.with_name(f".{path.name}{_OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside the bundle ``path`` while this process writes it.

    Raises:
        BundleError: another live process holds it (the message names its pid), or the lock
            file cannot be created.
    """
    lock = path.with_name(f".{path.name}.lock")
    held = contextlib.ExitStack()
    try:
        held.enter_context(exclusive_lock(lock))
    except LockBusy as e:
        raise BundleError(
            f"Another process (pid {e.holder}) is writing bundle {str(path)!r} right now (it holds "
            f"{str(lock)!r}). Wait for it to finish, or choose another --name/--out."
        ) from None
    except OSError as e:
        raise BundleError(
            f"Cannot write bundle {str(path)!r}: creating {str(lock)!r} failed ({describe_os_error(e)}). "
            "Choose an --out in a folder you can write to."
        ) from None
    with held:
        yield


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2``); ``False`` where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(tmp: Path, path: Path) -> None:
    """Put the complete folder ``tmp`` at ``path``; the old folder (if any) is removed after.

    There is no moment without a bundle at ``path`` where ``renameat2`` works; elsewhere a
    crash between the two renames leaves ``.<name>.old-*``, which :func:`recover` puts back.
    """
    if not path.exists():
        os.rename(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old bundle
    else:
        old = old_path(path)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)


def recover(path: Path) -> Path | None:
    """If ``path`` is missing but a killed writer parked the old bundle aside, put it back.

    Returns the folder restored from, or ``None``. Folders of live writers are left alone.
    """
    if path.exists() or path.is_symlink() or not path.parent.is_dir():
        return None
    pattern = _old_pattern(path)
    parked = []
    for p in path.parent.iterdir():
        m = pattern.match(p.name)
        if m and not pid_alive(int(m.group(1))) and p.is_dir() and not p.is_symlink():
            parked.append(p)
    for p in sorted(parked, key=lambda q: q.stat().st_mtime, reverse=True):
        try:
            os.rename(p, path)
        except OSError:
            continue
        fsync_dir(path.parent)
        return p
    return None


def remove_leftovers(path: Path) -> list[Path]:
    """Remove ``.tmp-``/``.old-`` folders of ``path`` left by writers that no longer run."""
    removed = remove_orphans(path)
    if not path.exists():
        return removed
    pattern = _old_pattern(path)
    for p in path.parent.iterdir():
        m = pattern.match(p.name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _core_digest(manifest: Mapping[str, Any], hashes: Mapping[str, str]) -> str:
    core = {k: v for k, v in manifest.items() if k not in ("bundle_id", "created", "metrics")}
    h = hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode())
    for name in sorted(hashes):
        h.update(name.encode() + b"\0" + hashes[name].encode())
    return h.hexdigest()[:16]


def _is_bundle_dir(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == BUNDLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_bundle_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check, before any work, that a bundle may be written at ``path``; return it as a Path.

    ``fit`` and ``finetune`` call it up front (and :func:`save_bundle` again under its lock).

    Raises:
        BundleError: ``path`` is a file or a folder that is not a featbank bundle (never
            replaced), or an existing bundle and ``overwrite`` is False.
    """
    path = Path(path)
    recover(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BundleError(f"{str(path)!r} exists and is not a bundle folder; refusing to replace it. "
                          "Choose another --name or --out.")
    if path.exists():
        if any(path.iterdir()) and not _is_bundle_dir(path):
            raise BundleError(
                f"{str(path)!r} exists and is not a featbank bundle; refusing to replace it. "
                "Choose another --name or --out."
            )
        if _is_bundle_dir(path) and not overwrite:
            raise BundleError(
                f"Bundle {str(path)!r} already exists. Pass --overwrite to replace it, or choose another --name/--out."
            )
    return path


def save_bundle(
    path: str | os.PathLike,
    manifest: dict[str, Any],
    files: Mapping[str, bytes | str | os.PathLike],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a bundle folder atomically and return its path.

    Args:
        path: the bundle folder (``models/<name>``); its parent is created.
        manifest: the manifest, validated with :func:`featbank.bundles.manifest.parse_manifest`;
            ``format``, ``bundle_version``, ``featbank_version`` and ``created`` are filled
            when missing; the weights section (``head``/``finetune``) gets the ``sha256`` of its
            ``file``; ``files`` (name -> sha256 of every file) and ``bundle_id`` are set. The
            dict is updated in place.
        files: file name -> content (bytes), or a path to a file to copy (large weights).
        overwrite: replace an existing bundle at ``path`` (a folder that is not a bundle is
            never replaced). Without it an existing bundle is refused.

    Raises:
        BundleError: a bad manifest or file name, the weights file missing from ``files``,
            ``path`` exists and may not be replaced, another process is writing it, or the
            disk refused a write (the message names the path; the old bundle is unchanged).
    """
    path = Path(path)
    for name in files:
        if name == MANIFEST:
            raise BundleError(f"Bundle file name {name!r} is reserved for the manifest.")
        check_file_name(name)
    man = parse_manifest(manifest, f"manifest for {str(path)!r}", written=False)
    if man.weights.file not in files:
        raise BundleError(f"The manifest's {man.weights_section}.file is {man.weights.file!r} but no such file "
                          "was given to save_bundle.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"Cannot write bundle {str(path)!r}: {describe_os_error(e)}.") from None
    with writer_lock(path):
        check_bundle_target(path, overwrite)
        remove_leftovers(path)
        tmp = temporary_path(path)
        try:
            _write_folder(tmp, manifest, files, man)
            swap_in(tmp, path)
        except OSError as e:
            kept = " The previous bundle is unchanged." if path.exists() else ""
            raise BundleError(f"Cannot write bundle {str(path)!r}: {describe_os_error(e)} ({e.filename or path})."
                              f"{kept}") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write_folder(tmp: Path, manifest: dict[str, Any], files: Mapping[str, Any], man: Manifest) -> None:
    manifest.setdefault("format", BUNDLE_FORMAT)
    manifest.setdefault("bundle_version", BUNDLE_VERSION)
    manifest.setdefault("featbank_version", __version__)
    manifest.setdefault("created", timestamp())
    tmp.mkdir()
    hashes: dict[str, str] = {}
    for name, content in files.items():
        dst = tmp / name
        if isinstance(content, (bytes, bytearray, memoryview)):
            dst.write_bytes(bytes(content))
        else:
            shutil.copyfile(content, dst)
        hashes[name] = sha256_file(dst)
    manifest[man.weights_section]["sha256"] = hashes[man.weights.file]
    manifest["files"] = dict(sorted(hashes.items()))
    manifest["bundle_id"] = _core_digest(manifest, {man.weights.file: hashes[man.weights.file]})
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
