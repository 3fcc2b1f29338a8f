"""Extract on a full disk or under a file size limit: exit 2 naming the path and what was kept.

HDF5 cannot recover from a write that fails half-way (the process used to print a traceback and
then die with SIGSEGV, rc 139), so featbank checks the space before writing anything. These tests
run real ``featbank`` processes: one on a small tmpfs (needs root / CAP_SYS_ADMIN, skipped
otherwise), one under RLIMIT_FSIZE (works anywhere POSIX).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_image_folder

ARGS = ["--backbone", "test_tiny", "--engine", "torch", "--num-workers", "0", "-q"]
FEATBANK = [sys.executable, "-c", "import sys; from featbank.cli.main import main; sys.exit(main())"]


def _extract(data: Path, out: Path, env_dir: Path, preexec=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEATBANK_CACHE_DIR": str(env_dir)}
    return subprocess.run([*FEATBANK, "extract", str(data), "--out", str(out), *ARGS], capture_output=True,
                          text=True, timeout=300, env=env, preexec_fn=preexec)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or r.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave_bytes: int) -> None:
    free = shutil.disk_usage(mnt).free
    with open(mnt / "filler", "wb", buffering=0) as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))


@pytest.mark.slow
def test_disk_full_keeps_the_old_cache(small_tmpfs: Path, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", n_per_class=4)
    out = small_tmpfs / "c.h5"
    r = _extract(data, out, tmp_path / "fbc")
    assert r.returncode == 0, r.stderr
    before = out.read_bytes()
    make_image_folder(tmp_path / "data", n_per_class=40, seed=1)  # more images: a larger cache
    for leave in (4_000, 60_000):  # no room for the staging file / room for it but not the cache
        _fill(small_tmpfs, leave)
        r = _extract(data, out, tmp_path / "fbc")
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        assert "Not enough space" in r.stderr and str(out) in r.stderr and "left as it was" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert out.read_bytes() == before
        assert not [p for p in small_tmpfs.iterdir() if ".tmp" in p.name]
        (small_tmpfs / "filler").unlink()
    r = _extract(data, out, tmp_path / "fbc")  # space again: the rerun finishes
    assert r.returncode == 0, r.stderr


def _limit_file_size() -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write over the limit raises EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="POSIX only")
def test_file_size_limit_is_exit_2(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", n_per_class=60)
    out = tmp_path / "c.h5"
    r = _extract(data, out, tmp_path / "fbc", preexec=_limit_file_size)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "ulimit -f" in r.stderr and str(out) in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()
