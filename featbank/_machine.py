"""What this machine offers in memory and cores, and sizes as people read them: one home for ``finetune
--cache-frozen`` (the memory available now) and ``fit --auto`` (the memory a plan may count on, the
cores other work leaves idle).
"""

from __future__ import annotations

import os
import time

__all__ = ["available_memory", "memory_limit", "format_bytes", "busy_cpus", "CGROUP_LIMITS"]

#: cgroup v2 and v1 memory limits: a container's or a batch job's share of the machine.
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def available_memory() -> int | None:
    """Bytes of RAM available now (Linux), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_limit(cgroup_files: tuple[str, ...] = CGROUP_LIMITS) -> int | None:
    """The memory this process may use in all: the physical memory, or a container's (cgroup) limit where
    that is lower; None where neither can be read."""
    known = [n for n in (_physical_memory(), *map(_cgroup_limit, cgroup_files)) if n is not None and n > 0]
    return min(known) if known else None


def busy_cpus(cpus: set[int] | frozenset[int], window: float = 0.5, stat: str = "/proc/stat") -> float | None:
    """How many of ``cpus`` other work keeps busy now: the share of their ticks in ``/proc/stat`` that are
    not idle or iowait over ``window`` seconds, summed (this process sleeps meanwhile), from 0 to
    ``len(cpus)``. None where the file cannot be read or names none of them (not Linux).

    Unlike the load average, it says what runs *now*: the 1-minute load average still counts a job
    that ended a minute ago (after one ``fit --auto``, the next saw a load of ~1 on an idle 2-core
    machine and ran on one thread, 41 s against 30 s on two)."""
    def ticks() -> dict[int, tuple[int, int]]:
        out = {}
        with open(stat) as f:
            for line in f:
                name, *vals = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus and len(vals) >= 4:
                    v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal (guest is in user)
                    out[int(name[3:])] = (sum(v), v[3] + (v[4] if len(v) > 4 else 0))
        return out

    try:
        before = ticks()
        time.sleep(window)
        after = ticks()
    except (OSError, ValueError):
        return None
    busy, seen = 0.0, 0
    for cpu in before.keys() & after.keys():
        total, idle = after[cpu][0] - before[cpu][0], after[cpu][1] - before[cpu][1]
        if total > 0:
            busy += (total - idle) / total
            seen += 1
    return busy if seen else None


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX
        return None


def _cgroup_limit(path: str) -> int | None:
    """The limit in ``path`` (a few bytes of text), or None: absent, unreadable, ``max`` or not a number."""
    try:
        with open(path, "rb") as f:
            text = f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``9 bytes``, ``19.5 KiB``, ``1.2 GiB``."""
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
