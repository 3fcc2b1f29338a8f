"""One writer per cache file: an advisory ``flock`` on ``<cache>.lock``, re-entrant within a process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CacheError

__all__ = ["writer_lock"]


# --------------------------------------------------------------------------------------------
# One writer per cache file
# --------------------------------------------------------------------------------------------

_HELD: dict[str, int] = {}


@contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold ``<path>.lock`` (an advisory ``flock``) while this process writes the cache ``path``.

    A second process that wants to write the same cache gets a :class:`CacheError` at once
    instead of sharing its staging file. Re-entrant within a process. The lock file is removed on
    release; a stale one (its process died) is taken over, since the kernel drops ``flock`` locks
    with the process. Without ``fcntl`` (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = Path(str(Path(path).expanduser().resolve()) + ".lock")
    key = str(lock)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CacheError(
                f"Cannot write next to {str(path)!r}: creating {str(lock)!r} failed ({e.strerror or e}). "
                "Choose an --out in a folder you can write to."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise CacheError(
                f"Another process (pid {holder}) is writing {str(path)!r} right now (it holds {str(lock)!r}). "
                "Wait for it to finish, or write to another --out."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by its last holder between our open and flock: retry
    try:
        try:  # the pid only names the holder in messages; a full disk must not stop the lock
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError:
            pass
        _HELD[key] = 1
        yield
    finally:
        _HELD.pop(key, None)
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)
