"""One writer per cache file: an advisory ``flock`` on ``<cache>.lock``, re-entrant within a process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .._files import LockBusy, describe_os_error, exclusive_lock, lock_holders, pid_alive
from ..errors import CacheError

__all__ = ["writer_lock"]


_HELD: dict[str, int] = {}


def _busy_error(path: str | os.PathLike, lock: Path, holder: str) -> CacheError:
    """Who holds the lock, in words: a live writer, or the leftover workers of a writer that was killed."""
    if holder.isdigit() and not pid_alive(int(holder)):
        others = lock_holders(lock)
        who = f" (pid {', '.join(map(str, others))})" if others else ""
        return CacheError(
            f"{str(lock)!r} is still held by processes{who} that the killed writer of {str(path)!r} (pid {holder}) "
            "started: DataLoader workers, which exit on their own once they notice. Retry in a few seconds; "
            "the rerun resumes where the killed run stopped."
        )
    return CacheError(
        f"Another process (pid {holder}) is writing {str(path)!r} right now (it holds {str(lock)!r}). "
        "Wait for it to finish, or write to another --out."
    )


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold ``<path>.lock`` (an advisory ``flock``) while this process writes the cache ``path``.

    A second process that wants to write the same cache gets a :class:`CacheError` at once
    instead of sharing its staging file. Re-entrant within a process. The lock file is removed on
    release; a stale one (its process died) is taken over, since the kernel drops ``flock`` locks
    with the process. Without ``fcntl`` (Windows) nothing is locked.
    """
    lock = Path(str(Path(path).expanduser().resolve()) + ".lock")
    key = str(lock)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    held = contextlib.ExitStack()
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        held.enter_context(exclusive_lock(lock))
    except LockBusy as e:
        raise _busy_error(path, lock, e.holder) from None
    except OSError as e:
        raise CacheError(
            f"Cannot write next to {str(path)!r}: creating {str(lock)!r} failed ({describe_os_error(e)}). "
            "Choose an --out in a folder you can write to."
        ) from None
    with held:
        _HELD[key] = 1
        try:
            yield
        finally:
            _HELD.pop(key, None)
