"""Writing a bundle folder without ever losing the old one: one writer, atomic swap, recovery.

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
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterator

from ._files import _pid_alive, fsync_dir, remove_orphans
from .errors import BundleError

__all__ = ["writer_lock", "swap_in", "recover", "remove_leftovers", "old_path"]

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
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = path.with_name(f".{path.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            from ._files import describe_os_error

            raise BundleError(
                f"Cannot write bundle {str(path)!r}: creating {str(lock)!r} failed ({describe_os_error(e)}). "
                "Choose an --out in a folder you can write to."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise BundleError(
                f"Another process (pid {holder}) is writing bundle {str(path)!r} right now (it holds "
                f"{str(lock)!r}). Wait for it to finish, or choose another --name/--out."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its last holder removed the file between our open and flock: retry
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


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
        if m and not _pid_alive(int(m.group(1))) and p.is_dir() and not p.is_symlink():
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
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
