"""File machinery shared by every writer: atomic writes, temporary names, orphans, output checks.

One home for what the cache, bundle, export, checkpoint and ONNX-embedder writers all need, so a
crash never leaves a half-written file under a final name and every writer names its temporaries
the same way (which is what lets :func:`remove_orphans` find those of a killed run).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import ConfigError

__all__ = [
    "timestamp",
    "slugify",
    "temporary_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "remove_orphans",
    "check_output_dir",
    "check_bundle_dir",
    "describe_os_error",
    "pid_alive",
    "sha256_file",
    "LockBusy",
    "exclusive_lock",
    "NotRegularFileError",
    "describe_file_type",
    "check_regular_file",
    "open_regular_fd",
    "open_regular_file",
    "lock_holders",
]

_TMP_MARK = ".tmp-"


def timestamp() -> str:
    """Local time as ISO 8601 with offset, the one format every manifest and cache records."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def slugify(text: str, default: str = "data") -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``._-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or default


def temporary_path(path: Path) -> Path:
    """A sibling name for a file or folder being written: ``.<name>.tmp-<pid>-<random>``.

    The pid lets :func:`remove_orphans` tell a live writer's temporaries from a killed one's.
    """
    path = Path(path)
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` through a temporary sibling, fsync it, then ``os.replace`` it into place.

    Readers see the old file or the new one, never a part. If ``path`` is a symlink the link's
    target is replaced (the link stays a link); an existing file's permission bits are kept.
    On any error the temporary file is removed and the old file is untouched.
    """
    target = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    tmp = temporary_path(target)
    mode_bits = _existing_mode(target)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if mode_bits is not None:
            os.chmod(tmp, mode_bits)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def sha256_file(path: str | os.PathLike, block_size: int = 1 << 22, *, max_bytes: int | None = None) -> str:
    """Hex sha256 of a file's bytes, read in blocks (the one hash every recorded file uses).

    Only a regular file is hashed (:func:`open_regular_file`: a FIFO or ``/dev/zero`` would be read
    forever). ``max_bytes`` (the size a table recorded) bounds the read: at most one byte more is
    hashed, so a file that grew hashes differently without being read to its end.

    Raises:
        NotRegularFileError: a FIFO, device, socket or folder.
        OSError: it cannot be read.
    """
    h = hashlib.sha256()
    left = None if max_bytes is None else max(0, int(max_bytes)) + 1
    with open_regular_file(path) as fh:
        while left is None or left > 0:
            chunk = fh.read(block_size if left is None else min(block_size, left))
            if not chunk:
                break
            h.update(chunk)
            left = None if left is None else left - len(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def _existing_mode(path: Path) -> int | None:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (ours counts; one we may not signal counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(path: Path) -> list[Path]:
    """Remove temporaries of ``path`` left by writers that no longer run; return what was removed.

    Only names made by :func:`temporary_path` for this very ``path`` are considered, and only
    when the pid in the name is not alive, so a concurrent writer's temporary is left alone.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}{re.escape(_TMP_MARK)}(\d+)-[0-9a-f]{{8}}$")
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for p in path.parent.iterdir():
        m = pattern.match(p.name)
        if not m or pid_alive(int(m.group(1))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


class LockBusy(Exception):
    """Another live process holds the lock; ``holder`` is the pid it wrote there (or ``unknown``)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def exclusive_lock(lock: Path) -> Iterator[None]:
    """Hold an advisory ``flock`` on the file ``lock`` (created, then removed on release).

    The one writer lock behind the cache and bundle writers: a second process gets
    :class:`LockBusy` at once (never waits), and a lock file left by a dead process is simply taken
    over, since the kernel drops ``flock`` locks with their process. The holder's pid is written
    into the file for messages. A symlink at ``lock`` is not followed. Without ``fcntl``
    (Windows) nothing is locked.

    Raises:
        LockBusy: another live process holds it.
        OSError: the lock file cannot be created.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise LockBusy(holder) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its last holder removed the file between our open and flock: retry
    try:
        with contextlib.suppress(OSError):  # the pid only names the holder; a full disk must not stop the lock
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def check_output_dir(folder: Path, what: str = "output") -> Path:
    """Create ``folder`` if needed and check that files can be written there, before any work.

    Raises:
        ConfigError: the folder cannot be created (a file is in the way, a read-only or virtual
            file system such as /proc) or written; the message names the path and the reason.
    """
    folder = Path(folder).expanduser()
    _nearest_folder(folder, what, folder)
    _write_check(folder, what, folder, create=True)
    return folder


def _nearest_folder(start: Path, what: str, shown: Path) -> Path:
    """The nearest existing path at or above ``start``; a ConfigError if it is a file."""
    above = start
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"Cannot write the {what} under '{shown}': '{above}' is a file, not a folder. Choose another --out.")
    return above


def _write_check(folder: Path, what: str, shown: Path, create: bool = False) -> None:
    """Write and remove an empty file in ``folder`` (created first with ``create``), or a ConfigError."""
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe = temporary_path(folder / ".write-check")
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"Cannot write the {what} under '{shown}': {describe_os_error(e)}. Choose another --out.") from None


def check_bundle_dir(folder: Path) -> Path:
    """Check, before any work, that a model bundle can be written as ``folder``.

    ``folder`` is the bundle itself (``--out models/x``): absent, an empty folder, or an earlier
    bundle (a folder with a ``manifest.json``, which the writer then replaces). Like
    :func:`check_output_dir`, but nothing is created: a file is written and removed in the
    nearest existing folder above, so a run refused later (a bad parameter) leaves no trace.

    Raises:
        ConfigError: ``folder`` is a file, a folder of other files (e.g. the ``models/`` root
            that holds bundles), or its parent cannot be written.
    """
    folder = Path(folder).expanduser()
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            raise ConfigError(f"Cannot write the model bundle '{folder}': it is a file, not a folder. Choose another --out.")
        entries = sorted(p.name for p in folder.iterdir())
        if entries and "manifest.json" not in entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ConfigError(
                f"--out '{folder}' is not a featbank bundle: it holds other files ({shown}). --out names the "
                f"bundle folder itself, e.g. --out {folder / 'my-model'}; choose a new or empty folder."
            )
    above = _nearest_folder(folder.parent, "model bundle", folder.parent)
    _write_check(above, "model bundle", folder.parent)
    return folder


def describe_os_error(e: OSError) -> str:
    """A short, user-facing reason for an OSError (no traceback jargon)."""
    reasons = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "a file is in the way",
    }
    return reasons.get(e.errno, e.strerror or str(e))


# -- regular files only (a FIFO, a device or a socket is refused when opened, never read forever) --------


class NotRegularFileError(OSError):
    """A FIFO, device, socket or folder where featbank expects a regular file (an ``OSError``, so
    callers that skip unreadable files skip these too; ``strerror`` says what it is)."""

    def __init__(self, path: str | os.PathLike, kind: str):
        super().__init__(errno.EINVAL, f"{kind}, not a regular file", str(path))
        self.kind = kind


def describe_file_type(mode: int) -> str:
    """``st_mode`` in words: ``"a FIFO (named pipe)"``, ``"a character device"``, ... ``"a regular file"``."""
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "a special file")


def check_regular_file(path: str | os.PathLike) -> os.stat_result:
    """``os.stat`` of ``path`` (through symlinks), refusing anything but a regular file without opening it.

    Raises:
        NotRegularFileError: a FIFO, device, socket or folder.
        OSError: it cannot be stat'ed (missing, permission).
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(path, describe_file_type(st.st_mode))
    return st


def open_regular_fd(path: str | os.PathLike) -> int:
    """A read-only descriptor of ``path``, only if it is a regular file, decided on the open descriptor.

    Opened with ``O_NONBLOCK``, so a FIFO swapped in after a listing is refused at once instead of
    blocking until a writer appears; then ``fstat`` decides what was opened (no race between a check
    and the open). Reads from the returned regular file block as usual.

    Raises:
        NotRegularFileError: a FIFO, device, socket or folder.
        OSError: it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(path, describe_file_type(mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular_file(path: str | os.PathLike) -> IO[bytes]:
    """:func:`open_regular_fd` as a binary file object.

    Raises:
        NotRegularFileError: a FIFO, device, socket or folder.
        OSError: it cannot be opened.
    """
    return os.fdopen(open_regular_fd(path), "rb")


def lock_holders(lock: str | os.PathLike) -> list[int]:
    """Pids of this user's processes that have ``lock`` open (Linux ``/proc``; empty elsewhere).

    A ``flock`` belongs to the open file, so processes forked by the holder (DataLoader workers)
    keep it after the holder died; this names them for the message.
    """
    try:
        st = os.stat(lock)
    except OSError:
        return []
    want, found = (st.st_dev, st.st_ino), []
    for entry in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            s = os.stat(entry)
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == want:
            found.append(int(entry.parts[2]))
    return sorted(set(found) - {os.getpid()})
